"""Loading the model and tokenizer from a local folder or object storage.

A model on object storage is downloaded once per node into
``model.cache_dir/{hash of the URL and its listing}``: into a temporary
folder first, renamed into place when complete, under a file lock so that
several workers on one node download it once. Only safetensors weights are
loaded (no pickle), and ``trust_remote_code`` stays off unless asked for.
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import tempfile

import fsspec

from pipeline.errors import BadInputError

log = logging.getLogger(__name__)


def check_model_dir(path: str, storage_options: dict | None = None) -> list[str]:
    """Raise ``BadInputError`` unless ``path`` holds config.json and safetensors weights; return the file names."""
    fs, root = fsspec.core.url_to_fs(path, **(storage_options or {}))
    if not fs.isdir(root):
        raise BadInputError(f"model.path {path!r} is not a folder (a Hugging Face model directory is expected)")
    names = sorted(p.rsplit("/", 1)[-1] for p in fs.ls(root, detail=False))
    gguf = [n for n in names if n.endswith(".gguf")]
    if gguf and not any(n.endswith(".safetensors") for n in names):
        raise BadInputError(
            f"model.path {path!r} holds a GGUF checkpoint ({gguf[0]}), which is not loaded directly: convert it once "
            f"with `python -m pipeline.pretrained convert {path} OUT_DIR` and set model.path=OUT_DIR")
    if "config.json" not in names:
        raise BadInputError(f"model.path {path!r} has no config.json; it holds {names[:10]}")
    if not any(n.endswith(".safetensors") for n in names):
        hint = " (it has pickle-based .bin weights: convert them to safetensors)" if any(n.endswith(".bin") for n in names) else ""
        raise BadInputError(f"model.path {path!r} has no .safetensors weights{hint}")
    return names


def local_model_dir(path: str, cache_dir: str, storage_options: dict | None = None) -> str:
    """A local folder holding the model: ``path`` itself, or a per-node cached download of it."""
    fs, root = fsspec.core.url_to_fs(path, **(storage_options or {}))
    if "file" in (fs.protocol if isinstance(fs.protocol, tuple) else (fs.protocol,)):
        check_model_dir(path)
        return root
    files = fs.find(root, detail=True)
    listing = "|".join(f"{k}:{v.get('size')}:{v.get('ETag', '')}" for k, v in sorted(files.items()))
    key = hashlib.sha256(f"{path}|{listing}".encode()).hexdigest()[:16]
    target = os.path.join(cache_dir, key)
    if os.path.exists(os.path.join(target, ".complete")):
        return target
    os.makedirs(cache_dir, exist_ok=True)
    from filelock import FileLock

    with FileLock(target + ".lock"):
        if os.path.exists(os.path.join(target, ".complete")):
            return target
        check_model_dir(path, storage_options)
        tmp = tempfile.mkdtemp(dir=cache_dir, prefix=".download-")
        try:
            for remote in files:
                rel = remote[len(root.rstrip("/")) + 1 :]
                dest = os.path.join(tmp, rel)
                os.makedirs(os.path.dirname(dest), exist_ok=True)
                fs.get_file(remote, dest)
            open(os.path.join(tmp, ".complete"), "w").close()
            if os.path.exists(target):
                shutil.rmtree(target)
            os.replace(tmp, target)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        log.info("downloaded model %s to %s", path, target)
    return target


def load_model_and_tokenizer(local_dir: str, trust_remote_code: bool = False):
    """``(model, tokenizer)`` in float32 on the CPU; the tokenizer gets a pad token if it has none."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    check_model_dir(local_dir)
    tokenizer = AutoTokenizer.from_pretrained(local_dir, trust_remote_code=trust_remote_code)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    if tokenizer.eos_token_id is None:
        raise BadInputError(f"the tokenizer in {local_dir} has no EOS token; it is needed to pad and end documents")
    model = AutoModelForCausalLM.from_pretrained(
        local_dir, trust_remote_code=trust_remote_code, use_safetensors=True, dtype="float32"
    )
    return model, tokenizer
