"""Named tensors as safetensors bytes and back, with the file's str -> str metadata (no pickle, no I/O).

The one place that reads the safetensors header: 8 bytes little-endian
header length, then a JSON header whose optional ``__metadata__`` entry
holds the metadata (the format's specification; ``safetensors.torch.load``
returns only the tensors).
"""

from __future__ import annotations

import json

import torch


def tensors_to_bytes(tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> bytes:
    """Safetensors bytes of ``tensors`` (any shapes and dtypes; moved to the CPU, made contiguous).

    ``metadata`` is a flat str -> str dict stored in the header; a ``TypeError``
    names the first entry that is not (encode structured values with ``json.dumps``).
    """
    from safetensors.torch import save

    for k, v in (metadata or {}).items():
        if not isinstance(k, str) or not isinstance(v, str):
            raise TypeError(f"safetensors metadata must map str to str; {k!r}: {v!r} is not (json.dumps it first)")
    cpu = {name: t.detach().cpu().contiguous() for name, t in tensors.items()}
    return save(cpu, metadata=metadata)


def tensors_from_bytes(data: bytes) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """``(tensors, metadata)`` from safetensors bytes: CPU tensors, and ``{}`` when the file has no metadata."""
    from safetensors.torch import load

    header_len = int.from_bytes(data[:8], "little")
    header = json.loads(data[8 : 8 + header_len])
    return load(data), dict(header.get("__metadata__") or {})
