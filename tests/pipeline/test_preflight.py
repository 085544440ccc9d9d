"""The driver preflight: model, window, memory, tokenisation, queries and weights checked before Ray starts.

Every bad input goes through ``run_attribution`` with ``ray.init`` replaced by
a function that fails the test, and must end with the project's error type and
a one-line message naming the key to change; one goes through the job itself
(exit status 2, one line, no Ray files). The models are tiny Llama and GPT-2
models built from configs, with character-level tokenizers: the Llama one puts
BOS in front of text as Llama's do, the GPT-2 one does not.
"""

from __future__ import annotations

import os
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from tokenizers import Tokenizer, models, pre_tokenizers, processors
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from pipeline.config import AttributeConfig, ClusterConfig, CorpusConfig, ModelConfig, QueriesConfig, StorageConfig
from pipeline.core.text import Tokenisation
from pipeline.errors import BadInputError, ConfigError, NoTrackedModulesError
from tests.helpers import job_fails, scratch_env, write_jsonl

REPO = Path(__file__).resolve().parents[2]
VOCAB = {"<s>": 0, "</s>": 1, "<pad>": 2, **{c: i + 3 for i, c in enumerate("abcdefghijklmnopqrstuvwxyz .")}}
QUERY = {"id": "q1", "prompt": "zorbia is", "completion": " quelmont."}


# ---- inputs -----------------------------------------------------------------------------------


def save_tokenizer(folder: Path, llama_style: bool, has_bos: bool = True) -> None:
    """A character-level tokenizer; ``llama_style``: BOS added by the post-processor, as Llama's fast tokenizers do.

    ``has_bos=False``: a GPT-2-style tokenizer without a BOS token at all.
    """
    tok = Tokenizer(models.WordLevel(VOCAB, unk_token="<pad>"))
    tok.pre_tokenizer = pre_tokenizers.Split("", "isolated")
    if llama_style:
        tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 0)])
        fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>")
    else:  # GPT-2 style: one end-of-text token that is also BOS, never added by the tokenizer itself
        bos = {"bos_token": "</s>"} if has_bos else {}
        fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="</s>", pad_token="<pad>", **bos)
    fast.save_pretrained(folder)


def save_model(folder: Path, family: str, positions: int = 4096) -> str:
    """A tiny ``family`` ("llama" or "gpt2") model with its tokenizer, as a Hugging Face folder (safetensors)."""
    torch.manual_seed(0)
    if family == "llama":
        config = LlamaConfig(vocab_size=len(VOCAB), hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                             num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=positions,
                             bos_token_id=0, eos_token_id=1, pad_token_id=2)
        model = LlamaForCausalLM(config)
    else:
        config = GPT2Config(vocab_size=len(VOCAB), n_embd=16, n_layer=1, n_head=2, n_positions=positions,
                            bos_token_id=1, eos_token_id=1)
        model = GPT2LMHeadModel(config)
    model.save_pretrained(folder, safe_serialization=True)
    save_tokenizer(folder, llama_style=family == "llama")
    return str(folder)


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory) -> str:
    return save_model(tmp_path_factory.mktemp("llama"), "llama")


@pytest.fixture(scope="module")
def gpt2_dir(tmp_path_factory) -> str:
    return save_model(tmp_path_factory.mktemp("gpt2"), "gpt2", positions=32)


def config(tmp_path: Path, model: str, queries: list[dict] | None = None, **parts) -> AttributeConfig:
    docs = [{"id": "a", "text": "some text here."}, {"id": "b", "text": "more"}]
    corpus = write_jsonl(tmp_path / "corpus.jsonl", docs)
    return AttributeConfig(
        model=parts.pop("model_config", ModelConfig(path=model)),
        corpus=CorpusConfig(path=corpus, **parts.pop("corpus_args", {})),
        queries=QueriesConfig(path=write_jsonl(tmp_path / "queries.jsonl", queries or [QUERY])),
        storage=StorageConfig(root=str(tmp_path / "out")),
        **parts,
    )


def checked(cfg: AttributeConfig):
    """``prepare`` and the preflight, as ``run_stages`` runs them before Ray."""
    from pipeline.context import check_before_workers, prepare

    return check_before_workers(prepare(cfg))


# ---- tokenisation: defaults from the tokenizer, applied by the workers, in the ids ------------------


