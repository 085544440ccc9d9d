"""corpus.add_bos / corpus.add_eos: token sequences as the model was trained, for a Llama-style and a GPT-2-style tokenizer."""

from __future__ import annotations

import pytest
from tokenizers import Tokenizer, models, pre_tokenizers, processors
from transformers import PreTrainedTokenizerFast

from pipeline.core.text import (
    IGNORE,
    BadInputError,
    Tokenisation,
    encode_documents,
    encode_query,
    resolve_tokenisation,
    tokenizer_adds_bos,
)

VOCAB = {"<s>": 0, "</s>": 1, "<pad>": 2, **{c: i + 3 for i, c in enumerate("abcdefghijklmnopqrstuvwxyz ")}}


def _tokenizer(llama_style: bool) -> PreTrainedTokenizerFast:
    """Character-level tokenizer; ``llama_style``: BOS added by the post-processor, as Llama's fast tokenizers do."""
    tok = Tokenizer(models.WordLevel(VOCAB, unk_token="<pad>"))
    tok.pre_tokenizer = pre_tokenizers.Split("", "isolated")
    if llama_style:
        tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 0)])
        return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>")
    # GPT-2 style: one end-of-text token that is also BOS, never added by the tokenizer itself.
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="</s>", eos_token="</s>", pad_token="<pad>")


@pytest.fixture(params=[True, False], ids=["llama", "gpt2"])
def tokenizer_kind(request):
    return request.param, _tokenizer(request.param)


def test_defaults_come_from_the_tokenizer(tokenizer_kind):
    llama_style, tok = tokenizer_kind
    assert tokenizer_adds_bos(tok) is llama_style
    assert resolve_tokenisation(tok, None, None) == Tokenisation(add_bos=llama_style, add_eos=True)
    assert resolve_tokenisation(tok, False, False) == Tokenisation(add_bos=False, add_eos=False)


def test_documents_get_bos_and_eos_as_asked(tokenizer_kind):
    _, tok = tokenizer_kind
    text_ids = [VOCAB[c] for c in "abc"]
    for add_bos in (False, True):
        for add_eos in (False, True):
            seqs, skipped = encode_documents(tok, [("d", "abc"), ("e", "")], 64, Tokenisation(add_bos, add_eos))
            expected = ([tok.bos_token_id] if add_bos else []) + text_ids + ([tok.eos_token_id] if add_eos else [])
            assert [s.input_ids for s in seqs] == [tuple(expected)]
            assert skipped == ["e"]  # an empty document has nothing to predict, whatever the special tokens


def test_bos_only_starts_the_first_window():
    tok = _tokenizer(True)
    seqs, _ = encode_documents(tok, [("d", "abcdefghij")], 4, Tokenisation(add_bos=True, add_eos=True))
    assert seqs[0].input_ids[0] == tok.bos_token_id
    assert all(tok.bos_token_id not in s.input_ids for s in seqs[1:])
    assert seqs[-1].input_ids[-1] == tok.eos_token_id
    # Windows overlap by one token, so the concatenated targets are the document's tokens after the first.
    targets = [t for s in seqs for t in s.input_ids[1:]]
    assert targets == [VOCAB[c] for c in "abcdefghij"] + [tok.eos_token_id]


def test_query_prompt_starts_with_bos_even_when_truncated():
    tok = _tokenizer(True)
    q = encode_query(tok, "q", "abcdefghij", "xy", 6, Tokenisation(add_bos=True, add_eos=True))
    assert q.input_ids == (tok.bos_token_id, *(VOCAB[c] for c in "hijxy"))
    assert q.labels[-2:] == (VOCAB["x"], VOCAB["y"]) and set(q.labels[:-2]) == {IGNORE}
    plain = encode_query(tok, "q", "abc", "xy", 64, Tokenisation(add_bos=False, add_eos=True))
    assert plain.input_ids == tuple(VOCAB[c] for c in "abcxy")


def test_asking_for_a_missing_special_token_is_bad_input():
    tok = _tokenizer(False)
    tok.bos_token = None
    with pytest.raises(BadInputError, match="corpus.add_bos"):
        resolve_tokenisation(tok, True, None)
    assert resolve_tokenisation(tok, None, None).add_bos is False
