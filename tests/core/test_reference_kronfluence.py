"""Reference test: our EK-FAC influence against kronfluence (docs/design.md#how-it-is-checked).

With projection off, both implement the same maths (docs/design.md#maths):
``A``/``S`` normalised by the number of unmasked tokens, bias folded in as a
trailing input column of ones, ``Lambda`` averaged over sequences, damping a
fixed value or ``0.1 * mean(Lambda)`` per layer, and
``score(q, n) = <H^-1 grad L_q, grad L_n>`` with summed NLLs. kronfluence's
pairwise score with ``measurement = summed query loss`` and
``train loss = summed NLL`` is exactly that, so with the empirical Fisher in
float64 the two score matrices agree to rounding error. With the sampled
(true) Fisher both sides draw their own random labels, so only rankings are
compared.

kronfluence is a test-only dependency (installed with ``--no-deps``); it
tracks ``nn.Linear`` only, so GPT-2's ``Conv1D`` layers are swapped for
equivalent ``nn.Linear`` modules on kronfluence's copy of the model (module
names stay the same).
"""

from __future__ import annotations

import copy
import dataclasses

import pytest
import torch
import torch.nn.functional as F
from torch import nn

kronfluence = pytest.importorskip("kronfluence")

from kronfluence.analyzer import Analyzer, prepare_model  # noqa: E402
from kronfluence.arguments import FactorArguments, ScoreArguments  # noqa: E402
from kronfluence.task import Task  # noqa: E402
from kronfluence.utils.dataset import DataLoaderKwargs  # noqa: E402

from benchmarks.baselines import replace_conv1d_modules
from pipeline.core.influence import InfluenceConfig, InfluenceEngine  # noqa: E402
from pipeline.core.projection import ProjectionSpec  # noqa: E402
from pipeline.core.text import IGNORE, TokenWindow, batches_of, collate  # noqa: E402
from pipeline.tiny_lm import new_gpt2  # noqa: E402
from tests.helpers import spearman, train_full_batch  # noqa: E402

# Relative Frobenius error ||ours - kronfluence|| / ||kronfluence|| allowed with
# the empirical Fisher in float64. Both sides compute the same float64 quantities
# in a different order; measured 2e-15 .. 2e-14 for GPT-2 and Llama at every
# damping, so 1e-6 leaves a wide margin while a real convention difference is
# far above it (measured on GPT-2: Lambda divided by tokens instead of sequences
# gives 5.3; one global heuristic damping instead of one per layer gives 6.6e-2).
REL_TOL = 1e-6
# Sampled (true) Fisher on both sides: independent label draws, so only ranks
# are compared. Fitting on the training set repeated 4 times with damping 0.1,
# measured Spearman(ours, kronfluence) = 0.980 (GPT-2) and 0.955 (Llama); two of
# our own fits with different seeds agree to 0.947 / 0.951, i.e. the gap is
# sampling noise. (Fitting once with damping 1e-3 gives only 0.80 / 0.83.)
SAMPLED_FIT_REPEATS = 4
SAMPLED_DAMPING = 0.1
SAMPLED_FISHER_MIN_SPEARMAN = 0.9

VOCAB = 64
PAD = 0
NUM_TRAIN = 24
NUM_QUERIES = 4
# Batch sizes (fit, queries, scoring) of the kronfluence runs.
KRON_BATCHING = (8, 4, 8)


# ---- data ---------------------------------------------------------------------------------


def _progression(gen: torch.Generator, length: int) -> list[int]:
    """Token 1.. progressions ``start + k * step (mod 63) + 1``: structured, learnable."""
    start = int(torch.randint(0, VOCAB - 1, (1,), generator=gen))
    step = int(torch.randint(1, 4, (1,), generator=gen))
    return [1 + (start + k * step) % (VOCAB - 1) for k in range(length)]


def make_data(seed: int = 0) -> tuple[list[TokenWindow], list[TokenWindow]]:
    gen = torch.Generator().manual_seed(seed)
    train = []
    for i in range(NUM_TRAIN):
        length = int(torch.randint(5, 17, (1,), generator=gen))
        ids = tuple(_progression(gen, length))
        train.append(TokenWindow(f"doc{i}", 0, ids, ids))
    queries = []
    for i in range(NUM_QUERIES):
        prompt_len = int(torch.randint(3, 7, (1,), generator=gen))
        ids = _progression(gen, prompt_len + 3)
        labels = [IGNORE] * prompt_len + ids[prompt_len:]
        queries.append(TokenWindow(f"q{i}", 0, tuple(ids), tuple(labels)))
    return train, queries


# ---- models -------------------------------------------------------------------------------


def tiny_gpt2(train: list[TokenWindow]) -> nn.Module:
    model = new_gpt2(VOCAB, n_embd=16, n_layer=2, n_head=2, n_positions=32, eos_id=1, pad_id=PAD, seed=0)
    model.set_attn_implementation("eager")
    return train_full_batch(model, train, PAD, steps=40)


