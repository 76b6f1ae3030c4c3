"""The direction-training cache on disk: same directions as in memory, resumable, bounded."""

from __future__ import annotations

import pytest
import torch

import focuslens.directions.streamed as S
from focuslens.data.synthetic import make_synthetic_qa
from focuslens.directions.cache import collect_attention_inputs
from focuslens.directions.train import span_attention, train_directions
from focuslens.errors import DataError
from focuslens.measure.scoring import prepare_prompts
from tests.conftest import get_tiny


def _prompts(model, n, seed=3, n_documents=4):
    # mixed lengths: different chunks get different T and R, so padding across chunks is exercised
    examples = make_synthetic_qa(n, n_documents=n_documents, seed=seed)
    examples += make_synthetic_qa(n // 2, n_documents=2, seed=seed + 1)
    return prepare_prompts(model, examples, quiet=True)


def _files(folder):
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_a_disk_batch_equals_the_in_memory_batch(arch, tmp_path):
    model = get_tiny(arch, 2)
    prompts = _prompts(model, 6)
    memory = collect_attention_inputs(model, prompts, quiet=True)
    disk = S.cache_to_disk(model, prompts, tmp_path / "c", chunk=4, quiet=True)
    assert len(disk) == len(memory) == 9 and disk.n_layers == memory.n_layers and disk.n_chunks == 3
    for index, layers in (([0], slice(0, 2)), ([8, 1, 4], slice(1, 2)), (list(range(9)), slice(0, 2))):
        a, b = memory.batch(index, layers), disk.batch(index, layers)
        # the same objective (padding rows may differ in number; they never count)
        dq = torch.randn(b.q.shape[1], b.q.shape[2], b.q.shape[-1])
        for got, want in zip(span_attention(b, dq).values(), span_attention(a, dq).values()):
            torch.testing.assert_close(got, want, rtol=0, atol=1e-6)
        # padded to the largest chunk padding of the batch (≥ the in-memory crop): zeros beyond it
        T = a.k.shape[3]
        assert b.k.shape[3] >= T and not b.k[..., T:, :].any() and not b.pattern[..., T:].any()
        torch.testing.assert_close(b.k[..., :T, :], a.k, rtol=0, atol=0)
        assert torch.equal(b.gold[:, :T], a.gold) and not b.gold[:, T:].any() and torch.equal(b.n_keys, a.n_keys)
    # a batch owns its tensors: reading the next one (straight or through the read buffer) leaves it be
    for index in ([8, 1], [3]):  # two chunks (staged), one chunk (read straight into the batch)
        first = disk.batch(index, slice(0, 2))
        disk.batch([0, 2, 3, 5], slice(0, 2))
        want = memory.batch(index, slice(0, 2)).k
        torch.testing.assert_close(first.k[..., : want.shape[3], :], want, rtol=0, atol=0)


def _nan_bytes(raw: bytes) -> bytes:
    """The same file with its last four bytes a float32 NaN: same size, so only a hash sees it."""
    return raw[:-4] + b"\x00\x00\xc0\x7f"


@pytest.mark.parametrize("damage,found", [(lambda raw: raw[:-64], r"\d+ bytes"), (_nan_bytes, "its sha256 differs"),
                                          (None, "missing")])
def test_a_damaged_shard_is_named_before_it_is_read(tmp_path, damage, found):
    model = get_tiny("llama", 2)
    prompts = _prompts(model, 2)
    S.cache_to_disk(model, prompts, tmp_path / "c", chunk=2, quiet=True)
    shard = tmp_path / "c" / "layer_001" / "chunk_00001.safetensors"
    train_directions(model, prompts, cache_dir=tmp_path / "t", epochs=1, quiet=True)
    trained = tmp_path / "t" / "train" / "layer_001" / "chunk_00000.safetensors"
    for path in (shard, trained):
        if damage is None:
            path.unlink()
        else:
            path.write_bytes(damage(path.read_bytes()))
    disk = S.ShardedInputs(tmp_path / "c")
    disk.batch([0], slice(0, 2))  # other chunks still read
    with pytest.raises(DataError, match=rf"layer_001/chunk_00001\.safetensors: {found}; chunk_00001\.index\.safetensors says"):
        disk.batch([2], slice(0, 2))
    with pytest.raises(DataError, match=r"train/layer_001/chunk_00000\.safetensors"):  # training names it too
        train_directions(model, prompts, cache_dir=tmp_path / "t", epochs=1, quiet=True)


def test_a_cache_without_meta_json_is_not_reused_for_other_prompts(tmp_path):
    model = get_tiny("llama", 2)
    S.cache_to_disk(model, _prompts(model, 4), tmp_path, chunk=2, quiet=True)
    (tmp_path / "meta.json").unlink()
    with pytest.raises(DataError, match="holds cached chunks but no meta.json"):
        S.cache_to_disk(model, _prompts(model, 4, seed=9), tmp_path, chunk=2, quiet=True)


def test_an_index_of_another_cache_is_refused(tmp_path):
    model = get_tiny("llama", 2)
    S.cache_to_disk(model, _prompts(model, 4), tmp_path / "a", chunk=2, quiet=True)
    S.cache_to_disk(model, _prompts(model, 4, seed=9), tmp_path / "b", chunk=2, quiet=True)
    name = "chunk_00001.index.safetensors"
    (tmp_path / "a" / name).write_bytes((tmp_path / "b" / name).read_bytes())
    with pytest.raises(DataError, match=rf"{name} is of other prompts"):
        S.ShardedInputs(tmp_path / "a")


def test_a_truncated_index_is_named(tmp_path):
    model = get_tiny("llama", 2)
    S.cache_to_disk(model, _prompts(model, 2), tmp_path, chunk=2, quiet=True)
    index = tmp_path / "chunk_00000.index.safetensors"
    index.write_bytes(index.read_bytes()[:-10])
    with pytest.raises(DataError, match=r"chunk_00000\.index\.safetensors"):
        S.ShardedInputs(tmp_path)


@pytest.mark.parametrize("layers_per_group", [None, 1])
def test_streamed_and_in_memory_directions_agree_to_1e_5(layers_per_group, tmp_path):
    model = get_tiny("llama", 2)
    train, val = _prompts(model, 6, seed=11), _prompts(model, 2, seed=21)
    kw = dict(epochs=4, lr=0.3, batch_size=2, patience=2, seed=5, quiet=True)
    memory = train_directions(model, train, val, **kw)
    disk = train_directions(model, train, val, cache_dir=tmp_path, layers_per_group=layers_per_group, **kw)
    torch.testing.assert_close(disk.q, memory.q, rtol=0, atol=1e-5)
    torch.testing.assert_close(disk.k, memory.k, rtol=0, atol=1e-5)
    assert disk.q.norm() > 2 * memory.q.new_tensor(0.01 * (memory.q.numel()) ** 0.5)  # they did learn
    assert disk.metadata["best_epoch"] == memory.metadata["best_epoch"]
    assert disk.metadata["cache"]["where"] == "disk" and memory.metadata["cache"]["where"] == "memory"
    assert (tmp_path / "train" / "layer_001" / "chunk_00000.safetensors").is_file()


def test_a_killed_caching_run_resumes_to_the_same_shards(tmp_path, monkeypatch):
    model = get_tiny("llama", 2)
    prompts = _prompts(model, 6)
    whole = S.cache_to_disk(model, prompts, tmp_path / "whole", chunk=2, quiet=True)
    real, calls = S._write_chunk, []

    def dies_in_chunk_2(folder, c, part, dtype, fingerprint):
        calls.append(c)
        if c == 2:  # killed after writing one layer's shard and before the index
            S.write_atomic(folder / "layer_000" / "chunk_00002.safetensors", b"half")
            raise KeyboardInterrupt
        real(folder, c, part, dtype, fingerprint)

    monkeypatch.setattr(S, "_write_chunk", dies_in_chunk_2)
    with pytest.raises(KeyboardInterrupt):
        S.cache_to_disk(model, prompts, tmp_path / "resumed", chunk=2, quiet=True)
    with pytest.raises(DataError, match="never finished"):
        S.ShardedInputs(tmp_path / "resumed")
    monkeypatch.setattr(S, "_write_chunk", lambda *a: (calls.append(a[1]), real(*a)))
    resumed = S.cache_to_disk(model, prompts, tmp_path / "resumed", chunk=2, quiet=True)
    assert calls == [0, 1, 2, 2, 3, 4]  # chunks 0 and 1 were not run again
    assert _files(tmp_path / "resumed") == _files(tmp_path / "whole") and len(resumed) == len(whole)


def test_a_cache_of_other_prompts_or_settings_is_refused_naming_the_field(tmp_path):
    model = get_tiny("llama", 2)
    prompts = _prompts(model, 4)
    S.cache_to_disk(model, prompts, tmp_path, chunk=2, quiet=True)
    with pytest.raises(DataError, match="fingerprint"):
        S.cache_to_disk(model, _prompts(model, 4, seed=9), tmp_path, chunk=2, quiet=True)
    with pytest.raises(DataError, match="chunk=2, not 3"):
        S.cache_to_disk(model, prompts, tmp_path, chunk=3, quiet=True)
    with pytest.raises(DataError, match="dtype"):
        S.cache_to_disk(model, prompts, tmp_path / "x", dtype="int8", quiet=True)
    with pytest.raises(DataError, match="layers_per_group"):
        train_directions(model, prompts, layers_per_group=0, quiet=True)


def test_half_precision_shards_are_half_the_size_and_train_nearly_the_same(tmp_path):
    model = get_tiny("llama", 2)
    prompts = _prompts(model, 4)
    full = S.cache_to_disk(model, prompts, tmp_path / "f32", quiet=True)
    half = S.cache_to_disk(model, prompts, tmp_path / "bf16", dtype="bfloat16", quiet=True)
    size = lambda f: sum(p.stat().st_size for p in f.folder.rglob("layer_*/*.safetensors"))  # noqa: E731
    assert size(half) < 0.55 * size(full)
    b = half.batch([0, 1], slice(0, 2))
    assert b.q.dtype == torch.float32  # the objective is computed in float32/float64
    dq = torch.randn(2, 4, b.q.shape[-1])
    got, want = span_attention(b, dq)["gold"], span_attention(full.batch([0, 1], slice(0, 2)), dq)["gold"]
    assert 0 < (got - want).abs().max() < 0.02


KILLED = """
import sys
from focuslens.data.synthetic import make_synthetic_qa
from focuslens.measure.scoring import prepare_prompts
from focuslens.directions.streamed import cache_to_disk
from focuslens.model.testing import tiny_model
model = tiny_model("llama", n_heads=4, n_kv_heads=2, seed=0)
prompts = prepare_prompts(model, make_synthetic_qa(60, n_documents=4, seed=3), quiet=True)
print("ready", flush=True)
cache_to_disk(model, prompts, sys.argv[1], chunk=2, quiet=True)
print("done", flush=True)
"""


@pytest.mark.parametrize("after", [2])
def test_a_cache_killed_with_sigkill_resumes_to_the_same_files(tmp_path, after):
    """SIGKILL once ``after`` chunks are complete (a write of the next one is then under way)."""
    import os
    import signal
    import subprocess
    import sys
    import time

    child = subprocess.Popen([sys.executable, "-c", KILLED, str(tmp_path / "killed")], stdout=subprocess.PIPE,
                             text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert child.stdout.readline().strip() == "ready"
    while len(list((tmp_path / "killed").glob("*.index.safetensors"))) < after and child.poll() is None:
        time.sleep(0.002)
    child.send_signal(signal.SIGKILL)
    child.wait()
    model = get_tiny("llama", 2)
    prompts = prepare_prompts(model, make_synthetic_qa(60, n_documents=4, seed=3), quiet=True)
    done = sorted(p.name for p in (tmp_path / "killed").glob("*.index.safetensors"))
    assert after <= len(done) < 30, f"{len(done)} of 30 chunks were written before the kill"
    S.cache_to_disk(model, prompts, tmp_path / "killed", chunk=2, quiet=True)
    S.cache_to_disk(model, prompts, tmp_path / "whole", chunk=2, quiet=True)
    assert _files(tmp_path / "killed") == _files(tmp_path / "whole")
