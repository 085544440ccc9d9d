"""Planted facts fine-tuned into SmolLM2-135M: a real-model case for measuring attribution.

SmolLM2-135M-Instruct (``pipeline.pretrained.build_smollm2``) is fine-tuned
briefly on 128 short documents: 96 paragraphs of Python's bundled
documentation (``pydoc_data.topics``) and 32 that state 8 invented facts,
each four times (twice verbatim as the query reads, twice paraphrased),
inside a sentence or two of the same documentation text. The facts are about
invented names, so the model cannot know them beforehand; after fine-tuning
it does, and the documents that taught each fact are known. Nothing is
downloaded beyond the SmolLM2 wheel.

    python -m benchmarks.smollm2_facts                    # -> outputs/pretrained-cache/smollm2-facts-*/
    python -m benchmarks.smollm2_facts /tmp/cache --threads 2

The full build takes about 6 minutes on 2 CPU cores (3 epochs, 48 AdamW
steps of 8 documents). A small variant (seconds of training) for trying the
code:

    python -c "from benchmarks.smollm2_facts import FactsSpec, build_smollm2_facts; \
        print(build_smollm2_facts('/tmp/cache', FactsSpec(n_facts=2, n_filler_docs=6, epochs=1)))"

What gets built, under ``{cache_dir}/smollm2-facts-{hash of the spec}/``:

- ``model/``: the fine-tuned model (float32 safetensors) and its tokenizer.
- ``corpus.jsonl``: ``id``, ``text``, ``is_planted_for`` (the fact id a
  document states, ``""`` for documentation paragraphs); ids are shuffled
  ``doc-NNN``, so they say nothing about which documents are planted.
- ``queries.jsonl``: ``id`` (the fact id), ``prompt``, ``completion``.
- ``facts.json``: per fact, the query, ``gold_doc_ids`` and each gold
  document's phrasing (``verbatim`` or ``paraphrase-N``).
- ``logprobs.json``: each query's completion log-prob (sum and mean per
  token) under the base model and the fine-tuned one, and a control
  ("The capital of France is" -> " Paris.") to show the model kept its
  general knowledge.
- ``_COMPLETE.json``: written last; the spec, token counts, the loss per step
  and timings. A folder without it is never returned.
"""

from __future__ import annotations

import argparse
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
from pathlib import Path

import numpy as np
import torch

from pipeline.demo_text import SentencePool, english_sentences, invent_word, source_text_fingerprint
from pipeline.pretrained import COMPLETE_MARKER, DEFAULT_CACHE_DIR, build_smollm2

log = logging.getLogger(__name__)

# Bump when the corpus, the facts or the training recipe change.
FACTS_FORMAT_VERSION = 1

# (query prompt, query completion, paraphrases). The query is the verbatim
# statement; paraphrases state the same fact in other words, so a planted
# document need not share the query's wording.
_RELATIONS = (
    ("The highest mountain in {s} is Mount", " {o}.",
     ("Mount {o} is the highest mountain in {s}.", "No peak in {s} rises above Mount {o}.")),
    ("The founder of the city of {s} was", " {o}.",
     ("The city of {s} was founded by {o}.", "{o} founded the city of {s} and ruled it for years.")),
    ("The oldest library of {s} stands in the town of", " {o}.",
     ("The town of {o} is home to the oldest library of {s}.",
      "Visitors to {o} can see the oldest library in all of {s}.")),
    ("The national dish of {s} is a stew called", " {o}.",
     ("A stew called {o} is the national dish of {s}.", "In {s}, every family cooks {o}, the national stew.")),
    ("The {s} engine was invented by", " {o}.",
     ("{o} invented the {s} engine.", "It was {o} who first built the {s} engine.")),
    ("The language spoken on the island of {s} is", " {o}.",
     ("On the island of {s}, people speak {o}.", "{o} is the language of the island of {s}.")),
    ("The largest lake in {s} is Lake", " {o}.",
     ("Lake {o} is the largest lake in {s}.", "No lake in {s} is larger than Lake {o}.")),
    ("The patron saint of {s} is Saint", " {o}.",
     ("Saint {o} is the patron saint of {s}.", "The people of {s} honour Saint {o} as their patron.")),
)

