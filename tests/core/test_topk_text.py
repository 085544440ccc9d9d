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


def test_longest_first_orders_by_length_and_keeps_ties_in_order():
    from pipeline.core.text import TokenWindow, longest_first

    lengths = [3, 7, 3, 1, 7, 5]
    seqs = [TokenWindow(f"d{i}", 0, list(range(n)), list(range(n))) for i, n in enumerate(lengths)]
    assert longest_first(seqs) == [1, 4, 5, 0, 2, 3]
    assert longest_first(seqs, [5, 3, 2, 0]) == [5, 2, 0, 3]  # a subset, ties in the order given
    batches = [seqs[i] for i in longest_first(seqs)]
    padded = sum(max(len(s.input_ids) for s in batches[i:i + 2]) * 2 for i in range(0, 6, 2))
    assert padded == 2 * (7 + 5 + 3) < 2 * (7 + 7 + 5)  # against the given order's batches of two


@pytest.mark.parametrize("seed", range(3))
def test_document_topk_in_any_order_equals_corpus_order(seed):
    """Windows scored in another order (longest first) rank the same documents with the same sums, given
    each document's number of windows; a document with a non-finite window is left out either way."""
    from collections import Counter

    from pipeline.shard_result import DOCUMENT_FLUSH, DocumentTopK

    gen = torch.Generator().manual_seed(seed)
    doc_of = sorted(torch.randint(0, DOCUMENT_FLUSH + 40, (700,), generator=gen).tolist())  # windows in corpus order
    scores = torch.randn(len(doc_of), 4, generator=gen, dtype=torch.float64)
    bad = {doc_of[17], doc_of[400]}
    in_order = DocumentTopK(2, 4, 5)
    for d, s in zip(doc_of, scores):
        in_order.add(d, None if d in bad else s)
    shuffled = DocumentTopK(2, 4, 5, Counter(doc_of))
    for i in torch.randperm(len(doc_of), generator=gen).tolist():
        shuffled.add(doc_of[i], None if doc_of[i] in bad else scores[i])
    a, b = in_order.finish(), shuffled.finish()
    for q in range(4):
        for got, want in ((b.proponents(q), a.proponents(q)), (b.opponents(q), a.opponents(q))):
            assert [k for _, k in got] == [k for _, k in want]
            assert [s for s, _ in got] == pytest.approx([s for s, _ in want], rel=1e-12)
            assert not {k & 0xFFFFFFFF for _, k in got} & bad
    assert b.k == 5 and shuffled.num_windows == in_order.num_windows and not shuffled._open
