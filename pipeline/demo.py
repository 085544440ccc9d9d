"""The embedded demo: a tiny GPT-2, its corpus with planted facts, and queries.

The main job runs on this when given no overrides, so a user can watch
attribution work in a couple of minutes on a laptop, and tests can measure
whether the documents that taught the model a fact come out as its top
proponents. Everything is built locally from configuration and from English
text that ships with Python (``pydoc_data.topics``, cut into documents and
invented facts by ``pipeline.demo_text``); nothing is downloaded.

    python -c "from pipeline.demo import build_demo; print(build_demo('/tmp/demo-cache'))"

A CPU-sized smoke variant (a few seconds):

    python -c "from pipeline.demo import DemoSpec, build_demo; \
        print(build_demo('/tmp/demo-cache', DemoSpec(n_filler_docs=60, n_facts=4, train_steps=30)))"

What gets built, under ``{cache_dir}/demo-{hash of the spec}/``:

- ``model/``: a Hugging Face directory (GPT-2 config, safetensors weights, a
  byte-level BPE tokenizer trained on the corpus, eos = pad = ``<|endoftext|>``).
- ``corpus.parquet``: columns ``id``, ``text``, ``is_planted_for`` (the fact id
  a planted document teaches, ``""`` for filler).
- ``queries.jsonl``: one ``{"id", "prompt", "completion"}`` per fact; the query
  id is the fact id, so ``is_planted_for`` joins queries to their gold documents.
- ``facts.json``: per fact, the prompt, completion, gold document ids, number of
  copies, and whether the trained model learned it.
- ``_COMPLETE.json``: written last; the spec, the loss curve and timings. A
  folder without it is never returned.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import random
import shutil
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch

from pipeline.core.text import Batch
from pipeline.demo_text import (EOS_TOKEN, SentencePool, english_sentences, filler_documents, invent_facts,
                                planted_documents, source_text_fingerprint, write_corpus, write_queries)
from pipeline.tiny_lm import new_gpt2, train

logger = logging.getLogger(__name__)

# Bump when the generated corpus, tokenizer or training recipe changes, so old
# caches are not mistaken for the new demo.
DEMO_FORMAT_VERSION = 1

COMPLETE_MARKER = "_COMPLETE.json"

@dataclass(frozen=True)
class DemoSpec:
    """Everything that determines the demo; its hash names the cache folder."""

    n_filler_docs: int = 600
    """Background documents, cut from Python's bundled documentation text."""
    n_facts: int = 12
    """Planted synthetic facts; one query per fact."""
    copies_per_fact: tuple[int, ...] = (1, 2, 4, 8)
    """Planted documents per fact, cycled: fact i gets ``copies_per_fact[i % len]``."""
    vocab_size: int = 512
    """Byte-level BPE vocabulary size (at least 257 + 1: 256 bytes and eos)."""
    n_layer: int = 2
    """GPT-2 transformer blocks."""
    n_embd: int = 128
    """GPT-2 hidden width."""
    n_head: int = 4
    """Attention heads; must divide ``n_embd``."""
    n_positions: int = 128
    """Maximum sequence length of the model; at least ``window``."""
    train_steps: int = 1000
    """AdamW steps. About 16 passes over the default corpus: enough for facts with
    four or more copies to be learned, in well under a minute on 2 cores."""
    batch_size: int = 16
    """Windows per training step."""
    window: int = 64
    """Tokens per training window (random slices of the eos-joined corpus)."""
    lr: float = 3e-3
    """Peak learning rate (linear warm-up, cosine decay to a tenth)."""
    seed: int = 0
    """Seeds the corpus, the invented names, the model init and the batches."""

    def __post_init__(self) -> None:
        # Hydra and JSON hand over lists; keep the spec hashable.
        object.__setattr__(self, "copies_per_fact", tuple(int(c) for c in self.copies_per_fact))
        for name in ("n_facts", "vocab_size", "n_layer", "n_embd", "n_head", "n_positions",
                     "train_steps", "batch_size", "window"):
            if getattr(self, name) < 1:
                raise ValueError(f"DemoSpec.{name} must be >= 1, got {getattr(self, name)}")
        if self.n_filler_docs < 2:
            raise ValueError(f"DemoSpec.n_filler_docs must be >= 2, got {self.n_filler_docs}")
        if not self.copies_per_fact or min(self.copies_per_fact) < 1:
            raise ValueError(
                f"DemoSpec.copies_per_fact must be a non-empty tuple of positive counts, "
                f"got {self.copies_per_fact}")
        if self.vocab_size < 258:
            raise ValueError(
                f"DemoSpec.vocab_size must be >= 258 (256 bytes + eos + one merge), got {self.vocab_size}")
        if self.n_embd % self.n_head:
            raise ValueError(f"DemoSpec.n_embd ({self.n_embd}) must be divisible by n_head ({self.n_head})")
        if self.window > self.n_positions:
            raise ValueError(
                f"DemoSpec.window ({self.window}) must be <= n_positions ({self.n_positions})")
        if self.lr <= 0:
            raise ValueError(f"DemoSpec.lr must be > 0, got {self.lr}")

    def copies_for(self, fact_index: int) -> int:
        """Planted documents for fact ``fact_index``."""
        return self.copies_per_fact[fact_index % len(self.copies_per_fact)]