def test_defaults_come_from_the_tokenizer_and_reach_the_workers(tmp_path, llama_dir, gpt2_dir, no_ray):
    from pipeline.context import worker_spec
    from pipeline.worker import ShardWorker

    for model, adds_bos in ((llama_dir, True), (gpt2_dir, False)):
        ctx = checked(config(tmp_path, model))
        assert ctx.tokenisation == Tokenisation(add_bos=adds_bos, add_eos=True)
        assert (ctx.cfg.corpus.add_bos, ctx.cfg.corpus.add_eos) == (adds_bos, True)  # recorded in the config
        worker = ShardWorker(worker_spec(ctx.cfg, ctx.tokenisation))
        windows, _ = worker._windows(ctx.shards[0])
        text = [VOCAB[c] for c in "some text here."]
        assert list(windows[0].input_ids) == [0] * adds_bos + text + [1]  # BOS only where Llama's tokenizer adds it
        (query,) = worker._query_windows(ctx.queries)
        assert (query.input_ids[0] == 0) is adds_bos and query.input_ids[-1] == VOCAB["."]  # no EOS after a query


def test_asking_for_bos_the_tokenizer_lacks(tmp_path, gpt2_dir, no_ray):
    folder = copy_model(gpt2_dir, tmp_path / "no-bos")
    save_tokenizer(folder, llama_style=False, has_bos=False)
    job_fails(config(tmp_path, str(folder), corpus_args={"add_bos": True}), BadInputError, "corpus.add_bos=true")
    assert checked(config(tmp_path, str(folder))).tokenisation.add_bos is False  # the default does not ask


def test_factors_are_reused_only_under_the_same_tokenisation(tmp_path, gpt2_dir, no_ray):
    def ids(**corpus_args):
        ctx = checked(config(tmp_path, gpt2_dir, corpus_args=corpus_args))
        ctx.model_fp = "model-fp"  # the workers' fingerprint of the model, the same for all runs here
        return ctx.factors_id, ctx.queries_id, ctx.factors_key

    default = ids()
    assert ids() == default  # same inputs: the same ids, so the committed factors are reused
    assert ids(add_bos=False, add_eos=True)[:2] == default[:2]  # the same tokenisation, given explicitly
    no_eos = ids(add_eos=False)
    assert no_eos[0] != default[0] and no_eos[1] != default[1]
    assert no_eos[2].to_json()["tokenisation"] == {"add_bos": False, "add_eos": False}
    with_bos = ids(add_bos=True)
    assert len({default[0], no_eos[0], with_bos[0]}) == 3 and with_bos[1] not in (default[1], no_eos[1])


def test_the_plain_tokenisation_keeps_the_ids_it_had_before_the_keys(tmp_path):
    from pipeline.core.influence import InfluenceConfig
    from pipeline.identity import FactorsKey, QueriesKey

    inf = InfluenceConfig()
    plain = FactorsKey.of(inf, "m", 64, ["s"], tokenisation=Tokenisation(add_bos=False, add_eos=True))
    assert "tokenisation" not in plain.to_json() and plain == FactorsKey.of(inf, "m", 64, ["s"])
    llama = FactorsKey.of(inf, "m", 64, ["s"], tokenisation=Tokenisation(add_bos=True, add_eos=True))
    assert FactorsKey.from_json(llama.to_json()) == llama and llama.id != plain.id
    q = QueriesKey.of(inf, llama.id, "qfp", 64, Tokenisation(add_bos=True, add_eos=True))
    assert QueriesKey.from_json(q.to_json()) == q and q.id != QueriesKey.of(inf, llama.id, "qfp", 64).id


# ---- window ---------------------------------------------------------------------------------------


def test_unset_window_is_the_models_context_capped(tmp_path, llama_dir, gpt2_dir, no_ray):
    assert checked(config(tmp_path, llama_dir)).cfg.corpus.window == 2048  # 4096 positions, capped
    assert checked(config(tmp_path, gpt2_dir)).cfg.corpus.window == 32  # n_positions
    assert checked(config(tmp_path, gpt2_dir, corpus_args={"window": 24})).cfg.corpus.window == 24


def test_the_demo_sets_its_own_window(monkeypatch):
    from types import SimpleNamespace

    import pipeline.demo
    from pipeline.context import resolve_demo

    built = SimpleNamespace(model_dir="m", corpus_path="c", queries_path="q")
    monkeypatch.setattr(pipeline.demo, "build_demo", lambda cache_dir, spec: built)
    assert resolve_demo(AttributeConfig()).corpus.window == 64
    assert resolve_demo(AttributeConfig(corpus=CorpusConfig(window=32))).corpus.window == 32


