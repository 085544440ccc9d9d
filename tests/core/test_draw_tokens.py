"""`draw_tokens` and `label_uniforms`, the sampler of the true-Fisher labels: the law of
``torch.multinomial(probs, 1)``, drawn per window."""

import math

import pytest
import torch

from pipeline.core import forward
from pipeline.core.forward import draw_tokens, label_uniforms, sequence_losses
from pipeline.core.text import collate
from tests.helpers import TINY_PAD, random_sequences, tiny_model


@pytest.fixture
def small_blocks(monkeypatch):
    """Blocks of 64 entries, so a 300-entry vocabulary has four full blocks and a partial one."""
    monkeypatch.setattr(forward, "DRAW_BLOCK", 64)


def _law(vocab: int, seed: int) -> torch.Tensor:
    """An unnormalised law over ``vocab`` entries with zeros, a zero-mass block and a heavy tail."""
    gen = torch.Generator().manual_seed(seed)
    p = torch.rand(vocab, generator=gen) ** 4
    p[5:20] = 0
    p[64:128] = 0  # a whole block without mass
    p[-3] = 0
    p[7] = 3.0  # one heavy entry inside the zeros' block
    return p * 7.5  # rows need not sum to one


def test_frequencies_follow_the_probabilities(small_blocks):
    p = _law(300, 0)
    gen = torch.Generator().manual_seed(1)
    rows, reps = 10_000, 20
    counts = torch.zeros(300)
    for _ in range(reps):
        drawn = draw_tokens(p.expand(rows, -1).contiguous(), torch.rand(rows, 1, generator=gen, dtype=torch.float64))
        assert drawn.shape == (rows, 1) and drawn.dtype == torch.int64
        counts += torch.bincount(drawn.view(-1), minlength=300).float()
    assert counts[p == 0].sum() == 0, "an entry of probability zero was drawn"
    expected = p / p.sum() * rows * reps
    live = expected > 0
    chi2 = float(((counts[live] - expected[live]) ** 2 / expected[live]).sum())
    df = int(live.sum()) - 1
    assert chi2 < df + 6 * math.sqrt(2 * df), f"chi-square {chi2:.0f} on {df} degrees of freedom"


def test_one_entry_rows_always_draw_it(small_blocks):
    """Rows whose whole mass is one entry (first, inside, last of a full block, in the partial block)."""
    where = torch.tensor([0, 63, 64, 130, 255, 256, 299])
    probs = torch.zeros(len(where), 300)
    probs[torch.arange(len(where)), where] = torch.tensor([1.0, 1e-30, 5.0, 1e-3, 2.0, 1.0, 0.25])
    gen = torch.Generator().manual_seed(0)
    for _ in range(50):
        u = torch.rand(len(where), 1, generator=gen, dtype=torch.float64)
        assert torch.equal(draw_tokens(probs, u).view(-1), where)


def test_edges_of_u_and_the_default_block():
    """u at 0 and just below 1 draw the first and last entries with mass; a vocabulary below one block,
    and one not a multiple of it."""
    for vocab in (50, 3000):
        probs = torch.softmax(torch.randn(4, vocab, generator=torch.Generator().manual_seed(vocab)), -1)
        probs[:, 0] = 0
        probs[:, -1] = 0
        u = torch.tensor([[0.0], [1 - 2**-53], [0.5], [0.25]], dtype=torch.float64)
        drawn = draw_tokens(probs, u).view(-1)
        assert drawn[0] == 1 and drawn[1] == vocab - 2
        assert torch.equal(drawn, draw_tokens(probs, u).view(-1))


def test_labels_drawn_per_window_whatever_the_batch():
    """A window's uniforms, and so its sampled labels, depend on the seed and the window alone: not on
    its batch's other windows, its row, the padding side or the batch order."""
    seqs = random_sequences(5, seed=2)
    u = label_uniforms(collate(seqs, TINY_PAD), seed=3)
    for i, seq in enumerate(seqs):
        for side in ("right", "left"):
            alone = label_uniforms(collate([seqs[(i + 2) % 5], seq], TINY_PAD, side), seed=3)
            n = len(seq.input_ids)
            row = alone[1, :n] if side == "right" else alone[1, alone.shape[1] - n:]
            assert torch.equal(row, u[i, :n])
            assert (u[i, n:] == 0).all()
    assert not torch.equal(label_uniforms(collate(seqs, TINY_PAD), seed=4), u)
    model = tiny_model("llama")
    # Left padding: the window's first token is no target, as with right padding (`collate`).
    torch.testing.assert_close(sequence_losses(model, collate(seqs[::-1], TINY_PAD, "left")).flip(0),
                               sequence_losses(model, collate(seqs, TINY_PAD)), rtol=1e-5, atol=1e-5)
    together = sequence_losses(model, collate(seqs, TINY_PAD), "sampled", seed=3)
    reversed_ = sequence_losses(model, collate(seqs[::-1], TINY_PAD, "left"), "sampled", seed=3)
    torch.testing.assert_close(reversed_.flip(0), together, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(sequence_losses(model, collate(seqs, TINY_PAD), "sampled", seed=4), together)


def test_labels_drawn_in_row_chunks_are_the_same(monkeypatch):
    """`sequence_losses` draws ``DRAW_ROWS`` positions at a time: the chunking changes no label."""
    seqs = random_sequences(6, seed=5)
    model = tiny_model("gpt2")
    whole = sequence_losses(model, collate(seqs, TINY_PAD), "sampled", seed=1)
    monkeypatch.setattr(forward, "DRAW_ROWS", 5)
    torch.testing.assert_close(sequence_losses(model, collate(seqs, TINY_PAD), "sampled", seed=1), whole,
                               rtol=1e-6, atol=1e-6)