@dataclass(frozen=True)
class DemoArtifacts:
    """Absolute local paths of a complete demo build."""

    model_dir: str
    """Hugging Face directory: config.json, model.safetensors, tokenizer files."""
    corpus_path: str
    """Parquet with columns id, text, is_planted_for ("" for filler)."""
    queries_path: str
    """JSONL with id, prompt, completion; one line per fact."""
    facts_path: str
    """JSON list of facts with gold_doc_ids, copies, learned, completion_logprob."""


def demo_dir_name(spec: DemoSpec) -> str:
    """``demo-{hash}``: a short hash of the spec, the format version and the source text."""
    key = {
        "spec": asdict(spec),
        "format": DEMO_FORMAT_VERSION,
        # pydoc_data differs between Python versions; a different text is a different demo.
        "source": source_text_fingerprint(),
    }
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()
    return f"demo-{digest[:12]}"


def build_demo(cache_dir: str | os.PathLike, spec: DemoSpec = DemoSpec(), force: bool = False) -> DemoArtifacts:
    """Build (or reuse) the demo model, corpus and queries under ``cache_dir``.

    ``cache_dir`` is a local folder (Hugging Face loaders need local files).
    A complete build is marked by ``_COMPLETE.json`` and returned as is unless
    ``force``. The build happens in a temporary sibling folder that is renamed
    into place at the end, so an interrupted build never looks complete.
    """
    cache = Path(cache_dir).expanduser().resolve()
    final = cache / demo_dir_name(spec)
    if (final / COMPLETE_MARKER).exists() and not force:
        logger.info("demo already built, reusing %s", final)
        return _artifacts(final)

    cache.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp-", dir=cache))
    # mkdtemp makes the folder private (0700); the demo should be as readable
    # as any folder the user creates, e.g. by workers running as another user.
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o777 & ~umask)
    try:
        _build_into(tmp, spec)
        _move_into_place(tmp, final)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    logger.info("demo committed at %s", final)
    return _artifacts(final)


def _artifacts(root: Path) -> DemoArtifacts:
    return DemoArtifacts(
        model_dir=str(root / "model"),
        corpus_path=str(root / "corpus.parquet"),
        queries_path=str(root / "queries.jsonl"),
        facts_path=str(root / "facts.json"),
    )


def _move_into_place(tmp: Path, final: Path) -> None:
    """Rename the finished build onto ``final``; an older build there is replaced."""
    if final.exists():
        # os.replace cannot overwrite a non-empty folder: move the old one aside first.
        old = final.with_name(f".{final.name}.old-{os.getpid()}-{time.time_ns()}")
        try:
            os.replace(final, old)
        except FileNotFoundError:
            old = None
        try:
            os.replace(tmp, final)
        finally:
            if old is not None:
                shutil.rmtree(old, ignore_errors=True)
        return
    try:
        os.replace(tmp, final)
    except OSError:
        # Another process committed the same demo meanwhile; theirs is as good as ours.
        if not (final / COMPLETE_MARKER).exists():
            raise
        logger.info("demo was committed concurrently at %s; discarding this build", final)


