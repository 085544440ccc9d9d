"""Attribution baselines and references that the evaluation and benchmark compare against.

- ``BM25``: lexical retrieval (Okapi BM25), implemented here (no extra package).
- ``representations`` / cosine: RepSim, last-layer hidden states mean-pooled
  over the labelled tokens (completion tokens of a query, all tokens of a
  training window).
- ``raw_query_gradients``: identity curvature, i.e. plain gradient dot
  product; with per-sequence gradient norms this also gives gradient cosine.
- ``exact_influence``: the oracle, damped empirical Fisher of the tracked
  layers formed densely from autograd per-sequence gradients (tiny models).
- ``kronfluence_pairwise``: the reference EK-FAC implementation (test-only
  dependency, imported lazily; ``KronfluenceUnavailable`` when missing).
"""

from __future__ import annotations

import copy
import math
import re
import tempfile
import time
from collections import Counter
from collections.abc import Iterable

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from pipeline.core.ekfac import per_sequence_gradients
from pipeline.core.forward import draw_tokens, position_ids, sequence_losses
from pipeline.core.influence import InfluenceEngine
from pipeline.core.queries import QueryGradients
from pipeline.core.text import IGNORE, Batch, TokenWindow, collate
from pipeline.core.tracking import Captured, LayerSpec, weight_gradient

_WORD = re.compile(r"\w+")


def words(text: str) -> list[str]:
    """Lower-cased word tokens for BM25."""
    return _WORD.findall(text.lower())


class BM25:
    """Okapi BM25 over a fixed document collection.

    ``idf = log(1 + (N - df + 0.5) / (df + 0.5))`` (non-negative, Lucene's
    variant); ``k1`` saturates term frequency, ``b`` normalises by length.
    """

    def __init__(self, documents: list[str], k1: float = 1.5, b: float = 0.75):
        self.k1, self.b = k1, b
        self.doc_terms = [Counter(words(d)) for d in documents]
        self.lengths = np.array([sum(c.values()) for c in self.doc_terms], dtype=np.float64)
        self.avg_length = float(self.lengths.mean()) if len(self.lengths) and self.lengths.mean() > 0 else 1.0
        df = Counter(term for c in self.doc_terms for term in c)
        n = len(documents)
        self.idf = {t: math.log(1.0 + (n - f + 0.5) / (f + 0.5)) for t, f in df.items()}

    def scores(self, query: str) -> np.ndarray:
        """``(num_documents,)`` BM25 scores of ``query``."""
        out = np.zeros(len(self.doc_terms), dtype=np.float64)
        norm = self.k1 * (1 - self.b + self.b * self.lengths / self.avg_length)
        for term in set(words(query)):
            idf = self.idf.get(term)
            if idf is None:
                continue
            tf = np.array([c.get(term, 0) for c in self.doc_terms], dtype=np.float64)
            out += idf * tf * (self.k1 + 1) / (tf + norm)
        return out


@torch.no_grad()
def representations(model: nn.Module, batches: Iterable[Batch], device: torch.device | str = "cpu") -> torch.Tensor:
    """``(num_sequences, hidden)``: last hidden state mean-pooled over labelled, unmasked positions.

    For a query the labelled positions are its completion tokens; for a
    training window every token. Hidden states are the model's last layer
    (after the final layer norm for GPT-2).
    """
    out = []
    for batch in batches:
        batch = batch.to(device)
        hidden = model(
            input_ids=batch.input_ids,
            attention_mask=batch.attention_mask,
            position_ids=position_ids(batch.attention_mask),
            output_hidden_states=True,
        ).hidden_states[-1]
        keep = ((batch.labels != IGNORE) & (batch.attention_mask > 0)).to(hidden.dtype).unsqueeze(-1)
        out.append((hidden * keep).sum(1) / keep.sum(1).clamp(min=1))
    return torch.cat(out).to(torch.float64).cpu()