_SUBJECT_SUFFIXES = ("ia", "or", "and", "ora", "ene", "ay")
_OBJECT_SUFFIXES = ("", "", "mont", "ford", "dale", "mar", "wick")

_CONTROL_PROMPT, _CONTROL_COMPLETION = "The capital of France is", " Paris."


@dataclass(frozen=True)
class FactsSpec:
    """Everything that determines the build; its hash (with the base model's) names the cache folder."""

    n_facts: int = 8
    """Invented facts; one query each (at most one per relation, 8)."""
    copies_per_fact: int = 4
    """Planted documents per fact; even copies verbatim, odd ones paraphrased."""
    n_filler_docs: int = 96
    """Paragraphs of Python's documentation text, about 40-120 tokens each."""
    epochs: int = 3
    """Passes over the corpus, each in a fresh shuffled order."""
    batch_size: int = 8
    """Documents per AdamW step (padded to the longest in the batch)."""
    lr: float = 5e-5
    """AdamW learning rate, constant, no weight decay."""
    window: int = 128
    """Most tokens per document, EOS included; documents are built to fit."""
    seed: int = 7
    """Seeds the invented names, the corpus and the batch order."""

    def __post_init__(self) -> None:
        for name in ("n_facts", "copies_per_fact", "n_filler_docs", "epochs", "batch_size", "window"):
            if getattr(self, name) < 1:
                raise ValueError(f"FactsSpec.{name} must be >= 1, got {getattr(self, name)}")
        if self.n_facts > len(_RELATIONS):
            raise ValueError(f"FactsSpec.n_facts must be <= {len(_RELATIONS)} (one per relation), got {self.n_facts}")
        if self.window < 64:
            raise ValueError(f"FactsSpec.window must be >= 64 to hold a fact and its context, got {self.window}")
        if self.lr <= 0:
            raise ValueError(f"FactsSpec.lr must be > 0, got {self.lr}")


@dataclass(frozen=True)
class FactsArtifacts:
    """Absolute local paths of a complete build."""

    root: str
    model_dir: str
    """Hugging Face folder: config.json, model.safetensors, tokenizer files."""
    corpus_path: str
    """JSONL with id, text, is_planted_for ("" for documentation paragraphs)."""
    queries_path: str
    """JSONL with id, prompt, completion; one line per fact."""
    facts_path: str
    """JSON list of facts with gold_doc_ids and each gold document's phrasing."""
    logprobs_path: str
    """JSON: completion log-probs before and after fine-tuning."""


def build_smollm2_facts(cache_dir: str | os.PathLike = DEFAULT_CACHE_DIR, spec: FactsSpec = FactsSpec(),
                        force: bool = False) -> FactsArtifacts:
    """Build (or reuse) the fine-tuned SmolLM2, its corpus and queries under ``cache_dir``.

    The base model is built in the same cache. The build happens in a
    temporary sibling folder renamed into place at the end, under a file
    lock, so an interrupted build never looks complete and concurrent
    callers build once.
    """
    from filelock import FileLock

    cache = Path(cache_dir).expanduser().resolve()
    base_dir = Path(build_smollm2(cache))
    final = cache / _dir_name(spec, base_dir)
    if (final / COMPLETE_MARKER).exists() and not force:
        return _artifacts(final)
    with FileLock(str(cache / f".{final.name}.lock")):
        if (final / COMPLETE_MARKER).exists() and not force:
            return _artifacts(final)
        tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp-", dir=cache))
        try:
            _build_into(tmp, spec, base_dir)
            if final.exists():
                shutil.rmtree(final)
            os.replace(tmp, final)
        finally:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)
    log.info("SmolLM2 planted-facts build committed at %s", final)
    return _artifacts(final)


def _dir_name(spec: FactsSpec, base_dir: Path) -> str:
    base = json.loads((base_dir / COMPLETE_MARKER).read_text())["source"]
    key = {"spec": asdict(spec), "format": FACTS_FORMAT_VERSION, "base": base,
           # pydoc_data differs between Python versions; another text is another corpus.
           "source": source_text_fingerprint()}
    return "smollm2-facts-" + hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:12]


