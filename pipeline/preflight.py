"""Driver preflight: everything knowable about the model, the window and the queries, before any worker starts.

``preflight(cfg, queries)`` reads the model folder's config and tokenizer (on
object storage: those small files only, never the weights), builds the model
on the meta device (no memory, no weights) and checks, each failure one line
naming the key to change (``ConfigError``/``BadInputError``, exit status 2):

- ``model.modules``: a valid regular expression matching at least one
  Linear/Conv1D layer;
- ``corpus.window``: unset, the model's context (``max_position_embeddings``
  or ``n_positions``) capped at ``MAX_DEFAULT_WINDOW``; set, no longer than it;
- the model fits a worker's memory at ``model.precision`` (its weights alone,
  from the parameter count; ``cluster.worker_memory_gb``, or the driver's
  machine when Ray is local);
- ``corpus.add_bos``/``add_eos`` resolved against the tokenizer (a token the
  tokenizer lacks is refused), and every query (BOS + prompt + completion)
  fits the window;
- every safetensors file has a readable header whose tensors lie inside the
  file, and (``model.check_weights``, local folders) every weight is finite.

It returns what the workers and the content ids need: the window and the
tokenisation (docs/design.md#tokenisation-and-windows).
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import fsspec
import torch

from pipeline.config import AttributeConfig
from pipeline.core.text import Tokenisation, encode_query, resolve_tokenisation
from pipeline.core.tracking import find_tracked_layers
from pipeline.corpus import Query
from pipeline.errors import BadInputError, ConfigError

log = logging.getLogger(__name__)

# The default window when corpus.window is unset: the model's context, at most this many tokens (longer
# windows make every forward and backward quadratically dearer for little gain in attribution).
MAX_DEFAULT_WINDOW = 2048

# Config attributes that state a model's context length, in the order they are looked for.
POSITION_KEYS = ("max_position_embeddings", "n_positions", "n_ctx")

# Files of a model folder that hold weights: never downloaded by the preflight.
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".gguf", ".pt", ".pth", ".ckpt", ".h5", ".msgpack", ".onnx")

# Bytes per parameter of the weights a worker holds: float32 weights under bf16 autocast too.
BYTES_PER_PARAM = {"float32": 4, "float64": 8, "bf16": 4}

# safetensors dtype names and their sizes in bytes.
SAFETENSORS_DTYPES = {
    "BOOL": 1, "U8": 1, "I8": 1, "F8_E5M2": 1, "F8_E4M3": 1, "I16": 2, "U16": 2, "F16": 2, "BF16": 2,
    "I32": 4, "U32": 4, "F32": 4, "I64": 8, "U64": 8, "F64": 8,
}
MAX_HEADER_BYTES = 100_000_000  # safetensors' own limit


@dataclass(frozen=True)
class Preflight:
    """What the preflight resolved (the window, the tokenisation) and what it found (for the log)."""

    window: int
    tokenisation: Tokenisation
    num_params: int
    positions: int | None  # the model's context length, None when its config states none
    num_layers: int  # tracked layers


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return text[:300] + (" ..." if len(text) > 300 else "")


def _is_local(fs) -> bool:
    return "file" in (fs.protocol if isinstance(fs.protocol, tuple) else (fs.protocol,))


@contextmanager
def model_metadata_dir(path: str, storage_options: dict | None = None) -> Iterator[str]:
    """A local folder with the model's config and tokenizer files: ``path`` itself, or a temporary copy of them.

    From object storage only the folder's top-level non-weight files are copied (config, tokenizer, ...).
    """
    fs, root = fsspec.core.url_to_fs(path, **(storage_options or {}))
    if _is_local(fs):
        yield root
        return
    tmp = tempfile.mkdtemp(prefix="attribution-preflight-")
    try:
        for entry in fs.ls(root, detail=True):
            name = entry["name"].rstrip("/").rsplit("/", 1)[-1]
            if entry.get("type") != "file" or name in ("", ".", "..") or name.endswith(WEIGHT_SUFFIXES):
                continue
            fs.get_file(entry["name"], os.path.join(tmp, name))
        yield tmp
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def read_model_config(folder: str, cfg: AttributeConfig):
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(folder, trust_remote_code=cfg.model.trust_remote_code)
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise BadInputError(
            f"model.path {cfg.model.path!r}: config.json is not a readable model config ({_one_line(exc)})"
        ) from None


def context_length(config) -> int | None:
    """The model's number of positions, from the first of ``POSITION_KEYS`` its config states."""
    for key in POSITION_KEYS:
        value = getattr(config, key, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def resolve_window(window: int | None, positions: int | None) -> int:
    """``corpus.window``, or the model's context capped at ``MAX_DEFAULT_WINDOW`` when unset."""
    if window is None:
        if positions is None:
            raise ConfigError(
                f"corpus.window is unset and the model's config states no context length ({', '.join(POSITION_KEYS)}); "
                "set corpus.window"
            )
        return min(positions, MAX_DEFAULT_WINDOW)
    if positions is not None and window > positions:
        raise ConfigError(
            f"corpus.window={window} is longer than the model's {positions} positions; set corpus.window <= {positions}"
        )
    return window


def meta_model(config, cfg: AttributeConfig) -> torch.nn.Module:
    """The model built from its config on the meta device: module names and shapes, no memory, no weights."""
    from transformers import AutoModelForCausalLM

    try:
        with torch.device("meta"):
            return AutoModelForCausalLM.from_config(config, trust_remote_code=cfg.model.trust_remote_code)
    except (ValueError, KeyError, TypeError, ImportError, AttributeError) as exc:
        raise BadInputError(
            f"model.path {cfg.model.path!r}: its config does not describe a causal LM that transformers can build "
            f"({_one_line(exc)})"
        ) from None


def check_modules(model: torch.nn.Module, pattern: str) -> int:
    """The number of layers ``model.modules`` tracks; an invalid or unmatched pattern is refused."""
    try:
        re.compile(pattern)
    except re.error as exc:
        raise ConfigError(f"model.modules={pattern!r} is not a valid regular expression ({exc})") from None
    return len(find_tracked_layers(model, pattern))  # NoTrackedModulesError names model.modules and the layers


def _available_ram() -> int:
    """Bytes of memory available to new processes on this machine (MemAvailable)."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def worker_memory(cfg: AttributeConfig) -> tuple[int, str] | None:
    """Bytes one worker may use and where that figure comes from; None when it cannot be known here."""
    cluster = cfg.cluster
    if cluster.worker_memory_gb > 0:
        return int(cluster.worker_memory_gb * 2**30), "cluster.worker_memory_gb"
    if cluster.address:
        return None  # the workers' machines are not this one
    if cluster.gpus_per_worker > 0 and torch.cuda.is_available():
        free, _ = torch.cuda.mem_get_info()
        share = min(1.0, cluster.gpus_per_worker)
        return int(free * share), f"free GPU memory x cluster.gpus_per_worker={cluster.gpus_per_worker:g}"
    workers = cluster.num_workers
    return _available_ram() // workers, f"available RAM / cluster.num_workers={workers}"


def check_memory(num_params: int, cfg: AttributeConfig) -> None:
    """Refuse a model whose weights alone (at ``model.precision``) exceed one worker's memory."""
    need = num_params * BYTES_PER_PARAM[cfg.model.precision]
    have = worker_memory(cfg)
    if have is None:
        log.info("model memory not checked on the driver (remote cluster; set cluster.worker_memory_gb to check)")
        return
    limit, source = have
    if need > limit:
        raise BadInputError(
            f"the model has {num_params / 1e6:.0f}M parameters: its weights alone need {need / 2**30:.2f} GiB at "
            f"model.precision={cfg.model.precision}, more than the {limit / 2**30:.2f} GiB a worker has ({source}); "
            "lower cluster.num_workers, use GPU workers (cluster.gpus_per_worker) or a smaller model.precision, "
            "or set cluster.worker_memory_gb"
        )


def read_tokenizer(folder: str, cfg: AttributeConfig):
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(folder, trust_remote_code=cfg.model.trust_remote_code)
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise BadInputError(
            f"model.path {cfg.model.path!r}: the tokenizer cannot be loaded ({_one_line(exc)})"
        ) from None
    if tokenizer.eos_token_id is None:
        raise BadInputError(
            f"model.path {cfg.model.path!r}: the tokenizer has no EOS token; it is needed to pad and end documents"
        )
    return tokenizer


def check_query_lengths(tokenizer, queries: list[Query], window: int, tokenisation: Tokenisation) -> int:
    """The longest query's tokens (BOS, prompt, completion); a query longer than ``window`` is refused."""
    lengths = {
        q.id: len(encode_query(tokenizer, q.id, q.prompt, q.completion, 2**62, tokenisation).input_ids)
        for q in queries
    }
    if not lengths:
        return 0
    longest = max(lengths, key=lengths.get)
    too_long = [q for q, n in lengths.items() if n > window]
    if too_long:
        raise BadInputError(
            f"{len(too_long)} of {len(queries)} queries are longer than corpus.window={window} tokens (prompt + "
            f"completion; the longest, {longest!r}, has {lengths[longest]}); raise corpus.window or shorten them"
        )
    return lengths[longest]


def _safetensors_header(fs, path: str, url: str) -> dict:
    """The header of one safetensors file, checked: parsable, known dtypes, every tensor inside the file."""

    def bad(reason: str) -> BadInputError:
        return BadInputError(f"model.path: weights file {url} is not readable safetensors ({reason}); re-export it")

    size = fs.size(path)
    try:
        with fs.open(path, "rb") as f:
            prefix = f.read(8)
            if len(prefix) < 8:
                raise bad(f"{size} bytes, shorter than a header")
            length = int.from_bytes(prefix, "little")
            if length > min(size - 8, MAX_HEADER_BYTES):
                raise bad(f"a header of {length} bytes in a file of {size}: truncated?")
            header = json.loads(f.read(length).decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise bad(f"header is not JSON: {_one_line(exc)}") from None
    except OSError as exc:
        raise bad(_one_line(exc)) from None
    if not isinstance(header, dict):
        raise bad("header is not a JSON object")
    data_bytes = size - 8 - length
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        try:
            itemsize = SAFETENSORS_DTYPES[entry["dtype"]]
            start, end = entry["data_offsets"]
            expected = math.prod(entry["shape"]) * itemsize
        except (KeyError, TypeError, ValueError):
            raise bad(f"tensor {name!r} has a malformed entry {entry!r:.120}") from None
        if not 0 <= start <= end <= data_bytes or end - start != expected:
            raise bad(f"tensor {name!r} lies outside the file or has the wrong size (truncated?)")
    return header


def _finite(tensor: torch.Tensor) -> bool:
    # One sum per tensor is the fast path (NaN and inf propagate); a non-finite sum may be an overflow of
    # finite values, so it is confirmed element by element. Half, bfloat16 and float8 are checked in float32,
    # which holds each of their values exactly.
    if tensor.element_size() < 4:
        tensor = tensor.float()
    return bool(torch.isfinite(tensor.sum())) or bool(torch.isfinite(tensor).all())


def check_weights(path: str, storage_options: dict | None = None, scan: bool = True) -> int:
    """Check every safetensors file's header and, for a local folder with ``scan``, that every weight is finite.

    Returns the number of tensors checked. The scan reads the weights memory-mapped, one tensor at a time.
    """
    fs, root = fsspec.core.url_to_fs(path, **(storage_options or {}))
    files = sorted(p for p in fs.ls(root, detail=False) if p.endswith(".safetensors"))
    count = 0
    for p in files:
        url = p if _is_local(fs) else fs.unstrip_protocol(p)
        header = _safetensors_header(fs, p, url)
        count += len(header) - ("__metadata__" in header)
        if not scan or not _is_local(fs):
            continue
        from safetensors import SafetensorError, safe_open

        try:
            with safe_open(p, framework="pt") as f:
                for name in f.keys():
                    tensor = f.get_tensor(name)
                    if tensor.is_floating_point() and not _finite(tensor):
                        raise BadInputError(
                            f"model.path: weight {name!r} in {url} has NaN or infinite values; attribution needs "
                            "finite weights (check the checkpoint, or the training run that wrote it)"
                        )
        except SafetensorError as exc:
            raise BadInputError(f"model.path: weights file {url} cannot be read ({_one_line(exc)})") from None
    if scan and not _is_local(fs):
        log.info("model weights on object storage: headers checked, values not scanned on the driver")
    return count


def preflight(cfg: AttributeConfig, queries: list[Query]) -> Preflight:
    """Check the model, window and queries on the driver (module docstring); the resolved window and tokenisation."""
    with model_metadata_dir(cfg.model.path, cfg.storage.options) as folder:
        config = read_model_config(folder, cfg)
        positions = context_length(config)
        window = resolve_window(cfg.corpus.window, positions)
        model = meta_model(config, cfg)
        num_layers = check_modules(model, cfg.model.modules)
        num_params = sum(p.numel() for p in model.parameters())
        check_memory(num_params, cfg)
        tokenizer = read_tokenizer(folder, cfg)
    tokenisation = resolve_tokenisation(tokenizer, cfg.corpus.add_bos, cfg.corpus.add_eos)
    longest = check_query_lengths(tokenizer, queries, window, tokenisation)
    check_weights(cfg.model.path, cfg.storage.options, scan=cfg.model.check_weights)
    log.info(
        "preflight: %s parameters, %d tracked layers, window %d (model positions %s), add_bos=%s add_eos=%s, "
        "longest query %d tokens",
        f"{num_params:,}", num_layers, window, positions, tokenisation.add_bos, tokenisation.add_eos, longest,
    )
    return Preflight(window, tokenisation, num_params, positions, num_layers)