def tiny_llama(train: list[TokenWindow]) -> nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=VOCAB, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
        num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=32,
        attention_dropout=0.0, bos_token_id=1, eos_token_id=1, pad_token_id=PAD,
    )
    config._attn_implementation = "eager"
    return train_full_batch(LlamaForCausalLM(config), train, PAD, steps=40)


# ---- kronfluence side ---------------------------------------------------------------------


class _Dataset(torch.utils.data.Dataset):
    def __init__(self, seqs: list[TokenWindow]):
        self.seqs = list(seqs)

    def __len__(self):
        return len(self.seqs)

    def __getitem__(self, i):
        return self.seqs[i]


def _collate_dict(seqs: list[TokenWindow]) -> dict[str, torch.Tensor]:
    """Right padding to the batch's longest sequence, exactly as our ``collate``."""
    batch = collate(seqs, PAD, "right")
    return {"input_ids": batch.input_ids, "attention_mask": batch.attention_mask, "labels": batch.labels}


class LanguageModelingTask(Task):
    """Train loss = summed NLL (sampled labels when ``sample``); measurement = summed query NLL."""

    def __init__(self, modules: list[str], seed: int = 123):
        self.modules = modules
        self.generator = torch.Generator().manual_seed(seed)

    def compute_train_loss(self, batch, model, sample: bool = False) -> torch.Tensor:
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1]
        labels = batch["labels"][:, 1:]
        if sample:
            with torch.no_grad():
                probs = torch.softmax(logits.detach(), dim=-1).reshape(-1, logits.shape[-1])
                sampled = torch.multinomial(probs, 1, generator=self.generator).view_as(labels)
            labels = torch.where(labels == IGNORE, labels, sampled)
        return F.cross_entropy(
            logits.reshape(-1, logits.shape[-1]), labels.reshape(-1), ignore_index=IGNORE, reduction="sum"
        )

    def compute_measurement(self, batch, model) -> torch.Tensor:
        return self.compute_train_loss(batch, model, sample=False)

    def get_influence_tracked_modules(self) -> list[str]:
        return self.modules

    def get_attention_mask(self, batch):
        return batch["attention_mask"]


def kronfluence_scores(
    model: nn.Module,
    modules: list[str],
    fit: list[TokenWindow],
    train: list[TokenWindow],
    queries: list[TokenWindow],
    dampings: list[float | None],
    out_dir,
    empirical_fisher: bool = True,
) -> list[torch.Tensor]:
    """kronfluence EK-FAC pairwise scores ``(Q, N)`` (float64), one matrix per damping.

    Factors are fitted on ``fit``; ``train`` is scored against ``queries``.
    """
    model = replace_conv1d_modules(copy.deepcopy(model)).to(torch.float64)
    task = LanguageModelingTask(modules)
    model = prepare_model(model, task)
    analyzer = Analyzer("reference", model, task, cpu=True, disable_tqdm=True, output_dir=str(out_dir))
    analyzer.set_dataloader_kwargs(DataLoaderKwargs(num_workers=0, collate_fn=_collate_dict))
    factor_args = FactorArguments(
        strategy="ekfac",
        use_empirical_fisher=empirical_fisher,
        amp_dtype=None,
        activation_covariance_dtype=torch.float64,
        gradient_covariance_dtype=torch.float64,
        eigendecomposition_dtype=torch.float64,
        per_sample_gradient_dtype=torch.float64,
        lambda_dtype=torch.float64,
    )
    fit_size, query_size, train_size = KRON_BATCHING
    analyzer.fit_all_factors("ekfac", _Dataset(fit), per_device_batch_size=fit_size, factor_args=factor_args)
    results = []
    for i, damping in enumerate(dampings):
        score_args = ScoreArguments(
            damping_factor=damping,
            score_dtype=torch.float64,
            per_sample_gradient_dtype=torch.float64,
            precondition_dtype=torch.float64,
            query_gradient_svd_dtype=torch.float64,
        )
        analyzer.compute_pairwise_scores(
            f"scores{i}", "ekfac", _Dataset(queries), _Dataset(train),
            per_device_query_batch_size=query_size, per_device_train_batch_size=train_size, score_args=score_args,
        )
        results.append(analyzer.load_pairwise_scores(f"scores{i}")["all_modules"].to(torch.float64))
    return results


# ---- our side -----------------------------------------------------------------------------


