"""Turning documents and queries into token sequences, and sequences into batches.

Training documents are split into windows of at most ``window_len`` tokens that
overlap by one token, so every token after a document's first is predicted
exactly once and the windows' summed losses add up to the document's loss.
A query is ``prompt + completion``; only completion tokens carry labels.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable
from dataclasses import dataclass

import torch

IGNORE = -100


@dataclass(frozen=True)
class TokenWindow:
    """One scored unit: a token window of a document, or a query.

    ``input_ids`` holds token ids; ``labels`` the same ids where a token is
    predicted and ``IGNORE`` elsewhere (HF convention: ``labels[t]`` is the
    target of position ``t-1``'s prediction). ``doc_id`` and ``window`` (the
    0-based index of the window inside its document; 0 for a query) identify it.
    """

    doc_id: str
    window: int
    input_ids: tuple[int, ...]
    labels: tuple[int, ...]

    @property
    def num_targets(self) -> int:
        return sum(1 for x in self.labels[1:] if x != IGNORE)


class BadInputError(ValueError):
    """Input that cannot be attributed; the message names the item and the fix."""


def split_windows(doc_id: str, token_ids: list[int], window_len: int) -> list[TokenWindow]:
    """Windows of at most ``window_len`` tokens, overlapping by one token.

    A document with fewer than two tokens has nothing to predict and yields no
    window (the caller reports it as skipped).
    """
    if window_len < 2:
        raise ValueError(f"window_len must be >= 2 tokens, got {window_len}")
    stride = window_len - 1
    out = []
    start = 0
    while start + 1 < len(token_ids):
        ids = tuple(token_ids[start : start + window_len])
        out.append(TokenWindow(doc_id, len(out), ids, ids))
        start += stride
    return out


@dataclass(frozen=True)
class Tokenisation:
    """How text becomes tokens, as the model was trained (docs/design.md#tokenisation-and-windows).

    ``add_bos``: a BOS token starts every document and every query's prompt;
    ``add_eos``: an EOS token ends every document (pre-training concatenation).
    Both are part of the factors' and queries' content ids.
    """

    add_bos: bool = False
    add_eos: bool = True

    def to_json(self) -> dict:
        return {"add_bos": self.add_bos, "add_eos": self.add_eos}


def tokenizer_adds_bos(tokenizer) -> bool:
    """Whether the tokenizer puts BOS in front of text for its own model (Llama's do, GPT-2's does not)."""
    bos = tokenizer.bos_token_id
    if bos is None:
        return False
    ids = tokenizer("a", add_special_tokens=True)["input_ids"]
    return bool(ids) and ids[0] == bos


def resolve_tokenisation(tokenizer, add_bos: bool | None, add_eos: bool | None) -> Tokenisation:
    """``corpus.add_bos`` / ``corpus.add_eos`` with ``None`` taken from the tokenizer.

    Defaults: BOS where the tokenizer adds one itself; EOS whenever the tokenizer
    has one. Asking for a token the tokenizer lacks is a ``BadInputError``.
    """
    if add_bos is None:
        add_bos = tokenizer_adds_bos(tokenizer)
    elif add_bos and tokenizer.bos_token_id is None:
        raise BadInputError("corpus.add_bos=true but the tokenizer has no BOS token; set corpus.add_bos=false")
    if add_eos is None:
        add_eos = tokenizer.eos_token_id is not None
    elif add_eos and tokenizer.eos_token_id is None:
        raise BadInputError("corpus.add_eos=true but the tokenizer has no EOS token; set corpus.add_eos=false")
    return Tokenisation(bool(add_bos), bool(add_eos))


def encode_documents(
    tokenizer, docs: list[tuple[str, str]], window_len: int, tokenisation: Tokenisation = Tokenisation()
) -> tuple[list[TokenWindow], list[str]]:
    """Tokenise ``(doc_id, text)`` pairs into windows, with BOS/EOS as ``tokenisation`` says.

    Returns the windows and the ids of documents skipped because their text
    has no tokens (empty documents).
    """
    texts = [text if isinstance(text, str) else "" for _, text in docs]
    encoded = tokenizer(texts, add_special_tokens=False)["input_ids"] if texts else []
    # resolve_tokenisation refuses an asked-for token the tokenizer lacks; the default asks for EOS.
    bos = [tokenizer.bos_token_id] if tokenisation.add_bos and tokenizer.bos_token_id is not None else []
    eos = [tokenizer.eos_token_id] if tokenisation.add_eos and tokenizer.eos_token_id is not None else []
    sequences: list[TokenWindow] = []
    skipped: list[str] = []
    for (doc_id, _), ids in zip(docs, encoded):
        windows = split_windows(doc_id, bos + list(ids) + eos, window_len) if ids else []
        if not windows:
            skipped.append(doc_id)
        sequences.extend(windows)
    return sequences, skipped


def encode_query(
    tokenizer, query_id: str, prompt: str, completion: str, max_tokens: int, tokenisation: Tokenisation = Tokenisation()
) -> TokenWindow:
    """``prompt + completion`` with labels on the completion tokens only.

    With ``tokenisation.add_bos`` the prompt starts with BOS (kept when the
    prompt is truncated from the left to fit ``max_tokens``). An empty
    completion, or one longer than ``max_tokens - 1``, is a ``BadInputError``
    naming the query.
    """
    if not isinstance(completion, str) or not completion:
        raise BadInputError(f"query {query_id!r} has an empty completion; there is nothing to attribute")
    prompt_ids = list(tokenizer(prompt or "", add_special_tokens=False)["input_ids"])
    completion_ids = list(tokenizer(completion, add_special_tokens=False)["input_ids"])
    if not completion_ids:
        raise BadInputError(f"query {query_id!r}: completion {completion!r} tokenises to no tokens")
    start: list[int] = []
    if tokenisation.add_bos:
        start = [tokenizer.bos_token_id]
    elif not prompt_ids:
        # The first token is never predicted; give the completion a start token.
        bos = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
        if bos is None:
            raise BadInputError(f"query {query_id!r} has an empty prompt and the tokenizer has no BOS/EOS token")
        start = [bos]
    if len(completion_ids) + max(1, len(start)) > max_tokens:
        raise BadInputError(
            f"query {query_id!r}: completion is {len(completion_ids)} tokens, more than the "
            f"window of {max_tokens} allows; shorten it or raise corpus.window"
        )
    room = max_tokens - len(completion_ids) - len(start)
    prompt_ids = start + (prompt_ids[-room:] if room > 0 else [])
    ids = tuple(prompt_ids + completion_ids)
    labels = tuple([IGNORE] * len(prompt_ids) + completion_ids)
    return TokenWindow(query_id, 0, ids, labels)


def window_key(doc_id: str, window: int) -> int:
    """A stable 63-bit key of a document's window: it seeds the window's sampled labels (true Fisher).

    From the ids alone, so a window draws the same labels whatever batch, shard
    or fit unit it lands in, and in any batch order.
    """
    digest = hashlib.blake2b(f"{doc_id}\0{window}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


@dataclass
class Batch:
    """Padded tensors for a list of sequences. All are ``(batch, tokens)``.

    ``keys``: each row's `window_key` (``(batch,)`` int64, on the CPU), set by
    `collate`; ``None`` for batches built by hand, whose rows are keyed by
    their position in the batch.
    """

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    labels: torch.Tensor
    keys: torch.Tensor | None = None

    def to(self, device: torch.device | str) -> "Batch":
        return Batch(self.input_ids.to(device), self.attention_mask.to(device), self.labels.to(device), self.keys)


def collate(sequences: list[TokenWindow], pad_id: int, padding_side: str = "right") -> Batch:
    """Pad to the longest sequence; padded positions have mask 0 and label ``IGNORE``.

    A window's first token is never a target: with right padding the loss's shift drops it, with left
    padding its label is set to ``IGNORE`` (a pad position would predict it).
    """
    if padding_side not in ("left", "right"):
        raise ValueError(f"padding_side must be 'left' or 'right', got {padding_side!r}")
    length = max(len(s.input_ids) for s in sequences)
    ids = torch.full((len(sequences), length), pad_id, dtype=torch.long)
    mask = torch.zeros((len(sequences), length), dtype=torch.long)
    labels = torch.full((len(sequences), length), IGNORE, dtype=torch.long)
    for i, seq in enumerate(sequences):
        n = len(seq.input_ids)
        sl = slice(0, n) if padding_side == "right" else slice(length - n, length)
        ids[i, sl] = torch.tensor(seq.input_ids)
        mask[i, sl] = 1
        labels[i, sl] = torch.tensor(seq.labels)
        if padding_side == "left" and n < length:
            labels[i, length - n] = IGNORE  # a window's first token is no target (right padding drops it by the shift)
    keys = torch.tensor([window_key(seq.doc_id, seq.window) for seq in sequences], dtype=torch.int64)
    return Batch(ids, mask, labels, keys)


def longest_first(sequences: list[TokenWindow], indices: Iterable[int] | None = None) -> list[int]:
    """The indices of ``sequences`` (all, or ``indices``), longest window first, equal lengths in order.

    A batch runs forward and backward over as many positions as its longest
    window; batched in this order, windows of mixed lengths (documents shorter
    than the window, each long document's last window) pad the least, and the
    largest batch comes first (a memory fault shows at once).
    """
    chosen = range(len(sequences)) if indices is None else indices
    return sorted(chosen, key=lambda i: len(sequences[i].input_ids), reverse=True)


def batches_of(sequences: list[TokenWindow], size: int, pad_id: int, padding_side: str = "right") -> list[Batch]:
    """``sequences`` in order, collated ``size`` at a time (the last batch may be smaller)."""
    return [collate(sequences[i : i + size], pad_id, padding_side) for i in range(0, len(sequences), size)]
