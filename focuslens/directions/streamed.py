"""The direction-training cache on disk: per-layer safetensors shards written as prompts
stream through the model, read back a batch and a group of layers at a time.

Why: the in-memory cache (:class:`~focuslens.directions.train.AttentionInputs`) holds, for every
prompt and layer, the answer-row queries, every key and the answer-row pattern:
``L·(H·R·d + kv·T·d + H·R·T)`` numbers per prompt, ≈ 70 MB for SmolLM2 at T ≈ 3k and
≈ 460 GB for the paper's 6.6k NQ prompts. On disk, memory is bounded by one chunk of
prompts while caching and by one batch of one layer group while training.

Layout of a cache folder::

    meta.json                      what was cached (model, prompt fingerprint, dtype, chunk)
    layer_000/chunk_00000.safetensors   q [c, H, R_c, d], k [c, kv, T_c, d], pattern [c, H, R_c, T_c]
    ...
    chunk_00000.index.safetensors  row_pos [c, R_c], n_keys [c], gold, sink [c, T_c]

A chunk's index file is written last, each file atomically (:func:`focuslens.io.write_atomic`):
a chunk is complete exactly when its index exists, so a killed caching run resumes at the
first chunk without one and the finished shards are byte-identical to an uninterrupted run.
The objective is computed from these tensors in float32/float64 as in memory; the shards may
be stored in float16/bfloat16 (``dtype``) to halve the disk and read volume.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Sequence
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save
from torch import Tensor

from focuslens.data.render import Prompt
from focuslens.directions.cache import AttentionInputs, collect_attention_inputs
from focuslens.errors import DataError
from focuslens.io import file_entry, file_problem, read_json, safetensors_header, write_atomic, write_json
from focuslens.model.finite import require_finite
from focuslens.model.load import attention_scaling, model_id
from focuslens.model.parallel import is_main, share, world
from focuslens.progress import tqdm

__all__ = ["ShardedInputs", "cache_to_disk", "fingerprint"]

_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
_TENSORS = ("q", "k", "pattern")
_SAFETENSORS_DTYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}
_OWN = "focuslens"  # the index header entry that lists the chunk's shards


def fingerprint(prompts: Sequence[Prompt]) -> str:
    """A hash of what the cache depends on in each prompt: its tokens and its spans."""
    h = hashlib.sha256()
    for p in prompts:
        h.update(p.input_ids.to(torch.int64).numpy().tobytes())
        spans = (p.answer, p.gold, p.sink)
        h.update(json.dumps([(s.start, s.end) if s is not None else None for s in spans]).encode())
    return h.hexdigest()


def _chunk_name(c: int) -> str:
    return f"chunk_{c:05d}"


class ShardedInputs:
    """A training cache on disk (module docstring), read like an :class:`AttentionInputs`:
    ``len``, ``n_layers``, ``n_heads``, ``d_head`` and :meth:`batch` (the trainer's only accessors)."""

    def __init__(self, folder: str | Path):
        self.folder = Path(folder)
        meta = read_json(self.folder / "meta.json", "the training cache's meta.json")
        self.meta, self.n_layers, self.chunk = meta, int(meta["n_layers"]), int(meta["chunk"])
        self.n_heads, self.d_head = int(meta["n_heads"]), int(meta["d_head"])
        self.scaling = float(meta["scaling"])
        self._n = int(meta["n_prompts"])
        missing = [c for c in range(self.n_chunks) if not self._index_path(c).is_file()]
        if missing:
            raise DataError(f"{self.folder}: chunks {missing[:5]} of {self.n_chunks} were never finished; run "
                            "cache_to_disk again on the same prompts to resume.")
        self._index = [self._read(self._index_path(c)) for c in range(self.n_chunks)]  # small: [c, T] masks
        self._shards = [self._listed(c) for c in range(self.n_chunks)]  # per chunk: shard -> size, sha256
        self._headers: dict[tuple[int, int], tuple[int, dict]] = {}
        self._stage = torch.empty(0, dtype=torch.uint8)  # the read buffer (:meth:`_staged`)
        self.seconds = 0.0

    def __len__(self) -> int:
        return self._n

    @property
    def n_chunks(self) -> int:
        return -(-self._n // self.chunk)

    def _index_path(self, c: int) -> Path:
        return self.folder / f"{_chunk_name(c)}.index.safetensors"

    def _shard(self, layer: int, c: int) -> str:
        return f"{self.folder}/layer_{layer:03d}/{_chunk_name(c)}.safetensors"

    @staticmethod
    def _read(path: Path) -> dict[str, Tensor]:
        try:
            with safe_open(path, framework="pt") as f:
                return {name: f.get_tensor(name) for name in f.keys()}
        except Exception as e:  # safetensors raises its own error types for a cut or damaged file
            raise DataError(f"{path}: not a readable safetensors file ({type(e).__name__}: {e}); delete the chunk's "
                            "index file to cache that chunk again.") from None

    def _listed(self, c: int) -> dict:
        """The shards chunk ``c``'s index lists (empty for a cache written before indexes
        listed them), after checking the index is of this cache's prompts."""
        path = self._index_path(c)
        _, header = safetensors_header(path)
        own = (header.get("__metadata__") or {}).get(_OWN)
        if own is None:
            return {}
        own = json.loads(own)
        if own.get("fingerprint") != self.meta["fingerprint"]:
            raise DataError(f"{path} is of other prompts than {self.folder / 'meta.json'} (another fingerprint): "
                            "the folder mixes two caches; delete it and cache again.")
        return own["shards"]

    def _layout(self, layer: int, c: int) -> tuple[int, dict]:
        """Where a shard's tensors start and its safetensors header (read once, then kept:
        a few hundred bytes per file). The first time, the whole shard is checked against
        its chunk's index: size and SHA-256 (one read per file and process)."""
        key = (layer, c)
        if key not in self._headers:
            path = self._shard(layer, c)
            entry = self._shards[c].get(f"layer_{layer:03d}/{_chunk_name(c)}.safetensors")
            if entry is not None:
                problem = file_problem(path, entry)
                if problem:
                    raise DataError(f"{path}: {problem}; {self._index_path(c).name} says {entry['size']} bytes with "
                                    f"sha256 {entry['sha256'][:16]}…: the shard was damaged after it was cached. "
                                    f"Delete {self._index_path(c).name} and run cache_to_disk again to redo "
                                    "that chunk.")
            elif not Path(path).is_file():
                raise DataError(f"{path} is missing: delete {self._index_path(c).name} and run cache_to_disk again.")
            self._headers[key] = safetensors_header(path)
        return self._headers[key]

    def _dims(self, c: int) -> tuple[torch.dtype, int, int]:
        """Chunk ``c``'s shard dtype and padding: answer rows ``R_c`` and keys ``T_c``."""
        _, header = self._layout(0, c)
        return _SAFETENSORS_DTYPES[header["q"]["dtype"]], header["q"]["shape"][2], header["k"]["shape"][2]

    def _read_blocks(self, c: int, rows: Sequence[int], layer_ids: range, dest) -> None:
        """Prompts ``rows`` of chunk ``c`` at ``layer_ids``, read into ``dest(name, j, g)``: a
        writable buffer of the size of prompt ``j``'s block of tensor ``name`` at the ``g``-th
        layer. In a shard each prompt's slice of a tensor is one contiguous block, read by
        position (no memory map, so no file pages count in this process's RSS; the page
        cache still serves repeated reads); one open per shard."""
        for g, layer in enumerate(layer_ids):
            base, header = self._layout(layer, c)
            path = self._shard(layer, c)
            with open(path, "rb", buffering=0) as f:
                for name in _TENSORS:
                    first, last = header[name]["data_offsets"]
                    size = (last - first) // header[name]["shape"][0]
                    for j in rows:
                        f.seek(base + first + j * size)
                        if f.readinto(dest(name, j, g)) != size:
                            raise DataError(f"{path} is shorter than its header says; delete the cache folder "
                                            "and cache again.")

    def _staged(self, c: int, rows: list[int], layer_ids: range) -> list[dict[str, Tensor]]:
        """Prompts ``rows`` of chunk ``c`` in the shards' dtype and chunk padding, per prompt
        ``q [G, H, R_c, d]``, ``k`` and ``pattern``: views of one staging buffer that grows to
        the largest batch and is reused (the next call overwrites it)."""
        G, (dtype, _, _) = len(layer_ids), self._dims(c)
        _, header = self._layout(layer_ids[0], c)
        shapes = {name: header[name]["shape"][1:] for name in _TENSORS}
        sizes = {name: math.prod(shape) * dtype.itemsize for name, shape in shapes.items()}  # bytes per prompt
        need = len(rows) * G * sum(sizes.values())
        if self._stage.numel() < need:
            self._stage = torch.empty(need, dtype=torch.uint8)
        stage, out, at, offset = self._stage.numpy(), [], {}, 0
        for j in rows:  # layout of the buffer: prompt, tensor, layer
            part = {}
            for name in _TENSORS:
                at[j, name] = offset
                part[name] = self._stage[offset : offset + G * sizes[name]].view(dtype).view(G, *shapes[name])
                offset += G * sizes[name]
            out.append(part)
        self._read_blocks(c, rows, layer_ids,
                          lambda name, j, g: stage[at[j, name] + g * sizes[name] : at[j, name] + (g + 1) * sizes[name]])
        return out

    def batch(self, index: Tensor | Sequence[int], layers: slice) -> AttentionInputs:
        """Prompts ``index`` (dataset positions, in that order) and ``layers`` as an
        :class:`AttentionInputs` in float32, padded to the largest chunk padding among them
        (padding keys and rows carry no weight: the objective is the in-memory cache's).
        Only those prompts' bytes are read; a float32 prompt whose chunk padding is the
        batch's (every prompt of a one-chunk batch, e.g. batch size 1) is read straight into
        the returned tensors, the others through a staging buffer."""
        index = [int(i) for i in torch.as_tensor(index).reshape(-1)]
        where = [(i // self.chunk, i % self.chunk) for i in index]
        by_chunk: dict[int, list[int]] = {}
        for b, (c, _) in enumerate(where):
            by_chunk.setdefault(c, []).append(b)
        dims = {c: self._dims(c) for c in by_chunk}
        R, T = max(r for _, r, _ in dims.values()), max(t for _, _, t in dims.values())
        layer_ids = range(*layers.indices(self.n_layers))
        B, G = len(where), len(layer_ids)
        out = {"q": torch.empty(B, G, self.n_heads, R, self.d_head),  # every entry is written below
               "k": torch.empty(B, G, self.meta["n_kv_heads"], T, self.d_head),
               "pattern": torch.empty(B, G, self.n_heads, R, T)}
        for c, bs in by_chunk.items():
            if dims[c] == (torch.float32, R, T):
                views, slot = {name: x.numpy() for name, x in out.items()}, {where[b][1]: b for b in bs}
                self._read_blocks(c, [where[b][1] for b in bs], layer_ids, lambda name, j, g: views[name][slot[j], g])
            else:
                for b, part in zip(bs, self._staged(c, [where[b][1] for b in bs], layer_ids)):
                    _fill_padded(out, b, part)
        return AttentionInputs(out["q"], out["k"], out["pattern"], *self._index_rows(where, R, T), self.scaling)

    def _index_rows(self, where: list[tuple[int, int]], R: int, T: int) -> tuple[Tensor, ...]:
        """``row_pos``, ``n_keys``, ``gold`` and ``sink`` of the prompts at ``where`` (chunk,
        position), padded to ``R`` rows and ``T`` keys."""
        B = len(where)
        row_pos = torch.full((B, R), -1, dtype=torch.long)
        gold, sink = torch.zeros(B, T, dtype=torch.bool), torch.zeros(B, T, dtype=torch.bool)
        for b, (c, j) in enumerate(where):
            index = self._index[c]
            r, t = index["row_pos"].shape[1], index["gold"].shape[1]
            row_pos[b, :r], gold[b, :t], sink[b, :t] = index["row_pos"][j], index["gold"][j], index["sink"][j]
        n_keys = torch.stack([self._index[c]["n_keys"][j] for c, j in where]).long()
        return row_pos, n_keys, gold, sink


def _fill_padded(out: dict[str, Tensor], b: int, part: dict[str, Tensor]) -> None:
    """Batch row ``b`` of ``out`` from one prompt's tensors at a smaller chunk padding
    (converted to float32); the padding as in memory: zero queries and keys, padding rows'
    weight all on key 0."""
    q, k, pat = part["q"], part["k"], part["pattern"]
    r, t = q.shape[2], k.shape[2]
    out["q"][b, :, :, :r], out["k"][b, :, :, :t], out["pattern"][b, :, :, :r, :t] = q, k, pat
    out["q"][b, :, :, r:], out["k"][b, :, :, t:] = 0, 0
    out["pattern"][b, :, :, :r, t:], out["pattern"][b, :, :, r:] = 0, 0
    out["pattern"][b, :, :, r:, 0] = 1


def cache_to_disk(model, prompts: Sequence[Prompt], folder: str | Path, *, chunk: int = 16,
                  dtype: str = "float32", quiet: bool = False) -> ShardedInputs:
    """Stream ``prompts`` through the frozen model ``chunk`` at a time (one forward pass
    each, :func:`~focuslens.directions.train.collect_attention_inputs`) and write each chunk's
    per-layer shards into ``folder``; resume when ``folder`` holds a cache of the same
    prompts, model and settings (finished chunks are not run again). Returns the cache."""
    if dtype not in _DTYPES:
        raise DataError(f"dtype={dtype!r}: use one of {sorted(_DTYPES)}.")
    if isinstance(chunk, bool) or not isinstance(chunk, int) or chunk < 1:
        raise DataError(f"chunk={chunk!r} must be an integer of at least 1.")
    if not prompts:
        raise DataError("no prompts: directions need training data.")
    folder = Path(folder)
    cfg = model.cfg
    meta = {"model": model_id(model), "n_prompts": len(prompts), "n_layers": cfg.n_layers, "n_heads": cfg.n_heads,
            "n_kv_heads": cfg.n_key_value_heads or cfg.n_heads, "d_head": cfg.d_head,
            "chunk": chunk, "dtype": dtype, "fingerprint": fingerprint(prompts),
            "scaling": attention_scaling(model), "format": "focuslens training cache 1"}
    if is_main():
        _claim(folder, meta)
        for stale in folder.rglob(".*.tmp"):  # a killed run's half-written file (io.write_atomic)
            stale.unlink(missing_ok=True)
    if world()[1] > 1:
        torch.distributed.barrier()
        _claim(folder, meta)  # checked by every process
    n_chunks = -(-len(prompts) // chunk)
    mine = share(n_chunks)  # under a launcher each process writes its block of chunks
    todo = [c for c in mine if not (folder / f"{_chunk_name(c)}.index.safetensors").is_file()]
    seconds = 0.0
    for c in tqdm(todo, desc="cache q/k to disk", disable=quiet or not is_main(), leave=False):
        part = collect_attention_inputs(model, prompts[c * chunk : (c + 1) * chunk], quiet=True, shared=False)
        _write_chunk(folder, c, part, _DTYPES[dtype], meta["fingerprint"])
        seconds += part.seconds
    if world()[1] > 1:
        torch.distributed.barrier()  # every chunk written before anyone reads
    cache = ShardedInputs(folder)
    cache.seconds = seconds  # the forward passes of this call (0 when everything was on disk)
    return cache


def _claim(folder: Path, meta: dict) -> None:
    """Write ``meta.json``, or check that the cache already there is of the same prompts and
    settings (a ``DataError`` naming the field that differs)."""
    path = folder / "meta.json"
    if not path.is_file() and folder.is_dir() and any(folder.glob("chunk_*.index.safetensors")):
        raise DataError(f"{folder} holds cached chunks but no meta.json, so nothing says which prompts they are "
                        "of: delete the folder (or pick another) and cache again.")
    if path.is_file():
        old = read_json(path, "the training cache's meta.json")
        for key in ("format", "model", "n_prompts", "n_layers", "chunk", "dtype", "fingerprint"):
            if old.get(key) != meta[key]:
                raise DataError(f"{folder} holds a training cache with {key}={old.get(key)!r}, not {meta[key]!r}; "
                                "use another folder or delete this one.")
        return
    write_json(path, meta, indent=1)


def _write_chunk(folder: Path, c: int, part: AttentionInputs, dtype: torch.dtype, fingerprint: str) -> None:
    """Chunk ``c``'s shards, one file per layer (finite, or refused by name), then its index:
    the completion mark and the chunk's manifest (each shard's size and SHA-256, and the
    fingerprint of the prompts, in its header)."""
    shards = {}
    for layer in range(part.q.shape[1]):
        tensors = {name: getattr(part, name)[:, layer].to(dtype).contiguous() for name in _TENSORS}
        for name, t in tensors.items():
            require_finite(t, f"the training cache's {name} of layer {layer}, chunk {c}")
        blob = save(tensors)
        rel = f"layer_{layer:03d}/{_chunk_name(c)}.safetensors"
        write_atomic(folder / rel, blob)
        shards[rel] = file_entry(blob)
    index = {"row_pos": part.row_pos, "n_keys": part.n_keys, "gold": part.gold, "sink": part.sink}
    own = {_OWN: json.dumps({"fingerprint": fingerprint, "shards": shards})}
    write_atomic(folder / f"{_chunk_name(c)}.index.safetensors",
                 save({k: v.contiguous() for k, v in index.items()}, metadata=own))
