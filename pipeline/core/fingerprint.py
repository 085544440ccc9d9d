"""Content fingerprints used to tie factors and results to a model."""

from __future__ import annotations

import hashlib

import torch


def model_fingerprint(model: torch.nn.Module) -> str:
    """SHA-256 over the class name and every parameter and buffer (name, dtype, shape, bytes).

    Independent of device; two models with equal weights and architecture
    share a fingerprint.
    """
    h = hashlib.sha256(type(model).__name__.encode())
    for name, tensor in sorted(model.state_dict().items()):
        t = tensor.detach().to("cpu").contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()
