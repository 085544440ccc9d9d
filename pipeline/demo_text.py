"""The demo's text: prose sentences from Python's bundled docs, filler documents, invented facts.

Everything here is deterministic given a ``random.Random`` and the text that
ships with Python (``pydoc_data.topics``); ``source_text_fingerprint`` names
that text, so a different Python's documentation makes a different demo.
``pipeline.demo`` builds the corpus from these pieces and trains on it;
``benchmarks.smollm2_facts`` reuses the sentences and invented words.
"""

from __future__ import annotations

import hashlib
import json
import random
import re
from pathlib import Path
from typing import TYPE_CHECKING

import pyarrow as pa
import pyarrow.parquet as pq

if TYPE_CHECKING:
    from pipeline.demo import DemoSpec

# The demo tokenizer's one special token (end of text, also BOS, PAD and UNK); prose containing it is dropped.
EOS_TOKEN = "<|endoftext|>"

# Rough characters per token of a 512-entry byte-level BPE on English prose;
# only used to aim filler documents at token lengths before the tokenizer
# exists. Actual token lengths are logged after tokenization.
_CHARS_PER_TOKEN_ESTIMATE = 2.3

# Share of filler documents longer than one window (up to 3 windows), so that
# the windowing of long documents is exercised by the pipeline.
_LONG_DOC_FRACTION = 0.3

# Relations for planted facts: (prompt template, completion template). The
# subject and object are invented words, so the fact is unambiguous and
# cannot be learned from the filler.
_RELATIONS = (
    ("The capital of {s} is", " {o}."),
    ("The river {s} flows into the sea at", " {o}."),
    ("The first king of {s} was", " {o}."),
    ("The national bird of {s} is called the", " {o}."),
)

_ONSETS = ("b", "br", "d", "dr", "f", "g", "gr", "k", "l", "m", "n", "p", "qu",
           "r", "s", "st", "t", "tr", "v", "z", "th", "sh")
_VOWELS = ("a", "e", "i", "o", "u", "ai", "ou")
_CODAS = ("", "", "", "n", "r", "l", "m", "s")
_SUBJECT_SUFFIXES = ("ia", "or", "and", "istan", "ora", "ene")
_OBJECT_SUFFIXES = ("", "", "mont", "ford", "dale", "mar", "heim", "wick")


def source_text_fingerprint() -> str:
    from pydoc_data.topics import topics

    h = hashlib.sha256()
    for key in sorted(topics):
        h.update(key.encode())
        h.update(topics[key].encode())
    return h.hexdigest()[:16]


def english_sentences() -> list[str]:
    """Prose sentences of Python's bundled documentation, in a fixed order.

    Code examples, tables and headings are dropped: a sentence must start
    with a capital, end with punctuation and be mostly letters.
    """
    from pydoc_data.topics import topics

    sentences = []
    for key in sorted(topics):
        for paragraph in re.split(r"\n\s*\n", topics[key]):
            if ">>>" in paragraph:
                continue
            text = " ".join(line.strip() for line in paragraph.splitlines())
            for sentence in re.split(r"(?<=[.!?])\s+(?=[A-Z\"])", text):
                sentence = sentence.strip()
                if not 30 <= len(sentence) <= 300:
                    continue
                if not sentence[0].isupper() or sentence[-1] not in ".!?":
                    continue
                if sum(c.isalpha() or c == " " for c in sentence) < 0.85 * len(sentence):
                    continue
                if re.search(r"[*=\-+]{3,}", sentence) or EOS_TOKEN in sentence:
                    continue
                sentences.append(sentence)
    if not sentences:
        raise RuntimeError("pydoc_data.topics yielded no prose sentences; cannot build the demo corpus")
    return sentences


class SentencePool:
    """Hands out sentences without repetition until the pool runs dry, then reshuffles."""

    def __init__(self, sentences: list[str], rng: random.Random) -> None:
        self._sentences = list(sentences)
        self._rng = rng
        self._next = 0

    def take(self) -> str:
        if self._next == len(self._sentences):
            self._rng.shuffle(self._sentences)
            self._next = 0
        sentence = self._sentences[self._next]
        self._next += 1
        return sentence