def _build_into(root: Path, spec: DemoSpec) -> None:
    t_start = time.perf_counter()
    rng = random.Random(spec.seed)
    np_rng = np.random.default_rng(spec.seed)

    sentences = english_sentences()
    rng.shuffle(sentences)
    sentence_pool = SentencePool(sentences, rng)
    filler = filler_documents(spec, sentence_pool, rng)
    facts = invent_facts(spec.n_facts, rng, forbidden=" ".join(sentences).lower())
    planted = planted_documents(spec, facts, sentence_pool, rng)

    docs = filler + planted
    rng.shuffle(docs)
    write_corpus(root / "corpus.parquet", docs)
    write_queries(root / "queries.jsonl", facts)
    t_corpus = time.perf_counter()
    logger.info("demo corpus: %d filler + %d planted documents for %d facts (%.1f s)",
                len(filler), len(planted), len(facts), t_corpus - t_start)

    model_dir = root / "model"
    tokenizer = _train_tokenizer([d["text"] for d in docs], spec.vocab_size)
    tokenizer.save_pretrained(model_dir)
    t_tokenizer = time.perf_counter()

    doc_ids = tokenizer([d["text"] for d in docs], add_special_tokens=False)["input_ids"]
    lengths = np.array([len(ids) for ids in doc_ids])
    logger.info("demo tokens: %d in total, %.0f per document on average, %d documents longer "
                "than the %d-token window (longest %d)",
                lengths.sum(), lengths.mean(), int((lengths > spec.window).sum()), spec.window,
                lengths.max())
    stream = _eos_joined(doc_ids, tokenizer.eos_token_id)

    model = new_gpt2(len(tokenizer), n_embd=spec.n_embd, n_layer=spec.n_layer, n_head=spec.n_head,
                     n_positions=spec.n_positions, eos_id=tokenizer.eos_token_id, pad_id=tokenizer.pad_token_id,
                     seed=spec.seed)
    loss_curve = train(model, _stream_slices(stream, spec, np_rng), steps=spec.train_steps, lr=spec.lr,
                       log_every=50, label="demo")
    model.save_pretrained(model_dir, safe_serialization=True)
    t_train = time.perf_counter()

    for fact, verdict in zip(facts, _learned_facts(model, tokenizer, facts)):
        fact.update(verdict)
    (root / "facts.json").write_text(json.dumps(facts, indent=2) + "\n")
    t_eval = time.perf_counter()

    learned_by_copies = {}
    for fact in facts:
        n_learned, n_total = learned_by_copies.get(fact["copies"], (0, 0))
        learned_by_copies[fact["copies"]] = (n_learned + fact["learned"], n_total + 1)
    summary = ", ".join(f"{c} copies: {k}/{n}" for c, (k, n) in sorted(learned_by_copies.items()))
    logger.info("demo facts learned: %s", summary)

    marker = {
        "spec": asdict(spec),
        "format": DEMO_FORMAT_VERSION,
        "python": sys.version.split()[0],
        "torch": torch.__version__,
        "n_documents": len(docs),
        "n_planted_documents": len(planted),
        "n_tokens": int(lengths.sum()),
        "n_documents_longer_than_window": int((lengths > spec.window).sum()),
        "loss": _loss_summary(loss_curve),
        "learned_by_copies": {str(c): {"learned": k, "facts": n}
                              for c, (k, n) in sorted(learned_by_copies.items())},
        "timings_s": {
            "corpus": round(t_corpus - t_start, 3),
            "tokenizer": round(t_tokenizer - t_corpus, 3),
            "train": round(t_train - t_tokenizer, 3),
            "evaluate": round(t_eval - t_train, 3),
            "total": round(time.perf_counter() - t_start, 3),
        },
    }
    # Written last: its presence is what makes the build count as complete.
    (root / COMPLETE_MARKER).write_text(json.dumps(marker, indent=2) + "\n")


# --- tokenizer and model ----------------------------------------------------

