"""A tiny GPT-2 built from configuration and trained from scratch: the demo's model and the evaluation's.

Nothing is downloaded: ``new_gpt2`` builds the model from a config, seeded
without disturbing the caller's random state, and ``train`` runs AdamW with
a linear warm-up and a cosine decay on whatever batches it is given. The
demo (``pipeline.demo``) feeds it random slices of one token stream; the
evaluation (``benchmarks.evaluate``) feeds it shuffled epochs of windows
through ``train_on_windows``.
"""

from __future__ import annotations

import itertools
import logging
import math
import time
from collections.abc import Callable, Iterable, Iterator

import numpy as np
import torch
import torch.nn.functional as F

from pipeline.core.text import IGNORE, Batch, TokenWindow, collate

log = logging.getLogger(__name__)


def new_gpt2(vocab_size: int, *, n_embd: int, n_layer: int, n_head: int, n_positions: int, eos_id: int,
             pad_id: int, seed: int, n_inner: int | None = None):
    """A ``GPT2LMHeadModel`` without dropout, its weights drawn from ``torch.manual_seed(seed)``.

    The global torch RNG is forked, so the caller's random state is left as it was.
    """
    from transformers import GPT2Config, GPT2LMHeadModel

    config = GPT2Config(
        vocab_size=vocab_size, n_positions=n_positions, n_embd=n_embd, n_layer=n_layer, n_head=n_head,
        n_inner=n_inner, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
        bos_token_id=eos_id, eos_token_id=eos_id, pad_token_id=pad_id,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return GPT2LMHeadModel(config)


def warmup_cosine(steps: int) -> Callable[[int], float]:
    """Learning-rate factor of step ``s``: linear warm-up over the first tenth, cosine decay to 0.1."""
    warmup = max(1, steps // 10)

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, steps - warmup)
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress))

    return factor


def mean_token_nll(model, batch: Batch) -> torch.Tensor:
    """Scalar mean next-token NLL over the labelled, unpadded positions of ``batch``."""
    logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
    return F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), batch.labels[:, 1:].reshape(-1),
                           ignore_index=IGNORE)


def train(model, batches: Iterable[Batch], *, steps: int, lr: float, device: torch.device | str = "cpu",
          log_every: int = 0, label: str = "tiny LM") -> list[float]:
    """AdamW (no weight decay, gradients clipped at norm 1) on ``mean_token_nll`` for ``steps`` batches.

    ``batches`` must yield at least ``steps`` batches (right-padded, so GPT-2's
    default positions are the real ones). Returns the loss per step; the
    model is left in eval mode. ``log_every`` > 0 logs the loss that often.
    """
    model.to(device).train()
    model.requires_grad_(True)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_cosine(steps))
    losses: list[float] = []
    started = time.perf_counter()
    for step, batch in enumerate(itertools.islice(batches, steps)):
        loss = mean_token_nll(model, batch.to(device))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        scheduler.step()
        losses.append(loss.item())
        if log_every and ((step + 1) % log_every == 0 or step + 1 == steps):
            log.info("%s train step %d/%d: loss %.3f (mean of last %d: %.3f), %.1f s", label, step + 1, steps,
                     losses[-1], log_every, float(np.mean(losses[-log_every:])), time.perf_counter() - started)
    if len(losses) < steps:
        raise ValueError(f"train got {len(losses)} batches for {steps} steps; give it one batch per step")
    model.eval()
    return losses


def shuffled_epochs(windows: list[TokenWindow], pad_id: int, *, epochs: int, batch_size: int,
                    seed: int) -> Iterator[Batch]:
    """``epochs`` passes over ``windows``, each in a new seeded order, collated ``batch_size`` at a time."""
    generator = torch.Generator().manual_seed(seed)
    for _ in range(epochs):
        order = torch.randperm(len(windows), generator=generator).tolist()
        for start in range(0, len(order), batch_size):
            yield collate([windows[i] for i in order[start : start + batch_size]], pad_id)


def train_on_windows(model, windows: list[TokenWindow], pad_id: int, *, epochs: int, batch_size: int, lr: float,
                     seed: int, device: torch.device | str = "cpu") -> list[float]:
    """``train`` on ``epochs`` seeded shuffles of ``windows``; the same seed, data and recipe give the same model."""
    steps = max(1, epochs * math.ceil(len(windows) / batch_size))
    batches = shuffled_epochs(windows, pad_id, epochs=epochs, batch_size=batch_size, seed=seed)
    return train(model, batches, steps=steps, lr=lr, device=device)