def test_window_longer_than_the_models_positions(tmp_path, gpt2_dir, no_ray):
    job_fails(config(tmp_path, gpt2_dir, corpus_args={"window": 64}), ConfigError, "corpus.window=64", "32 positions")


def test_query_longer_than_the_window_is_found_before_the_fit(tmp_path, gpt2_dir, no_ray):
    long = {"id": "q-long", "prompt": "a" * 20, "completion": " bcdefghijklmnop"}
    msg = job_fails(config(tmp_path, gpt2_dir, [QUERY, long], corpus_args={"window": 30}), BadInputError,
                "corpus.window=30", "'q-long'", "1 of 2 queries")
    assert "36" in msg  # its length in tokens


# ---- modules, memory, weights ----------------------------------------------------------------------


@pytest.mark.parametrize(
    "pattern, error", [(r".*mlp\.(", ConfigError), (r".*\.attention_nowhere\..*", NoTrackedModulesError)]
)
def test_module_pattern_invalid_or_matching_nothing(tmp_path, llama_dir, no_ray, pattern, error):
    msg = job_fails(config(tmp_path, llama_dir, model_config=ModelConfig(path=llama_dir, modules=pattern)), error,
                f"model.modules={pattern!r}")
    if error is NoTrackedModulesError:
        assert "mlp.up_proj" in msg  # lists the layers there are


def test_model_too_large_for_a_worker(tmp_path, llama_dir, no_ray, monkeypatch):
    job_fails(config(tmp_path, llama_dir, cluster=ClusterConfig(worker_memory_gb=1e-6)), BadInputError,
          "cluster.worker_memory_gb", "model.precision=float32")
    # Measured on this machine when Ray is local: the available memory shared by the workers.
    import pipeline.preflight

    monkeypatch.setattr(pipeline.preflight, "_available_ram", lambda: 10_000)
    job_fails(config(tmp_path, llama_dir, cluster=ClusterConfig(num_workers=4)), BadInputError,
          "cluster.num_workers=4", "GiB")


def copy_model(src: str, dst: Path) -> Path:
    dst.mkdir()
    for name in os.listdir(src):
        (dst / name).write_bytes((Path(src) / name).read_bytes())
    return dst


def test_truncated_weights_file(tmp_path, llama_dir, no_ray):
    folder = copy_model(llama_dir, tmp_path / "truncated")
    weights = folder / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    job_fails(config(tmp_path, str(folder)), BadInputError, "model.path", str(weights), "truncated")
    weights.write_bytes(b"\x05")
    job_fails(config(tmp_path, str(folder)), BadInputError, str(weights), "shorter than a header")


def test_non_finite_weights(tmp_path, llama_dir, no_ray):
    folder = copy_model(llama_dir, tmp_path / "nan")
    tensors = load_file(folder / "model.safetensors")
    name = "model.layers.0.mlp.down_proj.weight"
    tensors[name][0, 0] = float("nan")
    save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})
    job_fails(config(tmp_path, str(folder)), BadInputError, "model.path", repr(name), "NaN")
    # Finite but huge weights whose sum overflows are not mistaken for non-finite ones.
    tensors[name][0, 0] = 3e38
    tensors[name][0, 1] = 3e38
    save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})
    checked(config(tmp_path, str(folder)))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float8_e4m3fn, torch.float32, torch.float64])
def test_the_finite_check_for_every_weight_dtype(dtype):
    from pipeline.preflight import _finite

    ones = torch.ones(64).to(dtype)
    assert _finite(ones)
    # float8_e4m3fn has no infinities (torch saturates them to +-448): NaN only.
    for bad in (float("nan"),) if dtype == torch.float8_e4m3fn else (float("nan"), float("inf"), float("-inf")):
        poisoned = ones.clone().float()
        poisoned[5] = bad
        assert not _finite(poisoned.to(dtype))


# ---- the job: exit status 2, one line, no Ray -------------------------------------------------------


