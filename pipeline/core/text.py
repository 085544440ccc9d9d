"""Turning documents and queries into token sequences, and sequences into batches.

Training documents are split into windows of at most ``window_len`` tokens that
overlap by one token, so every token after a document's first is predicted
exactly once and the windows' summed losses add up to the document's loss.
A query is ``prompt + completion``; only completion tokens carry labels.
"""

from __future__ import annotations

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


def encode_documents(
    tokenizer, docs: list[tuple[str, str]], window_len: int, add_eos: bool = True
) -> tuple[list[TokenWindow], list[str]]:
    """Tokenise ``(doc_id, text)`` pairs into windows.

    Returns the windows and the ids of documents skipped because they have
    fewer than two tokens (empty documents).
    """
    texts = [text if isinstance(text, str) else "" for _, text in docs]
    encoded = tokenizer(texts, add_special_tokens=False)["input_ids"] if texts else []
    eos = tokenizer.eos_token_id if add_eos else None
    sequences: list[TokenWindow] = []
    skipped: list[str] = []
    for (doc_id, _), ids in zip(docs, encoded):
        ids = list(ids)
        if eos is not None and ids:
            ids.append(eos)
        windows = split_windows(doc_id, ids, window_len)
        if not windows:
            skipped.append(doc_id)
        sequences.extend(windows)
    return sequences, skipped


def encode_query(tokenizer, query_id: str, prompt: str, completion: str, max_tokens: int) -> TokenWindow:
    """``prompt + completion`` with labels on the completion tokens only.

    The prompt is truncated from the left when the pair exceeds ``max_tokens``;
    an empty completion, or one longer than ``max_tokens - 1``, is a
    ``BadInputError`` naming the query.
    """
    if not isinstance(completion, str) or not completion:
        raise BadInputError(f"query {query_id!r} has an empty completion; there is nothing to attribute")
    prompt_ids = list(tokenizer(prompt or "", add_special_tokens=False)["input_ids"])
    completion_ids = list(tokenizer(completion, add_special_tokens=False)["input_ids"])
    if not completion_ids:
        raise BadInputError(f"query {query_id!r}: completion {completion!r} tokenises to no tokens")
    if not prompt_ids:
        # The first token is never predicted; give the completion a start token.
        bos = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
        if bos is None:
            raise BadInputError(f"query {query_id!r} has an empty prompt and the tokenizer has no BOS/EOS token")
        prompt_ids = [bos]
    if len(completion_ids) + 1 > max_tokens:
        raise BadInputError(
            f"query {query_id!r}: completion is {len(completion_ids)} tokens, more than the "
            f"window of {max_tokens} allows; shorten it or raise the window"
        )
    prompt_ids = prompt_ids[-(max_tokens - len(completion_ids)) :]
    ids = tuple(prompt_ids + completion_ids)
    labels = tuple([IGNORE] * len(prompt_ids) + completion_ids)
    return TokenWindow(query_id, 0, ids, labels)


@dataclass
class Batch:
    """Padded tensors for a list of sequences. All are ``(batch, tokens)``."""

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    labels: torch.Tensor

    def to(self, device: torch.device | str) -> "Batch":
        return Batch(self.input_ids.to(device), self.attention_mask.to(device), self.labels.to(device))


def collate(sequences: list[TokenWindow], pad_id: int, padding_side: str = "right") -> Batch:
    """Pad to the longest sequence; padded positions have mask 0 and label ``IGNORE``."""
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
    return Batch(ids, mask, labels)