def our_scores(
    model: nn.Module,
    fit: list[TokenWindow],
    train: list[TokenWindow],
    queries: list[TokenWindow],
    dampings: list[float | None],
    empirical_fisher: bool = True,
    batching: tuple[int, int, int] = KRON_BATCHING,
) -> tuple[list[torch.Tensor], list[str]]:
    """Our EK-FAC scores transposed to ``(Q, N)``, one matrix per damping; plus the tracked names.

    ``batching``: batch sizes for fitting, queries and scoring.
    """
    fit_size, query_size, train_size = batching
    results = []
    factors, engine = None, None
    for damping in dampings:
        config = InfluenceConfig(
            projection=ProjectionSpec(0), precision="float64", empirical_fisher=empirical_fisher, damping=damping
        )
        engine = InfluenceEngine(copy.deepcopy(model), config)
        if factors is None:
            factors = engine.fit(batches_of(fit, fit_size, PAD))
        q = engine.query_gradients(batches_of(queries, query_size, PAD), factors, [s.doc_id for s in queries])
        scores = torch.cat([engine.score_batch(b, q) for b in batches_of(train, train_size, PAD)], 0)
        results.append(scores.T.to(torch.float64))
    return results, list(engine.layers)


def rel_err(ours: torch.Tensor, ref: torch.Tensor) -> float:
    return float(torch.linalg.norm(ours - ref) / torch.linalg.norm(ref))


# ---- tests --------------------------------------------------------------------------------

DAMPINGS = [1e-3, 1e-1, None]  # None: the 0.1 * mean(Lambda) heuristic on both sides


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def data():
    return make_data()


@pytest.fixture(scope="module")
def gpt2(data):
    return tiny_gpt2(data[0])


@pytest.fixture(scope="module")
def llama(data):
    return tiny_llama(data[0])


def _check_empirical(model, data, tmp_path, label, batching):
    train, queries = data
    ours, names = our_scores(model, train, train, queries, DAMPINGS, batching=batching)
    refs = kronfluence_scores(model, names, train, train, queries, DAMPINGS, tmp_path)
    for damping, o, r in zip(DAMPINGS, ours, refs):
        assert o.shape == r.shape == (NUM_QUERIES, NUM_TRAIN)
        err = rel_err(o, r)
        print(f"{label} damping={damping}: rel. Frobenius error vs kronfluence = {err:.3e}")
        assert torch.isfinite(o).all()
        assert err < REL_TOL, f"{label} damping={damping}: relative error {err:.3e} >= {REL_TOL}"
        # Proponents and opponents agree: same signs wherever the score is not negligible.
        big = r.abs() > 1e-6 * r.abs().max()
        assert torch.equal(torch.sign(o[big]), torch.sign(r[big]))


def test_gpt2_matches_kronfluence_empirical_fisher(gpt2, data, tmp_path):
    # GPT-2 runs fully in float64, so our batching may differ from kronfluence's
    # (other batch sizes, other padding lengths): results must not depend on it.
    _check_empirical(gpt2, data, tmp_path, "gpt2", batching=(5, 3, 7))


def test_llama_matches_kronfluence_empirical_fisher(llama, data, tmp_path):
    # HF Llama computes RMSNorm, rotary angles and eager-attention softmax in
    # float32 even in a float64 model, so its outputs depend on the batch layout
    # at ~1e-7 relative (measured: rel. error 1.1e-6 with batching (5, 3, 7), and
    # the same 1e-6 between two batchings of our own engine). With the same
    # batches on both sides the float32 kernels see identical inputs.
    _check_empirical(llama, data, tmp_path, "llama", batching=KRON_BATCHING)


@pytest.mark.integration
@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_sampled_fisher_rank_agreement(family, data, tmp_path, request):
    """True Fisher on both sides: independent label draws, so compare rankings.

    Fitting on the training set repeated ``SAMPLED_FIT_REPEATS`` times (more
    label draws) and a moderate damping keep the Monte-Carlo noise of the two
    fits small enough that rankings agree closely. As a control, our
    *empirical*-Fisher scores must agree less well with kronfluence's sampled
    ones: that catches a sampled mode that silently used the data labels.
    """
    model = request.getfixturevalue(family)
    train, queries = data
    # Each repeat under its own ids: our labels are drawn per window id (`window_key`), so new ids, new draws.
    fit = [dataclasses.replace(w, doc_id=f"{w.doc_id}/{r}") for r in range(SAMPLED_FIT_REPEATS) for w in train]
    damping = [SAMPLED_DAMPING]
    (ours,), names = our_scores(model, fit, train, queries, damping, empirical_fisher=False)
    (ref,) = kronfluence_scores(model, names, fit, train, queries, damping, tmp_path, empirical_fisher=False)
    (ours_emp,), _ = our_scores(model, fit, train, queries, damping, empirical_fisher=True)
    rho, rho_control = spearman(ours, ref), spearman(ours_emp, ref)
    print(
        f"{family} sampled Fisher: Spearman vs kronfluence = {rho:.4f} (rel. error {rel_err(ours, ref):.3e}); "
        f"control, our empirical vs kronfluence sampled = {rho_control:.4f}"
    )
    assert rho > SAMPLED_FISHER_MIN_SPEARMAN
    assert rho > rho_control
