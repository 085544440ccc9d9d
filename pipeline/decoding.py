"""A scored window back to text: its decoded text, its character span in the document, its tokens' texts.

The worker that scored a window holds the document's text and the tokenizer,
so it decodes the windows it keeps (docs/design.md#the-run-tables). Spans come
from the tokenizer's offsets mapping when it has one (Hugging Face "fast"
tokenizers; ``CHAR_SPANS_OFFSETS``), else from the lengths of decoded token
prefixes (``CHAR_SPANS_DECODE_PREFIX``, exact for tokenizers whose decoding
is a concatenation, approximate otherwise). Decoding never raises: a token
boundary inside a multi-byte character decodes to U+FFFD (the tokenizer's
``errors='replace'``), and shows as such.
"""

from __future__ import annotations

from dataclasses import dataclass

from pipeline.core.text import TokenWindow

CHAR_SPANS_OFFSETS = "offsets"
CHAR_SPANS_DECODE_PREFIX = "decode_prefix"
REPLACEMENT = "\ufffd"
ENCODED_CACHE = 256  # documents


@dataclass(frozen=True)
class TokenText:
    """One token of a window: its id, its text, whether it is a special token, its span in the document.

    ``char_start``/``char_end`` are ``None`` for tokens that are not in the
    document's text (a BOS/EOS added around it) or when spans are unknown.
    """

    token_id: int
    text: str
    special: bool
    char_start: int | None
    char_end: int | None


@dataclass(frozen=True)
class WindowText:
    """A window decoded: ``text`` (special tokens shown), its span ``[char_start, char_end)`` in the document."""

    text: str
    char_start: int | None
    char_end: int | None
    tokens: tuple[TokenText, ...]


class WindowDecoder:
    """Decodes windows of documents with one tokenizer; ``method`` says how spans are found."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.method = CHAR_SPANS_OFFSETS if getattr(tokenizer, "is_fast", False) else CHAR_SPANS_DECODE_PREFIX
        self.special_ids = set(tokenizer.all_special_ids or [])
        # Documents encoded lately: a document with several kept windows is encoded once.
        self._encoded: dict[str, tuple[list[int], list[tuple[int, int]] | None]] = {}

    def decode(self, ids) -> str:
        """Token ids to text, special tokens kept, invalid UTF-8 replaced by U+FFFD."""
        return self.tokenizer.decode(list(ids), skip_special_tokens=False, clean_up_tokenization_spaces=False)

    def _encode(self, text: str) -> tuple[list[int], list[tuple[int, int]] | None]:
        if text not in self._encoded:
            if len(self._encoded) >= ENCODED_CACHE:
                self._encoded.clear()
            if self.method == CHAR_SPANS_OFFSETS:
                enc = self.tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
                self._encoded[text] = list(enc["input_ids"]), [tuple(o) for o in enc["offset_mapping"]]
            else:
                self._encoded[text] = list(self.tokenizer(text, add_special_tokens=False)["input_ids"]), None
        return self._encoded[text]

    def window(self, doc_text: str, seq: TokenWindow, window_len: int) -> WindowText:
        """Decode ``seq``, the ``seq.window``-th window of ``doc_text`` cut into ``window_len``-token windows.

        The window's tokens are matched to the document's own tokens, allowing
        for one added token in front (BOS); tokens outside the document (BOS,
        EOS) have no span. When the window cannot be matched (the document was
        tokenised otherwise), the text is still decoded and the spans are ``None``.
        """
        ids = list(seq.input_ids)
        text = self.decode(ids)
        doc_text = doc_text if isinstance(doc_text, str) else ""
        doc_ids, offsets = self._encode(doc_text)
        positions = _locate(ids, doc_ids, seq.window * (window_len - 1))
        if positions is None:
            tokens = tuple(TokenText(i, self.decode([i]), i in self.special_ids, None, None) for i in ids)
            return WindowText(text, None, None, tokens)
        spans = self._spans(doc_ids, offsets, positions)
        tokens = tuple(
            TokenText(i, self._token_text(doc_text, i, positions[k], offsets), i in self.special_ids, *spans[k])
            for k, i in enumerate(ids)
        )
        inside = [s for s in spans if s[0] is not None]
        if not inside:
            return WindowText(text, None, None, tokens)
        return WindowText(text, min(s[0] for s in inside), max(s[1] for s in inside), tokens)

    def _spans(self, doc_ids, offsets, positions) -> list[tuple[int | None, int | None]]:
        """Per window token: its ``(char_start, char_end)`` in the document, ``(None, None)`` outside it."""
        if offsets is not None:
            return [tuple(offsets[p]) if p is not None else (None, None) for p in positions]
        # Decode-prefix lengths: token p spans [len(decode(ids[:p])), len(decode(ids[:p+1]))).
        inside = [p for p in positions if p is not None]
        if not inside:
            return [(None, None)] * len(positions)
        lo = len(self.decode(doc_ids[: inside[0]]))
        ends = {p: len(self.decode(doc_ids[: p + 1])) for p in inside}
        out, prev = [], lo
        for p in positions:
            if p is None:
                out.append((None, None))
            else:
                out.append((prev, ends[p]))
                prev = ends[p]
        return out

    def _token_text(self, doc_text: str, token_id: int, position: int | None, offsets) -> str:
        """The document's characters of the token at ``position`` when it alone covers them, else the token decoded.

        Tokens that share a character (one multi-byte character split over
        several byte-level tokens, maybe across windows) decode each to U+FFFD.
        """
        if position is None or offsets is None:
            return self.decode([token_id])
        start, end = offsets[position]
        shared = any(
            0 <= j < len(offsets) and offsets[j][0] < end and start < offsets[j][1]
            for j in (position - 1, position + 1)
        )
        return self.decode([token_id]) if shared or start == end else doc_text[start:end]


def _locate(ids: list[int], doc_ids: list[int], start: int) -> list[int | None] | None:
    """Positions in ``doc_ids`` of the window tokens ``ids`` that begin at ``start`` of the full sequence.

    The full sequence is ``[BOS]? + doc_ids + [EOS]?``; tries no added token in
    front, then one. ``None`` marks a token outside ``doc_ids``; returns ``None``
    when neither alignment matches.
    """
    for front in (0, 1):
        positions: list[int | None] = []
        for k, token in enumerate(ids):
            p = start + k - front
            if 0 <= p < len(doc_ids):
                if doc_ids[p] != token:
                    break
                positions.append(p)
            else:
                positions.append(None)
        else:
            if any(p is not None for p in positions) or not doc_ids:
                return positions
    return None