def cosine_matrix(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """``(len(x), len(y))`` cosine similarities of row vectors."""
    return F.normalize(x.to(torch.float64), dim=-1) @ F.normalize(y.to(torch.float64), dim=-1).T


def raw_query_gradients(engine: InfluenceEngine, batches: Iterable[Batch], query_ids: list[str]) -> QueryGradients:
    """Un-preconditioned full-size query gradients: scoring with them is the gradient dot product.

    ``engine`` must capture full-size vectors (``projected=False`` is used).
    """
    parts: dict[str, list[torch.Tensor]] = {n: [] for n in engine.layers}
    for batch in batches:
        captured, _ = engine.capture_batch(batch, projected=False, label_mode="data")
        for name, c in captured.items():
            parts[name].append(per_sequence_gradients(c))
    return QueryGradients(list(query_ids), dense={n: torch.cat(p) for n, p in parts.items()})


def query_gradient_norms(queries: QueryGradients) -> torch.Tensor:
    """``(Q,)`` Euclidean norms of dense query gradients over all layers."""
    return torch.sqrt(sum((d.flatten(1) ** 2).sum(1) for d in queries.dense.values()))


def sequence_gradient_norms(captured: dict[str, Captured]) -> torch.Tensor:
    """``(batch,)`` norms of the per-sequence gradients ``G[n]`` over all captured layers."""
    return torch.sqrt(sum((per_sequence_gradients(c).flatten(1) ** 2).sum(1) for c in captured.values()))


# ---- the exact oracle -----------------------------------------------------------------------


def flat_gradients(model: nn.Module, layers: dict[str, LayerSpec], seqs: list[TokenWindow], pad_id: int) -> torch.Tensor:
    """``(len(seqs), D)``: per-sequence gradients of the summed NLL over the tracked layers, by autograd.

    One ``.backward()`` per sequence on a copy of ``model`` (the reference
    the hooks are checked against); layers in ``layers`` order, each
    flattened in the ``(d_out, d_in)`` convention with the bias column last.
    """
    model = copy.deepcopy(model).requires_grad_(True)
    modules = dict(model.named_modules())
    rows = []
    for seq in seqs:
        model.zero_grad(set_to_none=True)
        sequence_losses(model, collate([seq], pad_id)).sum().backward()
        rows.append(torch.cat([weight_gradient(modules[n], spec).flatten() for n, spec in layers.items()]))
    return torch.stack(rows).detach()


def exact_influence(
    model: nn.Module,
    layers: dict[str, LayerSpec],
    train: list[TokenWindow],
    queries: list[TokenWindow],
    pad_id: int,
    damping: float | None = None,
    max_params: int = 20_000,
) -> torch.Tensor:
    """Oracle scores ``(Q, N)``: ``g_q^T (F + diag(lambda))^-1 g_n`` in float64.

    ``F = (1/N) sum_n g_n g_n^T`` is the dense empirical Fisher of all tracked
    parameters (cross-layer blocks included) from the training sequences'
    own labels. ``lambda`` is ``damping`` or, per layer, ``0.1 * mean(diag F_l)``:
    the same number as EK-FAC's ``0.1 * mean(Lambda)`` heuristic, because
    ``sum(Lambda_l) = trace(F_l)`` when both are fitted on these sequences.
    """
    model = copy.deepcopy(model).to(torch.float64)
    sizes = [spec.d_out * spec.d_in for spec in layers.values()]
    total = sum(sizes)
    if total > max_params:
        raise ValueError(
            f"the exact oracle forms a {total}x{total} matrix; {total} tracked parameters exceed "
            f"max_params={max_params}; use a smaller model or fewer tracked layers"
        )
    g_train = flat_gradients(model, layers, train, pad_id)
    g_query = flat_gradients(model, layers, queries, pad_id)
    fisher = g_train.T @ g_train / len(train)
    diag = torch.empty(total, dtype=torch.float64)
    start = 0
    for size in sizes:
        block = fisher.diagonal()[start : start + size]
        diag[start : start + size] = float(damping) if damping is not None else 0.1 * float(block.mean())
        start += size
    solved = torch.linalg.solve(fisher + torch.diag(diag), g_train.T)  # (D, N)
    return g_query @ solved


# ---- kronfluence ----------------------------------------------------------------------------


class KronfluenceUnavailable(RuntimeError):
    """kronfluence is not installed (it is a test-only dependency)."""


def kronfluence_available() -> tuple[bool, str]:
    """Whether kronfluence can be imported, with the reason when it cannot."""
    try:
        import kronfluence  # noqa: F401
    except Exception as exc:  # noqa: BLE001 - any import failure means "not usable here"
        return False, f"kronfluence is not importable ({type(exc).__name__}: {exc}); install it with --no-deps"
    return True, ""


@torch.no_grad()
def replace_conv1d_modules(model: nn.Module) -> nn.Module:
    """GPT-2's ``Conv1D`` layers as equal ``nn.Linear`` layers, under the same names.

    kronfluence tracks only ``nn.Linear``. ``Conv1D`` stores its weight
    ``(d_in, d_out)``; the linear layer gets the transpose and the same bias.
    """
    from transformers.pytorch_utils import Conv1D

    conv_names = [name for name, m in model.named_modules() if isinstance(m, Conv1D)]
    for name in conv_names:
        parent_name, _, attr = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        conv = getattr(parent, attr)
        linear = nn.Linear(conv.weight.shape[0], conv.weight.shape[1], bias=conv.bias is not None,
                           dtype=conv.weight.dtype, device=conv.weight.device)
        linear.weight.copy_(conv.weight.T)
        if conv.bias is not None:
            linear.bias.copy_(conv.bias)
        setattr(parent, attr, linear)
    return model


def kronfluence_pairwise(
    model: nn.Module,
    modules: list[str],
    train: list[TokenWindow],
    queries: list[TokenWindow],
    pad_id: int,
    damping: float | None = None,
    empirical_fisher: bool = False,
    precision: str = "float32",
    device: str = "cpu",
    train_batch_size: int = 8,
    query_batch_size: int = 8,
    seed: int = 0,
    fit_train: list[TokenWindow] | None = None,
) -> tuple[torch.Tensor, dict]:
    """kronfluence's EK-FAC pairwise scores ``(Q, N)`` against ``train``; plus fit/score seconds.

    The factors are fitted on ``fit_train`` (default: ``train``): a subset there
    stands for kronfluence's ``covariance_max_examples`` / ``lambda_max_examples``
    caps, which fit both passes on a dataset's first examples.

    Same conventions as ours: summed NLL train loss (labels sampled from the
    model unless ``empirical_fisher``), summed query NLL as the measurement,
    ``damping=None`` for kronfluence's ``0.1 * mean(Lambda)``. kronfluence is a
    test/benchmark-only dependency; ``KronfluenceUnavailable`` when missing.
    """
    ok, reason = kronfluence_available()
    if not ok:
        raise KronfluenceUnavailable(reason)
    from kronfluence.analyzer import Analyzer, prepare_model
    from kronfluence.arguments import FactorArguments, ScoreArguments
    from kronfluence.task import Task
    from kronfluence.utils.dataset import DataLoaderKwargs

    dtype = torch.float64 if precision == "float64" else torch.float32
    generator = torch.Generator(device=device).manual_seed(seed)

    class _LMTask(Task):
        def compute_train_loss(self, batch, model, sample: bool = False) -> torch.Tensor:
            logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                           position_ids=position_ids(batch["attention_mask"])).logits[:, :-1]
            labels = batch["labels"][:, 1:]
            if sample:
                with torch.no_grad():  # our sampler on both sides: the comparison is of the engines
                    probs = torch.softmax(logits.detach().float(), dim=-1).reshape(-1, logits.shape[-1])
                    u = torch.rand(probs.shape[0], 1, generator=generator, dtype=torch.float64, device=probs.device)
                    drawn = draw_tokens(probs, u).view_as(labels)
                labels = torch.where(labels == IGNORE, labels, drawn)
            return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1),
                                   ignore_index=IGNORE, reduction="sum")

        def compute_measurement(self, batch, model) -> torch.Tensor:
            return self.compute_train_loss(batch, model, sample=False)

        def get_influence_tracked_modules(self) -> list[str]:
            return list(modules)

        def get_attention_mask(self, batch):
            return batch["attention_mask"]

    class _Rows(torch.utils.data.Dataset):
        def __init__(self, seqs):
            self.seqs = seqs

        def __len__(self):
            return len(self.seqs)

        def __getitem__(self, i):
            return self.seqs[i]

    def to_dict(seqs):
        b = collate(seqs, pad_id)
        return {"input_ids": b.input_ids, "attention_mask": b.attention_mask, "labels": b.labels}

    task = _LMTask()
    model = prepare_model(replace_conv1d_modules(copy.deepcopy(model)).to(device=device, dtype=dtype), task)
    with tempfile.TemporaryDirectory(prefix="kronfluence-") as out_dir:
        analyzer = Analyzer("baseline", model, task, cpu=device == "cpu", disable_tqdm=True, output_dir=out_dir)
        analyzer.set_dataloader_kwargs(DataLoaderKwargs(num_workers=0, collate_fn=to_dict))
        factor_args = FactorArguments(
            strategy="ekfac", use_empirical_fisher=empirical_fisher, amp_dtype=None,
            activation_covariance_dtype=dtype, gradient_covariance_dtype=dtype, eigendecomposition_dtype=torch.float64,
            per_sample_gradient_dtype=dtype, lambda_dtype=dtype,
        )
        started = time.perf_counter()
        fit_rows = _Rows(train if fit_train is None else fit_train)
        analyzer.fit_all_factors("ekfac", fit_rows, per_device_batch_size=train_batch_size, factor_args=factor_args)
        fit_s = time.perf_counter() - started
        score_args = ScoreArguments(damping_factor=damping, score_dtype=dtype, per_sample_gradient_dtype=dtype,
                                    precondition_dtype=dtype)
        started = time.perf_counter()
        analyzer.compute_pairwise_scores("scores", "ekfac", _Rows(queries), _Rows(train),
                                         per_device_query_batch_size=query_batch_size,
                                         per_device_train_batch_size=train_batch_size, score_args=score_args)
        scores = analyzer.load_pairwise_scores("scores")["all_modules"].to("cpu", torch.float64)
        score_s = time.perf_counter() - started
    return scores, {"fit_s": fit_s, "score_s": score_s}