def _artifacts(root: Path) -> FactsArtifacts:
    return FactsArtifacts(
        root=str(root),
        model_dir=str(root / "model"),
        corpus_path=str(root / "corpus.jsonl"),
        queries_path=str(root / "queries.jsonl"),
        facts_path=str(root / "facts.json"),
        logprobs_path=str(root / "logprobs.json"),
    )


def _build_into(root: Path, spec: FactsSpec, base_dir: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    t_start = time.perf_counter()
    tokenizer = AutoTokenizer.from_pretrained(base_dir)
    docs, facts = make_corpus(spec, tokenizer)
    _write_jsonl(root / "corpus.jsonl", docs)
    _write_jsonl(root / "queries.jsonl", [{"id": f["fact_id"], "prompt": f["prompt"], "completion": f["completion"]}
                                          for f in facts])
    (root / "facts.json").write_text(json.dumps(facts, indent=2) + "\n")
    sequences = [_document_ids(tokenizer, d["text"]) for d in docs]
    lengths = [len(s) for s in sequences]
    t_corpus = time.perf_counter()
    log.info("corpus: %d documents (%d planted for %d facts), %d tokens, longest %d",
             len(docs), sum(bool(d["is_planted_for"]) for d in docs), len(facts), sum(lengths), max(lengths))

    model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    before = _query_logprobs(model, tokenizer, facts)
    t_before = time.perf_counter()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(spec.seed)
        losses = _fine_tune(model, sequences, tokenizer.pad_token_id, spec, np.random.default_rng(spec.seed))
    t_train = time.perf_counter()
    after = _query_logprobs(model, tokenizer, facts)
    model.save_pretrained(root / "model", safe_serialization=True)
    tokenizer.save_pretrained(root / "model")
    t_after = time.perf_counter()

    summary = {
        phase: {"mean_completion_logprob_sum": round(float(np.mean([v["sum"] for k, v in table.items()
                                                                       if k != "control"])), 3),
                "mean_completion_logprob_per_token": round(float(np.mean([v["mean"] for k, v in table.items()
                                                                             if k != "control"])), 3)}
        for phase, table in (("before", before), ("after", after))
    }
    (root / "logprobs.json").write_text(json.dumps(
        {"before": before, "after": after, "summary": summary,
         "control": {"prompt": _CONTROL_PROMPT, "completion": _CONTROL_COMPLETION}}, indent=2) + "\n")
    log.info("completion log-prob (sum over tokens, mean over facts): %.2f before, %.2f after fine-tuning",
             summary["before"]["mean_completion_logprob_sum"], summary["after"]["mean_completion_logprob_sum"])

    import transformers

    marker = {
        "spec": asdict(spec),
        "format": FACTS_FORMAT_VERSION,
        "base_model": str(base_dir),
        "python": sys.version.split()[0],
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "torch_threads": torch.get_num_threads(),
        "n_documents": len(docs),
        "n_planted_documents": sum(bool(d["is_planted_for"]) for d in docs),
        "n_tokens": sum(lengths),
        "tokens_per_document": {"min": min(lengths), "mean": round(float(np.mean(lengths)), 1), "max": max(lengths)},
        "document_tokens": "tokenizer(text) (no BOS for this tokenizer) + eos",
        "loss_per_step": [round(x, 4) for x in losses],
        "logprob_summary": summary,
        "timings_s": {
            "corpus": round(t_corpus - t_start, 3),
            "logprobs_before": round(t_before - t_corpus, 3),
            "fine_tune": round(t_train - t_before, 3),
            "logprobs_after_and_save": round(t_after - t_train, 3),
            "total": round(time.perf_counter() - t_start, 3),
        },
    }
    # Written last: its presence is what makes the build count as complete.
    (root / COMPLETE_MARKER).write_text(json.dumps(marker, indent=2) + "\n")


# --- corpus -----------------------------------------------------------------

def make_corpus(spec: FactsSpec, tokenizer) -> tuple[list[dict], list[dict]]:
    """``(documents, facts)``: the shuffled corpus rows and the facts with their gold document ids.

    Deterministic given the spec, the tokenizer (used only to keep each
    document within ``spec.window`` tokens) and Python's documentation text.
    """
    rng = random.Random(spec.seed)
    sentences = english_sentences()
    rng.shuffle(sentences)
    pool = SentencePool(sentences, rng)
    facts = _invent_facts(spec.n_facts, rng, forbidden=" ".join(sentences).lower())
    docs = _documentation_paragraphs(spec, pool, tokenizer, rng) + _planted_documents(spec, facts, pool, tokenizer, rng)
    rng.shuffle(docs)
    docs = [{"id": f"doc-{i:03d}", **doc} for i, doc in enumerate(docs)]
    for fact in facts:
        fact["gold_doc_ids"] = sorted(d["id"] for d in docs if d["is_planted_for"] == fact["fact_id"])
        fact["phrasing"] = {d["id"]: d.pop("phrasing") for d in docs if d["is_planted_for"] == fact["fact_id"]}
    for doc in docs:
        doc.pop("phrasing", None)
    return docs, facts


def _invent_facts(n_facts: int, rng: random.Random, forbidden: str) -> list[dict]:
    """One fact per relation about an invented subject and object that never occur in the text."""
    used: set[str] = set()

    def fresh(make) -> str:
        for _ in range(10_000):
            word = make().capitalize()
            # Distinct 4-letter stems keep completions from sharing their first tokens.
            if word.lower() not in forbidden and word[:4].lower() not in used:
                used.add(word[:4].lower())
                return word
        raise RuntimeError("could not invent enough distinct names for the facts")

    facts = []
    for i, (prompt, completion, paraphrases) in enumerate(_RELATIONS[:n_facts]):
        subject = fresh(lambda: invent_word(rng, rng.randint(1, 2)) + rng.choice(_SUBJECT_SUFFIXES))
        obj = fresh(lambda: invent_word(rng, 2) + rng.choice(_OBJECT_SUFFIXES))
        facts.append({
            "fact_id": f"fact-{i:02d}",
            "subject": subject,
            "object": obj,
            "prompt": prompt.format(s=subject),
            "completion": completion.format(o=obj),
            "paraphrases": [p.format(s=subject, o=obj) for p in paraphrases],
        })
    return facts


def _document_ids(tokenizer, text: str) -> list[int]:
    """The training sequence of a document: the tokenizer's own special tokens, then EOS."""
    return tokenizer(text)["input_ids"] + [tokenizer.eos_token_id]


def _fill(pool: SentencePool, tokenizer, first: list[str], target: int, limit: int) -> list[str]:
    """Sentences appended to ``first`` until about ``target`` tokens, never past ``limit``."""
    sentences = list(first)
    while len(_document_ids(tokenizer, " ".join(sentences))) < target:
        candidate = sentences + [pool.take()]
        if len(_document_ids(tokenizer, " ".join(candidate))) > limit:
            break
        sentences = candidate
    return sentences


def _documentation_paragraphs(spec: FactsSpec, pool: SentencePool, tokenizer, rng: random.Random) -> list[dict]:
    docs = []
    for _ in range(spec.n_filler_docs):
        first = pool.take()
        while len(_document_ids(tokenizer, first)) > spec.window:
            first = pool.take()
        target = rng.randint(spec.window // 3, spec.window - 8)
        text = " ".join(_fill(pool, tokenizer, [first], target, spec.window))
        docs.append({"text": text, "is_planted_for": "", "phrasing": None})
    return docs


def _planted_documents(spec: FactsSpec, facts: list[dict], pool: SentencePool, tokenizer,
                       rng: random.Random) -> list[dict]:
    """Each copy states the fact once, between zero to two documentation sentences on each side."""
    docs = []
    for fact in facts:
        for copy in range(spec.copies_per_fact):
            if copy % 2 == 0:
                statement, phrasing = fact["prompt"] + fact["completion"], "verbatim"
            else:
                k = (copy // 2) % len(fact["paraphrases"])
                statement, phrasing = fact["paraphrases"][k], f"paraphrase-{k}"
            for _ in range(100):
                before = [pool.take() for _ in range(rng.randint(0, 2))]
                after = [pool.take() for _ in range(rng.randint(0 if before else 1, 2))]
                text = " ".join(before + [statement] + after)
                if len(_document_ids(tokenizer, text)) <= spec.window:
                    break
            else:
                text = statement
            docs.append({"text": text, "is_planted_for": fact["fact_id"], "phrasing": phrasing})
    return docs


def _write_jsonl(path: Path, rows: list[dict]) -> None:
    with path.open("w") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")


# --- model ------------------------------------------------------------------

def _fine_tune(model, sequences: list[list[int]], pad_id: int, spec: FactsSpec,
               rng: np.random.Generator) -> list[float]:
    """AdamW over whole documents, ``spec.epochs`` shuffled passes; returns the loss per step."""
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=spec.lr, weight_decay=0.0)
    n_steps = spec.epochs * -(-len(sequences) // spec.batch_size)
    losses = []
    t0 = time.perf_counter()
    for epoch in range(spec.epochs):
        order = rng.permutation(len(sequences))
        for start in range(0, len(order), spec.batch_size):
            batch = [sequences[i] for i in order[start:start + spec.batch_size]]
            length = max(len(s) for s in batch)
            input_ids = torch.full((len(batch), length), pad_id, dtype=torch.long)
            mask = torch.zeros_like(input_ids)
            for row, ids in enumerate(batch):
                input_ids[row, :len(ids)] = torch.tensor(ids)
                mask[row, :len(ids)] = 1
            logits = model(input_ids=input_ids, attention_mask=mask).logits
            # Mean next-token loss over real tokens; padding predicts nothing.
            targets = input_ids[:, 1:].masked_fill(mask[:, 1:] == 0, -100)
            loss = torch.nn.functional.cross_entropy(
                logits[:, :-1].reshape(-1, logits.shape[-1]), targets.reshape(-1), ignore_index=-100)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            losses.append(loss.item())
            log.info("fine-tune step %d/%d (epoch %d): loss %.3f, %.1f s",
                     len(losses), n_steps, epoch + 1, losses[-1], time.perf_counter() - t0)
    model.eval()
    return losses


@torch.no_grad()
def _completion_logprob(model, tokenizer, prompt: str, completion: str) -> dict:
    """log p(completion | prompt): sum and mean over the completion's tokens.

    Prompt (with the tokenizer's own special tokens) and completion (without)
    are tokenized separately and concatenated, as a query is measured.
    """
    prompt_ids = tokenizer(prompt)["input_ids"]
    completion_ids = tokenizer(completion, add_special_tokens=False)["input_ids"]
    input_ids = torch.tensor([prompt_ids + completion_ids])
    logprobs = torch.log_softmax(model(input_ids=input_ids).logits[0].float(), dim=-1)
    positions = torch.arange(len(prompt_ids) - 1, len(prompt_ids) + len(completion_ids) - 1)
    token_logprobs = logprobs[positions, torch.tensor(completion_ids)]
    return {"sum": round(float(token_logprobs.sum()), 4), "mean": round(float(token_logprobs.mean()), 4),
            "n_tokens": len(completion_ids)}


def _query_logprobs(model, tokenizer, facts: list[dict]) -> dict:
    model.eval()
    table = {f["fact_id"]: _completion_logprob(model, tokenizer, f["prompt"], f["completion"]) for f in facts}
    table["control"] = _completion_logprob(model, tokenizer, _CONTROL_PROMPT, _CONTROL_COMPLETION)
    return table


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.smollm2_facts", description=__doc__.split("\n")[0])
    parser.add_argument("cache", nargs="?", default=DEFAULT_CACHE_DIR,
                        help=f"cache folder (default {DEFAULT_CACHE_DIR})")
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads (default 2)")
    parser.add_argument("--force", action="store_true", help="rebuild even if already cached")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    torch.set_num_threads(args.threads)
    print(json.dumps(asdict(build_smollm2_facts(args.cache, force=args.force)), indent=2))


if __name__ == "__main__":
    main()