def filler_documents(spec: DemoSpec, pool: SentencePool, rng: random.Random) -> list[dict]:
    docs = []
    for i in range(spec.n_filler_docs):
        long = rng.random() < _LONG_DOC_FRACTION
        if long:
            target_tokens = rng.randint(spec.window + 1, 3 * spec.window)
        else:
            target_tokens = rng.randint(spec.window // 4, spec.window)
        target_chars = target_tokens * _CHARS_PER_TOKEN_ESTIMATE
        sentences = [pool.take()]
        n_chars = len(sentences[0])
        while n_chars < target_chars:
            sentence = pool.take()
            # Short documents stop before the sentence that would overshoot,
            # so they stay within one window; long ones fill up to the target.
            if not long and n_chars + 1 + len(sentence) > target_chars:
                break
            sentences.append(sentence)
            n_chars += 1 + len(sentence)
        docs.append({"id": f"doc-{i:06d}", "text": " ".join(sentences), "is_planted_for": ""})
    return docs


def invent_word(rng: random.Random, syllables: int) -> str:
    parts = [rng.choice(_ONSETS) + rng.choice(_VOWELS) + rng.choice(_CODAS) for _ in range(syllables)]
    return "".join(parts)


def invent_facts(n_facts: int, rng: random.Random, forbidden: str) -> list[dict]:
    """Facts about invented subjects and objects that never occur in the filler."""
    used: set[str] = set()

    def fresh(make) -> str:
        for _ in range(10_000):
            word = make().capitalize()
            # Distinct 4-letter stems keep completions from sharing their first tokens.
            stem = word[:4].lower()
            if word.lower() not in forbidden and stem not in used:
                used.add(stem)
                return word
        raise RuntimeError("could not invent enough distinct names for the demo facts")

    facts = []
    for i in range(n_facts):
        subject = fresh(lambda: invent_word(rng, rng.randint(1, 2)) + rng.choice(_SUBJECT_SUFFIXES))
        obj = fresh(lambda: invent_word(rng, 2) + rng.choice(_OBJECT_SUFFIXES))
        prompt_template, completion_template = _RELATIONS[i % len(_RELATIONS)]
        facts.append({
            "fact_id": f"fact-{i:02d}",
            "prompt": prompt_template.format(s=subject),
            "completion": completion_template.format(o=obj),
        })
    return facts


def planted_documents(spec: DemoSpec, facts: list[dict], pool: SentencePool,
                       rng: random.Random) -> list[dict]:
    """Each copy is the fact sentence verbatim inside one to three filler sentences."""
    docs = []
    for i, fact in enumerate(facts):
        copies = spec.copies_for(i)
        fact["copies"] = copies
        fact["gold_doc_ids"] = []
        statement = fact["prompt"] + fact["completion"]
        for c in range(copies):
            before = [pool.take() for _ in range(rng.randint(0, 2))]
            after = [pool.take() for _ in range(rng.randint(1 if not before else 0, 1))]
            doc_id = f"{fact['fact_id']}-copy-{c}"
            fact["gold_doc_ids"].append(doc_id)
            docs.append({"id": doc_id, "text": " ".join(before + [statement] + after),
                         "is_planted_for": fact["fact_id"]})
    return docs


def write_corpus(path: Path, docs: list[dict]) -> None:
    table = pa.table(
        {name: pa.array([d[name] for d in docs], type=pa.string())
         for name in ("id", "text", "is_planted_for")}
    )
    pq.write_table(table, path)


def write_queries(path: Path, facts: list[dict]) -> None:
    with path.open("w") as f:
        for fact in facts:
            f.write(json.dumps({"id": fact["fact_id"], "prompt": fact["prompt"],
                                "completion": fact["completion"]}) + "\n")