def _train_tokenizer(texts: list[str], vocab_size: int):
    """A GPT-2-style byte-level BPE trained on the demo corpus itself."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOS_TOKEN],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    bpe.train_from_iterator(texts, trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=bpe,
        eos_token=EOS_TOKEN,
        bos_token=EOS_TOKEN,
        unk_token=EOS_TOKEN,
        pad_token=EOS_TOKEN,
    )


def _eos_joined(doc_ids: list[list[int]], eos_id: int) -> np.ndarray:
    """All documents in one token stream, each followed by eos."""
    stream = []
    for ids in doc_ids:
        stream.extend(ids)
        stream.append(eos_id)
    return np.asarray(stream, dtype=np.int64)


def _stream_slices(stream: np.ndarray, spec: DemoSpec, rng: np.random.Generator) -> Iterator[Batch]:
    """``train_steps`` batches of random ``window``-token slices of the stream, every token a target."""
    if len(stream) <= spec.window:
        raise ValueError(
            f"demo corpus has {len(stream)} tokens, fewer than one window of {spec.window}; "
            f"raise DemoSpec.n_filler_docs or lower DemoSpec.window")
    tokens = torch.from_numpy(stream)
    offsets_all = rng.integers(0, len(stream) - spec.window, size=(spec.train_steps, spec.batch_size))
    for offsets in offsets_all:
        batch = torch.stack([tokens[o:o + spec.window] for o in offsets])
        yield Batch(batch, torch.ones_like(batch), batch)


def _loss_summary(losses: list[float]) -> dict:
    every = 50
    return {
        "first": round(losses[0], 4),
        "last": round(losses[-1], 4),
        "final_mean_of_last_50": round(float(np.mean(losses[-every:])), 4),
        "mean_per_50_steps": [round(float(np.mean(losses[i:i + every])), 4)
                              for i in range(0, len(losses), every)],
    }


@torch.no_grad()
def _completion_logprobs(model, tokenizer, prompt: str, completions: list[str]) -> list[float]:
    """Mean per-token log p(completion | prompt) for each completion.

    Prompt and completion are tokenized separately and concatenated, as a
    query's measurement does.
    """
    prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    completion_ids = [tokenizer(c, add_special_tokens=False)["input_ids"] for c in completions]
    # A tiny vocabulary can make a query longer than the model's context:
    # keep the prompt's end, which is what the completion depends on most.
    overflow = len(prompt_ids) + max(len(c) for c in completion_ids) - model.config.n_positions
    if overflow > 0:
        prompt_ids = prompt_ids[min(overflow, len(prompt_ids) - 1):]
    length = len(prompt_ids) + max(len(c) for c in completion_ids)
    input_ids = torch.full((len(completions), length), tokenizer.pad_token_id, dtype=torch.long)
    mask = torch.zeros_like(input_ids)
    for row, ids in enumerate(completion_ids):
        full = prompt_ids + ids
        input_ids[row, :len(full)] = torch.tensor(full)
        mask[row, :len(full)] = 1
    logprobs = torch.log_softmax(model(input_ids=input_ids, attention_mask=mask).logits.float(), dim=-1)
    result = []
    for row, ids in enumerate(completion_ids):
        positions = torch.arange(len(prompt_ids) - 1, len(prompt_ids) + len(ids) - 1)
        token_logprobs = logprobs[row, positions, torch.tensor(ids)]
        result.append(float(token_logprobs.mean()))
    return result


def _learned_facts(model, tokenizer, facts: list[dict]) -> list[dict]:
    """Whether the model learned each fact, from the facts x facts table of scores.

    ``scores[i][j]`` is the mean token log-prob of fact j's completion under
    fact i's prompt. A fact counts as learned when its own completion is the
    best of all completions under its prompt (the model would pick it) *and*
    its own prompt is the best of all prompts for its completion (the prompt,
    not just a memorised name, raises it). Margins are over the runner-up
    (None with a single fact).
    """
    completions = [f["completion"] for f in facts]
    scores = np.array([_completion_logprobs(model, tokenizer, f["prompt"], completions) for f in facts])
    result = []
    for i in range(len(facts)):
        others = [j for j in range(len(facts)) if j != i]
        own = float(scores[i, i])
        margin_completion = own - float(scores[i, others].max()) if others else None
        margin_prompt = own - float(scores[others, i].max()) if others else None
        result.append({
            "learned": bool(not others or (margin_completion > 0 and margin_prompt > 0)),
            "completion_logprob": round(own, 4),
            "margin_over_other_completions": None if not others else round(margin_completion, 4),
            "margin_over_other_prompts": None if not others else round(margin_prompt, 4),
        })
    return result