def test_job_exits_2_with_one_line_before_ray(tmp_path, gpt2_dir):
    cfg = config(tmp_path, gpt2_dir)
    with scratch_env() as scratch:
        proc = subprocess.run(
            [sys.executable, str(REPO / "jobs" / "attribute.py"), "model=hf", f"model.path={gpt2_dir}",
             f"corpus.path={cfg.corpus.path}", f"queries.path={cfg.queries.path}", "corpus.window=64",
             f"storage.root={tmp_path / 'out'}", f"hydra.run.dir={tmp_path / 'hydra'}"],
            cwd=tmp_path, env=dict(os.environ, HYDRA_FULL_ERROR="0"), capture_output=True, text=True, timeout=300,
        )
        ray_dirs = [p for p in os.listdir(scratch) if p != "home"]
    output = (proc.stdout + proc.stderr).strip()
    assert proc.returncode == 2, output
    # The progress log says what was validated; the failure is one line, the last.
    lines = [line for line in output.splitlines() if line.strip() and "][INFO] - " not in line]
    assert len(lines) == 1 and "corpus.window=64" in lines[0] and "Traceback" not in output, output
    assert output.splitlines()[-1] == lines[0]
    assert not ray_dirs, f"Ray started: {ray_dirs}"


# ---- the manifest records the resolved window and tokenisation ----------------------------------------


def test_manifest_records_window_tokenisation_and_bad_texts(tmp_path, llama_dir, no_ray):
    from pipeline.run import write_manifest

    cfg = config(tmp_path, llama_dir)
    corpus = write_jsonl(tmp_path / "bad.jsonl", [{"id": "a", "text": "abc"}, {"id": "b", "text": None},
                                                  {"id": "c", "text": 7}])
    ctx = checked(replace(cfg, corpus=replace(cfg.corpus, path=corpus)))
    ctx.model_fp = "model-fp"
    manifest = write_manifest(ctx, "table-url")
    assert manifest["corpus"]["window"] == 2048 == manifest["config"]["corpus"]["window"]
    assert manifest["corpus"]["tokenisation"] == {"add_bos": True, "add_eos": True}
    assert manifest["config"]["corpus"]["add_bos"] is True
    counts = manifest["counts"]
    assert (counts["num_null_texts"], counts["num_nonstring_texts"]) == (1, 1)
    assert counts["bad_texts_per_file"] == {corpus: {"null": 1, "non_string": 1}}


# ---- a model on object storage: config and tokenizer copied, weights' headers read in place ------------


@pytest.mark.integration
def test_model_on_s3_is_checked_without_downloading_its_weights(tmp_path, llama_dir, s3_env, caplog):
    import s3fs

    from pipeline.core.text import Tokenisation
    from pipeline.corpus import Query
    from pipeline.preflight import preflight

    fs = s3fs.S3FileSystem()
    url = f"{s3_env}/models/llama"
    fs.put(llama_dir, url, recursive=True)
    cfg = config(tmp_path, url)
    queries = [Query(**QUERY)]
    with caplog.at_level("INFO", logger="pipeline.preflight"):
        result = preflight(cfg, queries)
    assert (result.window, result.tokenisation) == (2048, Tokenisation(add_bos=True, add_eos=True))
    assert any("values not scanned" in r.getMessage() for r in caplog.records)
    weights = f"{url}/model.safetensors"
    data = fs.cat(weights)
    for cut in (len(data) // 2, 1000):  # the tensors cut off; the header itself cut off
        fs.pipe(weights, data[:cut])
        with pytest.raises(BadInputError, match="truncated"):
            preflight(cfg, queries)


@pytest.mark.integration
def test_fitted_factors_are_reused_under_the_same_tokenisation_only(tmp_path, llama_dir):
    """Fit on a local Ray; the same config again reuses the committed factors; add_eos=false fits new ones.

    One local Ray for the three runs, and ``cluster.reuse_workers``: the second run reuses the first's
    worker (the same spec); the third, under another tokenisation, starts its own.
    """
    from pipeline.run import run_stages
    from tests.helpers import local_ray

    def fit(**corpus_args):
        cfg = config(tmp_path, llama_dir, corpus_args=corpus_args,
                     cluster=ClusterConfig(num_workers=1, cpus_per_worker=1, reuse_workers=True))
        ctx = run_stages(cfg, ["fit"])
        factors = Path(ctx.factors_url)
        return ctx.factors_id, factors.stat().st_mtime_ns, ctx.factors_key

    with local_ray(num_cpus=1):
        first = fit()
        again = fit()
        no_eos = fit(add_eos=False)
    assert again[:2] == first[:2]  # the same id, the file untouched: reused
    assert no_eos[0] != first[0] and no_eos[2].tokenisation == Tokenisation(add_bos=True, add_eos=False)
    assert first[2].tokenisation == Tokenisation(add_bos=True, add_eos=True)  # Llama's tokenizer adds BOS
