"""`draw_tokens`, the sampler of the true-Fisher labels: the law of ``torch.multinomial(probs, 1)``."""

import math

import pytest
import torch

from pipeline.core import forward
from pipeline.core.forward import draw_tokens


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
        drawn = draw_tokens(p.expand(rows, -1).contiguous(), gen)
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
        assert torch.equal(draw_tokens(probs, gen).view(-1), where)


def test_seeded_and_at_the_default_block():
    """The same seed draws the same tokens; a vocabulary below one block and one not a multiple of it."""
    for vocab in (50, 3000):
        probs = torch.softmax(torch.randn(64, vocab, generator=torch.Generator().manual_seed(vocab)), -1)
        a = draw_tokens(probs, torch.Generator().manual_seed(9))
        b = draw_tokens(probs, torch.Generator().manual_seed(9))
        c = draw_tokens(probs, torch.Generator().manual_seed(10))
        assert torch.equal(a, b) and not torch.equal(a, c)
        assert int(a.min()) >= 0 and int(a.max()) < vocab
