"""Named tensors as safetensors bytes and back, with the file's str -> str metadata (no pickle, no I/O).

The one place that reads the safetensors header: 8 bytes little-endian
header length, then a JSON header whose optional ``__metadata__`` entry
holds the metadata (the format's specification; ``safetensors.torch.load``
returns only the tensors).
"""

from __future__ import annotations

import json
import math
import warnings
from collections.abc import Callable
from typing import BinaryIO

import torch


def tensors_to_bytes(tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> bytearray:
    """Safetensors bytes of ``tensors`` (any shapes, strides and dtypes; moved to the CPU).

    ``metadata`` is a flat str -> str dict stored in the header; a ``TypeError``
    names the first entry that is not (encode structured values with ``json.dumps``).
    Written here rather than by ``safetensors.torch.save``, which took 3-10 s
    for the fit's 1.9 GB partial sums (several copies of the data; this is
    one): the layout of the format's specification (header padded with spaces
    to 8 bytes, tensors ordered by element size then name, as the reference
    writer orders them), read back by the ``safetensors`` library in the tests.
    """
    cpu = {name: t.detach().cpu() for name, t in tensors.items()}  # strided ones are copied in place below
    encoded, names, header = _layout({n: (t.dtype, tuple(t.shape)) for n, t in cpu.items()}, metadata)
    base = len(encoded)
    out = bytearray(base + (header[names[-1]]["data_offsets"][1] if names else 0))
    out[:base] = encoded
    for name in names:
        start, stop = header[name]["data_offsets"]
        if stop > start:
            t = cpu[name]
            target = torch.frombuffer(out, dtype=t.dtype, count=t.numel(), offset=base + start)  # aligned: see order
            target.view(t.shape).copy_(t)
    return out


def write_tensors(out: BinaryIO, specs: dict[str, tuple[torch.dtype, tuple[int, ...]]],
                  tensor_of: Callable[[str], torch.Tensor], metadata: dict[str, str] | None = None) -> None:
    """The bytes `tensors_to_bytes` gives, written to ``out`` one tensor at a time.

    ``specs``: every tensor's ``(dtype, shape)``, known before any is made (the
    header comes first); ``tensor_of(name)`` makes each in turn, in the file's
    order, and a ``ValueError`` names one whose dtype or shape is not its spec's.
    So a writer holds one tensor, not the file.
    """
    encoded, names, header = _layout(specs, metadata)
    out.write(encoded)
    for name in names:
        t = tensor_of(name).detach().cpu().contiguous()
        if (t.dtype, tuple(t.shape)) != (specs[name][0], tuple(specs[name][1])):
            raise ValueError(f"tensor {name!r} is {t.dtype} {tuple(t.shape)}, its spec {specs[name]}")
        if t.numel():
            out.write(memoryview(t.reshape(-1).view(torch.uint8).numpy()))  # the tensor's bytes, not a copy


def _layout(specs: dict[str, tuple[torch.dtype, tuple[int, ...]]], metadata: dict[str, str] | None
            ) -> tuple[bytes, list[str], dict]:
    """``(header bytes with their length prefix, tensor names in file order, header)`` of a safetensors file."""
    for k, v in (metadata or {}).items():
        if not isinstance(k, str) or not isinstance(v, str):
            raise TypeError(f"safetensors metadata must map str to str; {k!r}: {v!r} is not (json.dumps it first)")
    size = {n: torch.empty((), dtype=dtype).element_size() for n, (dtype, _) in specs.items()}
    names = sorted(specs, key=lambda n: (-size[n], n))
    header: dict = {"__metadata__": dict(metadata)} if metadata else {}
    end = 0
    for name in names:
        dtype, shape = specs[name]
        if dtype not in _NAMES:
            raise TypeError(f"tensor {name!r} has dtype {dtype}, which the safetensors writer does not know")
        start, end = end, end + math.prod(shape) * size[name]
        header[name] = {"dtype": _NAMES[dtype], "shape": list(shape), "data_offsets": [start, end]}
    encoded = json.dumps(header, separators=(",", ":")).encode()
    encoded += b" " * (-len(encoded) % 8)
    return len(encoded).to_bytes(8, "little") + encoded, names, header


# The format's dtype names (the safetensors specification) of the tensors this project writes.
_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
           "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
           "BOOL": torch.bool}
_NAMES = {dtype: name for name, dtype in _DTYPES.items()}


def tensors_from_bytes(
    data: bytes, cast: Callable[[str], torch.dtype | None] | None = None
) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """``(tensors, metadata)`` from safetensors bytes: CPU tensors, and ``{}`` when the file has no metadata.

    ``cast(name)``: the dtype a tensor is wanted in (None: as stored). Each
    tensor is then converted straight from a view of ``data``, one at a time,
    so loading float64 factors as float32 holds the bytes and the float32
    copies, never a float64 copy of every tensor as well.
    """
    from safetensors.torch import load

    if cast is None:  # the library's reader, which also checks the offsets
        metadata = SafetensorsView(data).metadata
        return load(data if isinstance(data, bytes) else bytes(data)), metadata
    view = SafetensorsView(data)
    return {name: view.tensor(name, cast(name)) for name in view.names}, view.metadata


class SafetensorsView:
    """The tensors of safetensors bytes (or a memory map of a file), each read only when asked for.

    ``tensor(name, dtype)`` copies one tensor out of the buffer (converted to
    ``dtype`` on the way, None: as stored), so a reader that needs one layer
    at a time holds one layer's copy, not the file's; the buffer itself (a
    read-only memory map of a local file: the page cache) stays shared.
    """

    def __init__(self, data: bytes):
        if len(data) < 8:
            raise ValueError(f"{len(data)} bytes is too short for a safetensors file")
        header_len = int.from_bytes(data[:8], "little")
        if 8 + header_len > len(data):
            raise ValueError(f"the header length {header_len} runs past the end of {len(data)} bytes")
        header = json.loads(data[8 : 8 + header_len])
        self.metadata: dict[str, str] = dict(header.pop("__metadata__", None) or {})
        self._entries: dict[str, dict] = header
        self._base, self._data = 8 + header_len, data
        for name, info in header.items():
            if info["dtype"] not in _DTYPES:
                raise ValueError(f"tensor {name!r} has dtype {info['dtype']}, which this reader does not know")
            start, end = info["data_offsets"]
            if not 0 <= start <= end <= len(data) - self._base:
                raise ValueError(f"tensor {name!r}'s offsets {start}..{end} run past the end of the data")

    @property
    def names(self) -> list[str]:
        return list(self._entries)

    def __contains__(self, name: str) -> bool:
        return name in self._entries

    def spec(self, name: str) -> tuple[torch.dtype, tuple[int, ...]]:
        """``(dtype, shape)`` of ``name`` as stored (nothing read)."""
        info = self._entries[name]
        return _DTYPES[info["dtype"]], tuple(info["shape"])

    def tensor(self, name: str, dtype: torch.dtype | None = None) -> torch.Tensor:
        """A fresh CPU tensor (never a view of the buffer) of ``name``, in ``dtype`` (None: as stored)."""
        info = self._entries[name]
        stored, (start, end) = _DTYPES[info["dtype"]], info["data_offsets"]
        with warnings.catch_warnings():  # a view of read-only bytes; it is copied below, never written
            warnings.simplefilter("ignore", UserWarning)
            flat = (torch.frombuffer(memoryview(self._data)[self._base + start : self._base + end], dtype=stored)
                    if end > start else torch.empty(0, dtype=stored))
        tensor = flat.reshape(info["shape"])
        wanted = dtype or stored
        return tensor.to(wanted) if wanted != stored else tensor.clone()
