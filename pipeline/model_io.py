"""Loading the model and tokenizer from a local folder or object storage.

A model on object storage is downloaded once per node into
``model.cache_dir/{hash of the URL and its listing}``: into a temporary
folder first, renamed into place when complete, under a file lock so that
several workers on one node download it once. Only safetensors weights are
loaded (no pickle), and ``trust_remote_code`` stays off unless asked for.

Object keys are untrusted names: a key that would land outside the download
folder (a ``..`` part, an absolute or empty part, a backslash) is refused with
`BadInputError` before anything is written, on the driver (`check_model_dir`)
and again on the worker, and a cache folder whose path leads elsewhere through
a symlink is refused too. Credentials come from the AWS environment or a
credentials file (see `pipeline.storage`).
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import tempfile

from pipeline.errors import BadInputError
from pipeline.storage import filesystem

log = logging.getLogger(__name__)


def check_model_dir(path: str, storage_options: dict | None = None) -> list[str]:
    """Raise ``BadInputError`` unless ``path`` holds config.json and safetensors weights; return the file names.

    For a model on object storage every key under it is also checked (`safe_relative_path`).
    """
    fs, root = filesystem(path, storage_options)
    if not fs.isdir(root):
        raise BadInputError(f"model.path {path!r} is not a folder (a Hugging Face model directory is expected)")
    if not _is_local(fs):
        for remote in _objects(fs, root):
            safe_relative_path(path, root, remote)
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


def _objects(fs, root: str) -> dict:
    """``{key: info}`` of the objects under ``root``, folder markers (keys ending in ``/``) left out."""
    return {k: v for k, v in fs.find(root, detail=True).items() if not k.endswith("/")}


def _is_local(fs) -> bool:
    return "file" in (fs.protocol if isinstance(fs.protocol, tuple) else (fs.protocol,))


def safe_relative_path(path: str, root: str, remote: str) -> str:
    """The object ``remote`` (a key under ``root``) as a relative path that stays inside a folder.

    Raises `BadInputError` naming the key and ``model.path`` for a key outside
    ``root`` or with an empty, ``.``, ``..`` or absolute part, or a backslash.
    """
    prefix = root.rstrip("/") + "/"
    rel = remote[len(prefix):] if remote.startswith(prefix) else None
    parts = rel.split("/") if rel else []
    if not parts or any(p in ("", ".", "..") or "\\" in p or "\0" in p for p in parts):
        raise BadInputError(
            f"model.path {path!r} holds the object {remote!r}, whose key would be written outside the model "
            "cache (model.cache_dir); refusing to download the model: remove or rename that object"
        )
    return "/".join(parts)


def _inside(folder: str, dest: str) -> bool:
    """Whether ``dest`` resolves (symlinks followed) to a path inside ``folder``."""
    folder = os.path.realpath(folder)
    return os.path.commonpath([folder, os.path.realpath(dest)]) == folder


def local_model_dir(path: str, cache_dir: str, storage_options: dict | None = None) -> str:
    """A local folder holding the model: ``path`` itself, or a per-node cached download of it."""
    fs, root = filesystem(path, storage_options)
    if _is_local(fs):
        check_model_dir(path)
        return root
    files = _objects(fs, root)
    rels = {remote: safe_relative_path(path, root, remote) for remote in files}
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
            for remote, rel in rels.items():
                dest = os.path.join(tmp, *rel.split("/"))
                os.makedirs(os.path.dirname(dest), exist_ok=True)
                if not _inside(tmp, dest):  # a folder on the way is a symlink out of the cache
                    raise BadInputError(f"refusing to write {dest}: it resolves outside {tmp} (model.cache_dir)")
                fs.get_file(remote, dest)
            open(os.path.join(tmp, ".complete"), "w").close()
            if os.path.islink(target):
                raise BadInputError(f"model cache entry {target} is a symlink; remove it (model.cache_dir)")
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
