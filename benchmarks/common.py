"""What both measurement jobs share: the demo world, device and threads, the machine, JSON and numbers.

Both jobs record the machine they ran on (``machine_info``) next to their
figures and write strict JSON (``clean_json``); both run under a chosen
number of torch threads (``torch_threads``), because on a busy machine with
few cores torch's default oversubscribes and slows small operations tenfold.
"""

from __future__ import annotations

import contextlib
import math
import os
import platform
from dataclasses import asdict, dataclass
from typing import Optional

import numpy as np
import torch

from pipeline.demo import DemoSpec


@dataclass
class DemoWorldConfig:
    """The demo build both jobs measure on (``pipeline.demo``); null keeps ``DemoSpec``'s default."""

    # Where build_demo caches its builds (shared with the attribution job's demo by default).
    cache_dir: str = "outputs/demo-cache"
    n_filler_docs: Optional[int] = None
    n_facts: Optional[int] = None
    copies_per_fact: Optional[list[int]] = None
    train_steps: Optional[int] = None
    n_embd: Optional[int] = None
    n_layer: Optional[int] = None
    window: Optional[int] = None
    seed: Optional[int] = None

    def spec(self) -> DemoSpec:
        """The ``DemoSpec`` with the given overrides (with none, the main job's demo cache is reused)."""
        given = {k: v for k, v in asdict(self).items() if k != "cache_dir" and v is not None}
        return DemoSpec(**given)


def resolve_device(device: str) -> torch.device:
    """``auto``: CUDA when available, else CPU; anything else as given (``cpu``, ``cuda``, ``cuda:1``)."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


@contextlib.contextmanager
def torch_threads(threads: int):
    """Run with ``threads`` torch intra-op threads (0: unchanged), restoring the previous number."""
    previous = torch.get_num_threads()
    if threads > 0:
        torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def machine_info() -> dict:
    """What the figures were measured on (load average included: a busy machine slows every timing)."""
    cpu_model = platform.processor() or ""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu_model = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    info = {
        "cpu_count": os.cpu_count(),
        "cpu_model": cpu_model,
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(),
    }
    try:
        info["load_average_1m"] = round(os.getloadavg()[0], 2)
    except OSError:
        info["load_average_1m"] = None
    try:
        import psutil  # comes with ray[default]; the memory figure is only informative

        info["memory_gib"] = round(psutil.virtual_memory().total / 2**30, 1)
    except ImportError:
        info["memory_gib"] = None
    return info


def clean_json(obj):
    """Plain JSON types; NaN/inf become null (the storage writes strict JSON)."""
    if isinstance(obj, dict):
        return {str(k): clean_json(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [clean_json(v) for v in obj]
    if isinstance(obj, (np.floating, float)):
        value = float(obj)
        return value if math.isfinite(value) else None
    if isinstance(obj, np.integer):
        return int(obj)
    if isinstance(obj, np.bool_):
        return bool(obj)
    if isinstance(obj, torch.Tensor):
        return clean_json(obj.tolist())
    return obj


def format_number(x, digits: int = 3, significant: bool = False) -> str:
    """A table cell: ``-`` for None; floats with ``digits`` decimals, or ``significant`` digits.

    With ``significant``, numbers of 1000 or more are whole with thousands
    separators (rates such as tokens/s), smaller ones keep ``digits``
    significant digits (ratios, seconds).
    """
    if x is None:
        return "-"
    if isinstance(x, float):
        if not significant:
            return f"{x:.{digits}f}"
        return f"{x:,.0f}" if abs(x) >= 1000 else f"{x:.{digits}g}"
    return str(x)
