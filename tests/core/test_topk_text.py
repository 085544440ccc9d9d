"""Top-k accumulator against a full sort; windowing and query encoding."""

from __future__ import annotations

import pytest
import torch
from transformers import PreTrainedTokenizerFast
from tokenizers import Tokenizer, models, pre_tokenizers

from pipeline.core.text import IGNORE, BadInputError, collate, encode_documents, encode_query, split_windows
from pipeline.core.topk import TopK


def full_sort(scores, keys, k, largest):
    rows = []
    for q in range(scores.shape[1]):
        items = sorted(zip(scores[:, q].tolist(), keys.tolist()), key=lambda x: ((-x[0] if largest else x[0]), x[1]))
        rows.append(items[:k])
    return rows


@pytest.mark.parametrize("seed", range(5))
def test_topk_equals_full_sort_with_ties(seed):
    gen = torch.Generator().manual_seed(seed)
    n, q, k = 200, 3, 7
    scores = torch.randint(-5, 6, (n, q), generator=gen).double()  # many ties, zeros too
    keys = torch.randperm(n, generator=gen).long()
    acc = TopK(q, k)
    start = 0
    while start < n:  # uneven batches
        size = int(torch.randint(1, 30, (1,), generator=gen))
        acc.update(scores[start : start + size], keys[start : start + size])
        start += size
    top, bottom = full_sort(scores, keys, k, True), full_sort(scores, keys, k, False)
    for qi in range(q):
        assert acc.proponents(qi) == [(s, key) for s, key in top[qi] if s > 0]
        assert acc.opponents(qi) == [(s, key) for s, key in bottom[qi] if s < 0]


def test_topk_rejects_non_finite():
    acc = TopK(1, 2)
    with pytest.raises(ValueError, match="non-finite"):
        acc.update(torch.tensor([[float("nan")]]), torch.tensor([0]))


def test_windows_overlap_by_one_and_cover_every_target_once():
    ids = list(range(23))
    windows = split_windows("d", ids, 8)
    assert [w.window for w in windows] == list(range(len(windows)))
    assert all(len(w.input_ids) <= 8 for w in windows)
    targets = [t for w in windows for t in w.input_ids[1:]]
    assert targets == ids[1:]
    assert split_windows("d", [5], 8) == [] and split_windows("d", [], 8) == []


@pytest.fixture(scope="module")
def tokenizer():
    vocab = {"<eos>": 0, "[UNK]": 1, **{c: i + 2 for i, c in enumerate("abcdefghijklmnopqrstuvwxyz ")}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Split("", "isolated")
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>", pad_token="<eos>")


def test_encode_documents_skips_empty_and_splits_long(tokenizer):
    seqs, skipped = encode_documents(tokenizer, [("a", "hello world"), ("b", ""), ("c", "x" * 30)], window_len=8)
    assert skipped == ["b"]
    assert {s.doc_id for s in seqs} == {"a", "c"}
    assert max(s.window for s in seqs if s.doc_id == "c") >= 3
    assert seqs[-1].input_ids[-1] == tokenizer.eos_token_id


def test_encode_query_labels_only_the_completion(tokenizer):
    q = encode_query(tokenizer, "q1", "the cat", " sat", max_tokens=32)
    n_prompt = len("the cat")
    assert q.labels[:n_prompt] == (IGNORE,) * n_prompt
    assert q.labels[n_prompt:] == q.input_ids[n_prompt:] and q.num_targets == 4
    long = encode_query(tokenizer, "q2", "abcdefghij" * 3, " end", max_tokens=10)
    assert len(long.input_ids) == 10 and long.num_targets == 4


def test_bad_queries_are_named(tokenizer):
    with pytest.raises(BadInputError, match="'q9' has an empty completion"):
        encode_query(tokenizer, "q9", "prompt", "", max_tokens=16)
    with pytest.raises(BadInputError, match="'q8'.*more than the window"):
        encode_query(tokenizer, "q8", "p", "y" * 40, max_tokens=16)


def test_collate_masks_padding_both_sides():
    from pipeline.core.text import TokenWindow

    seqs = [TokenWindow("a", 0, (3, 4, 5), (3, 4, 5)), TokenWindow("b", 0, (6,) * 5, (6,) * 5)]
    right, left = collate(seqs, 0, "right"), collate(seqs, 0, "left")
    assert right.attention_mask.tolist()[0] == [1, 1, 1, 0, 0]
    assert left.attention_mask.tolist()[0] == [0, 0, 1, 1, 1]
    assert (right.labels[right.attention_mask == 0] == IGNORE).all()
    assert (left.labels[left.attention_mask == 0] == IGNORE).all()
