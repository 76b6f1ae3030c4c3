"""Focus directions: per-head query (and key) vectors that steer attention to the context.

Zhu et al. (2025) add, in every attention head, a learned vector ``d_q`` to the queries and
``d_k`` to the keys, **after RoPE** and at every position, then train them with the model
frozen to maximise the attention mass from the answer rows R onto the gold document N::

    loss = − mean_{i∈R} Σ_{j∈N} softmax_j((q_i + d_q)·(k_j + d_k) / √d)

At inference the trained vectors are scaled by α and added on the top-k contextual heads
only, **without** telling the model which document is relevant.

What the vectors can do follows from expanding the logit::

    (q_i + α d_q)·(k_j + α d_k) = q_i·k_j + α d_q·k_j + [α q_i·d_k + α² d_q·d_k]

The bracket does not depend on the key j, and a softmax ignores a per-row constant, so
**the key vector has no effect at all** (its gradient is zero up to rounding). The query
vector acts as a query-independent bias on each key, ``b_j = α d_q·k_j / √d``
(:meth:`FocusDirections.key_bias` shows which tokens it favours).

Training is fast because the model is frozen and, as in the paper, each layer is trained
on the unmodified model's activations: one forward pass per prompt caches the post-RoPE
queries at the answer rows and the keys (:func:`collect_attention_inputs`), and the
directions of **all layers and heads** are then optimised together on those tensors
(each head's loss depends only on its own vectors, so this equals training every head
alone). A validation split gives per-head early stopping.

Three modules, one job each: this one holds the artifact (:class:`FocusDirections`,
safetensors + JSON) and the importer of the paper's release; :mod:`focuslens.directions.train`
learns directions; :mod:`focuslens.steer.focus` applies them (hooks, the :func:`focus`
context manager, sweeps, magnitude control).

>>> dirs = train_directions(model, train_examples, validation=val_examples)   # doctest: +SKIP
>>> with focus(model, dirs, alpha=0.5, heads=scores.top_k(20)):                # doctest: +SKIP
...     model.generate(prompt.input_ids[None], max_new_tokens=20, do_sample=False)
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from pathlib import Path

import einops
import pandas as pd
import torch
from jaxtyping import Float
from safetensors import SafetensorError
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors
from torch import Tensor

from focuslens.data.render import Prompt
from focuslens.errors import DataError, ModelError
from focuslens.io import check_unit, has_manifest, json_safe, read_json, safetensors_header, write_unit
from focuslens.measure.record import record
from focuslens.measure.scoring import HeadScores
from focuslens.model.finite import require_finite
from focuslens.model.heads import Head, ranking_of, resolve_heads
from focuslens.model.hooks import attn_hook
from focuslens.model.load import attention_scaling, model_id

__all__ = ["FocusDirections", "import_release", "bias_by_part", "ARTIFACT_FORMAT", "UNIT_KIND"]

_HEADER_KEY = "focuslens"  # the safetensors __metadata__ entry holding the artifact's metadata
ARTIFACT_FORMAT = "focuslens.FocusDirections/1"
UNIT_KIND = "focus directions"  # the kind in the folder's manifest.json
_TENSORS, _META = "focus_directions.safetensors", "focus_directions.json"


# ------------------------------------------------------------------ the artifact
class FocusDirections:
    """Query and key vectors for every (layer, head), plus metadata.

    Attributes:
        q, k: ``[n_layers, n_heads, d_head]``, added after RoPE (per *query* head, also
            under grouped-query attention).
        metadata: model id and architecture, hook points, training data and settings,
            history, versions.

    :meth:`ranking` gives the heads ``(layer, head)`` best first: the contextual-head
    ranking that ``heads=k`` selects from when no other ranking is passed (may be empty),
    a method like :meth:`~focuslens.measure.results.HeadResult.ranking`.
    """

    def __init__(self, q: Float[Tensor, "layer head d_head"], k: Float[Tensor, "layer head d_head"],
                 ranking=(), metadata: dict | None = None) -> None:
        self.q, self.k = q, k
        self.metadata = dict(metadata or {})
        if self.q.ndim != 3 or self.q.shape != self.k.shape:
            raise DataError(
                f"q {tuple(self.q.shape)} and k {tuple(self.k.shape)} must both be [n_layers, n_heads, d_head]."
            )
        for name in ("q", "k"):
            require_finite(getattr(self, name), f"directions {name} [layer, head, d_head]",
                           "NaN directions would turn every steered logit into NaN")
        self._ranking = _checked_ranking(list(ranking or []), self.shape[:2])

    def ranking(self, name: str | None = None) -> list[Head]:
        """The heads, best first, that ``heads=k`` takes the top of (empty: none recorded)."""
        return list(self._ranking)

    def with_ranking(self, ranking) -> FocusDirections:
        """The same directions with another head ranking (any ranking source)."""
        return FocusDirections(self.q, self.k, ranking_of(ranking), self.metadata)

    @property
    def shape(self) -> tuple[int, int, int]:
        return tuple(self.q.shape)

    @property
    def model(self) -> str | None:
        return self.metadata.get("model")

    def top_k(self, k: int) -> list[Head]:
        """The first k heads of the ranking (k in 1..its length: :func:`~focuslens.model.heads.resolve_heads`)."""
        if not self._ranking:
            raise DataError("these directions carry no head ranking: pass heads=[(layer, head), ...] or ranking=.")
        return resolve_heads(self.shape[:2], k, self._ranking)

    def norms(self) -> pd.DataFrame:
        """One row per head: ``layer``, ``head``, ``q_norm``, ``k_norm`` and ``rank`` (its
        place in the ranking, NaN if unranked)."""
        rank = {h: r for r, h in enumerate(self._ranking)}
        qn, kn = self.q.float().norm(dim=-1), self.k.float().norm(dim=-1)
        return pd.DataFrame(
            [
                {"layer": layer, "head": head, "q_norm": float(qn[layer, head]), "k_norm": float(kn[layer, head]),
                 "rank": rank.get((layer, head), math.nan)}
                for layer in range(self.shape[0])
                for head in range(self.shape[1])
            ]
        )

    def norm_summary(self, top_k: int = 20) -> dict:
        """Median / max of ‖d_q‖ and ‖d_k‖ over all heads and over the top-k heads."""
        df = self.norms()
        top = df[df["rank"] < top_k] if self._ranking else df.iloc[:0]
        out = {}
        for col in ("q_norm", "k_norm"):  # skipna=False: a NaN norm shows, it is not skipped
            out[col] = {"median": float(df[col].median(skipna=False)), "max": float(df[col].max(skipna=False))}
            if len(top):
                out[col][f"median_top{top_k}"] = float(top[col].median(skipna=False))
        return out

    # ---------------------------------------------------------------- what a direction does
    @torch.no_grad()
    def key_bias(self, model, prompt: Prompt, alpha: float = 1.0, heads="all", *, ranking=None) -> pd.DataFrame:
        """The logit bias ``b_j = α d_q·k_j / √d`` each chosen head adds to every key of
        ``prompt`` (keys of the unsteered model): one row per head in ``heads`` order (index
        ``layer``, ``head``), one column per key position; ``attrs``: alpha, model.

        Softmax turns a bias into a factor ``exp(b_j)`` on the attention weight, so keys
        with a large bias are the ones the direction makes the head read. ``heads``: any
        selection of :func:`~focuslens.model.heads.resolve_heads`; an int is the top k of
        ``ranking`` (default: these directions' own ranking).
        """

        self.check_model(model)
        heads = resolve_heads(self.shape[:2], heads, ranking if ranking is not None else (self._ranking or None))
        if not heads:
            raise DataError("heads is empty: pass k (top k of the ranking), (layer, head) pairs or None.")
        with record(model, heads, spans=(), rows="all", activations=("rot_k",)) as rec, torch.no_grad():
            model(prompt.input_ids[None].to(model.cfg.device), stop_at_layer=rec.last_layer + 1)
        group = model.cfg.n_heads // (model.cfg.n_key_value_heads or model.cfg.n_heads)
        # keys per query head: KV head kv serves query heads kv·group … kv·group + group − 1
        keys = {layer: einops.repeat(k, "key kv d -> key (kv g) d", g=group) for (_, layer), k in rec.activations.items()}
        rows = [keys[layer][:, head] @ self.q[layer, head].float() for layer, head in heads]
        bias = alpha * attention_scaling(model) * torch.stack(rows)
        table = pd.DataFrame(bias.numpy(), index=pd.MultiIndex.from_tuples(heads, names=["layer", "head"]))
        table.attrs.update(alpha=float(alpha), model=model_id(model))
        return table

    # ---------------------------------------------------------------- checks
    def check_model(self, model, *, strict: bool = True) -> None:
        """Raise ``ModelError`` unless these directions fit ``model``: the shapes must match;
        with ``strict``, the model identity recorded at training must match too."""

        want = (model.cfg.n_layers, model.cfg.n_heads, model.cfg.d_head)
        if self.shape != want:
            raise ModelError(
                f"directions of shape {self.shape} (layers, heads, d_head) were made for "
                f"{self.model!r}; the loaded model {model_id(model)!r} has {want}."
            )
        if strict and self.model and self.model != model_id(model):
            raise ModelError(
                f"directions were trained for {self.model!r}, not for the loaded {model_id(model)!r} "
                "(same shapes). Pass strict=False if the model is a compatible variant."
            )

    # ---------------------------------------------------------------- persistence
    def files(self) -> dict[str, bytes]:
        """The artifact's two files by name: ``focus_directions.safetensors`` (``q``, ``k``, and
        the metadata and ranking in its header: the file describes itself, like a SAELens
        artifact) and ``focus_directions.json`` (the same, readable, plus the tensors' SHA-256)."""
        meta = {"format": ARTIFACT_FORMAT, "shape": list(self.shape), "ranking": [list(h) for h in self._ranking],
                "metadata": json_safe(self.metadata)}
        tensors = {"q": self.q.detach().float().clone(), "k": self.k.detach().float().clone()}  # never shared
        blob = save_safetensors(tensors, metadata={_HEADER_KEY: json.dumps(meta)})
        text = json.dumps(json_safe({**meta, "sha256": hashlib.sha256(blob).hexdigest()}), indent=1) + "\n"
        return {_TENSORS: blob, _META: text.encode()}

    def save(self, path: str | Path) -> Path:
        """Write :meth:`files` into the folder ``path`` as one unit with its ``manifest.json``
        (:func:`focuslens.io.write_unit`): a save killed at any moment leaves the old
        directions or the new ones, never a mixed pair or neither; returns the folder."""
        write_unit(path, self.files(), kind=UNIT_KIND)
        return Path(path)

    @classmethod
    def load(cls, path: str | Path, *, model=None, strict: bool = True) -> FocusDirections:
        """Read :meth:`save` output (each file checked against the folder's manifest); with
        ``model``, check shapes and identity."""

        path = Path(path)
        meta_file, tensor_file = path / _META, path / _TENSORS
        if has_manifest(path):
            check_unit(path, kind=UNIT_KIND, names=[_TENSORS, _META])
        for f in (meta_file, tensor_file):
            if not f.exists():
                raise DataError(f"{f} is missing: {path} is not a directory written by FocusDirections.save.")
        q, k, blob = _read_tensors(tensor_file, _read_meta(meta_file), meta_file)
        try:
            out = cls(q, k, blob["ranking"], blob["metadata"])
        except (DataError, ModelError) as e:
            raise type(e)(f"{meta_file}: {e}") from None
        if model is not None:
            out.check_model(model, strict=strict)
        return out

    def __repr__(self) -> str:
        return (f"FocusDirections(model={self.model!r}, shape={self.shape}, ranked={len(self._ranking)}, "
                f"source={self.metadata.get('source', 'trained')!r})")

    def _repr_html_(self) -> str:
        s = self.norm_summary()
        return (f"<div><b>FocusDirections</b> for {self.model!r}: {self.shape[0]} layers × {self.shape[1]} heads × "
                f"{self.shape[2]}; median ‖d_q‖ {s['q_norm']['median']:.3g}, median ‖d_k‖ {s['k_norm']['median']:.3g}; "
                f"ranking of {len(self._ranking)} heads; top 5: {self._ranking[:5]}</div>")


def _checked_ranking(ranking, shape: tuple[int, int]) -> list[Head]:
    """``ranking`` as (layer, head) int pairs, each inside ``shape`` (layers, heads)."""
    pairs = ranking_of(ranking)
    for i, (layer, head) in enumerate(pairs):
        if not (0 <= layer < shape[0] and 0 <= head < shape[1]):
            raise ModelError(f"ranking entry {i} ({layer}, {head}) is outside the directions' "
                             f"{shape[0]} layers × {shape[1]} heads.")
    return pairs


def _read_meta(meta_file: Path) -> dict:
    """The parsed ``focus_directions.json``, checked for its format and required keys."""
    return _read_meta_blob(read_json(meta_file, "FocusDirections metadata"), meta_file)


def _read_meta_blob(blob, source: Path) -> dict:
    """Artifact metadata (from the JSON or a tensor file's header), checked."""
    if not isinstance(blob, dict) or blob.get("format") != ARTIFACT_FORMAT:
        found = blob.get("format") if isinstance(blob, dict) else type(blob).__name__
        raise DataError(f"{source} has format {found!r}, expected {ARTIFACT_FORMAT!r}.")
    for key, kind in (("shape", list), ("ranking", list), ("metadata", dict)):
        if key not in blob:
            raise DataError(f"{source}: key {key!r} is missing.")
        if not isinstance(blob[key], kind):
            raise DataError(f"{source}: key {key!r} is a {type(blob[key]).__name__}, not a {kind.__name__}.")
    return blob


def _own_header(tensor_file: Path, meta_file: Path) -> dict:
    """The metadata a tensor file carries in its header, for when the JSON beside it is from
    another save (a save killed between its two writes)."""
    try:
        _, header = safetensors_header(tensor_file)
        blob = json.loads(header["__metadata__"][_HEADER_KEY])
    except (DataError, KeyError, TypeError, ValueError):
        raise DataError(f"{tensor_file} does not match the sha256 in {meta_file.name} and carries no metadata of "
                        "its own: the two files come from different saves. Save the directions again.") from None
    return _read_meta_blob(blob, tensor_file)


def _read_tensors(tensor_file: Path, blob: dict, meta_file: Path) -> tuple[Tensor, Tensor, dict]:
    """``q``, ``k`` and their metadata from ``focus_directions.safetensors``, checked
    against the JSON (or, if the JSON is from another save, against the file's own header)."""
    raw = tensor_file.read_bytes()
    if "sha256" in blob and hashlib.sha256(raw).hexdigest() != blob["sha256"]:
        blob = _own_header(tensor_file, meta_file)
    try:
        tensors = load_safetensors(raw)
    except SafetensorError as e:
        raise DataError(f"{tensor_file}: not a readable safetensors file ({e}); truncated or corrupt?") from None
    for key in ("q", "k"):
        if key not in tensors:
            raise DataError(f"{tensor_file}: tensor {key!r} is missing (found {sorted(tensors)}).")
        if list(tensors[key].shape) != blob["shape"]:
            raise DataError(f"{tensor_file}: {key} has shape {list(tensors[key].shape)}, key 'shape' of "
                            f"{meta_file.name} says {blob['shape']}.")
    return tensors["q"], tensors["k"], blob


_LFS_POINTER = b"version https://git-lfs"


def _read_release_tensor(f: Path) -> Tensor:
    """One ``head_{q,k}_directions_<layer>.pth`` as a float ``[n_heads, head_dim]`` tensor."""
    try:
        with open(f, "rb") as fh:
            start = fh.read(len(_LFS_POINTER))
    except OSError as e:
        raise DataError(f"cannot read {f}: {e}") from None
    if start == _LFS_POINTER:
        raise DataError(f"{f} is a Git LFS pointer, not the tensor: run `git lfs pull` in the release "
                        "repository to download the real files.")
    try:
        t = torch.load(f, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 -- torch.load fails on a damaged file with many types
        raise DataError(f"{f}: not a readable torch tensor file ({type(e).__name__}: "
                        f"{str(e).splitlines()[0] if str(e) else ''}).") from None
    t = t.detach().float() if isinstance(t, Tensor) else None
    if t is None or t.ndim != 2:
        raise DataError(f"{f} does not hold a [n_heads, head_dim] tensor.")
    return t


# ------------------------------------------------------------------ the paper's release
def import_release(
    directory: str | Path,
    *,
    ranking: str | Path | None = None,
    model: str | None = None,
) -> FocusDirections:
    """Read the official release: ``head_{q,k}_directions_<layer>.pth`` ([n_heads, head_dim]
    per layer, found anywhere under ``directory``) and ``relevant_heads.json`` (the ranking
    of every head; default: the first one under ``directory``).

    Any layer count, head count and head size is accepted; the layers must run 0..L-1 with
    both q and k present. ``model`` defaults to the directory name with the first ``_``
    read as ``/`` (``meta-llama_Llama-3.2-3B-Instruct`` → ``meta-llama/Llama-3.2-3B-Instruct``).
    """
    directory = Path(directory)
    if not directory.is_dir():
        raise DataError(f"{directory} is not a directory of head_{{q,k}}_directions_<layer>.pth files.")
    found: dict[str, dict[int, Path]] = {"q": {}, "k": {}}
    for f in directory.rglob("head_*_directions_*.pth"):
        m = re.fullmatch(r"head_([qk])_directions_(\d+)\.pth", f.name)
        if m:
            found[m[1]][int(m[2])] = f
    if not found["q"]:
        raise DataError(f"no head_q_directions_<layer>.pth under {directory}.")
    n_layers = max(found["q"]) + 1
    for kind in "qk":
        missing = sorted(set(range(n_layers)) - set(found[kind]))
        if missing:
            raise DataError(f"{directory}: head_{kind}_directions_<layer>.pth missing for layers {missing}.")

    q = [_read_release_tensor(found["q"][layer]) for layer in range(n_layers)]
    k = [_read_release_tensor(found["k"][layer]) for layer in range(n_layers)]
    shapes = {tuple(t.shape) for t in q + k}
    if len(shapes) != 1:
        raise DataError(f"{directory}: the per-layer tensors differ in shape: {sorted(shapes)}.")
    ranking_file = Path(ranking) if ranking else next(iter(sorted(directory.rglob("relevant_heads.json"))), None)
    heads: list[Head] = []
    if ranking_file is not None:

        n_heads = q[0].shape[0]
        heads = HeadScores.from_ranking_json(ranking_file, n_layers=n_layers, n_heads=n_heads).ranking("rank_score")
    name = model or directory.name.replace("_", "/", 1)
    meta = {
        "model": name,
        "source": "release",
        "release_dir": str(directory),
        "ranking_file": str(ranking_file) if ranking_file else None,
        "architecture": {"n_layers": n_layers, "n_heads": q[0].shape[0], "d_head": q[0].shape[1]},
        "hook_points": {"q": attn_hook("{layer}", "rot_q"), "k": attn_hook("{layer}", "rot_k")},
    }
    return FocusDirections(torch.stack(q), torch.stack(k), heads, meta)


def bias_by_part(bias: pd.DataFrame, prompt: Prompt) -> pd.DataFrame:
    """A key-bias table (:meth:`FocusDirections.key_bias`: one row per head, one column per
    key position) averaged over each part of ``prompt``'s tokens: one column per part in
    reading order, ``sink``, ``doc_1`` … ``doc_n`` (numbered as the prompt numbers them),
    ``question``. Parts are named, not positioned, so models with different tokenizers
    compare on one prompt. ``attrs``: the bias's, plus ``gold`` (the gold document's
    column, or None)."""
    if [str(c) for c in bias.columns] != [str(i) for i in range(prompt.n_tokens)]:  # ints, or strings read back
        raise DataError(f"bias has {bias.shape[1]} key columns, the prompt {prompt.n_tokens} tokens: "
                        "pass FocusDirections.key_bias of this prompt.")
    spans = {"sink": prompt.sink, **{f"doc_{i + 1}": d for i, d in enumerate(prompt.documents)},
             "question": prompt.question}
    values = bias.to_numpy()
    table = pd.DataFrame({name: values[:, s.start : s.end].mean(axis=1) for name, s in spans.items()}, index=bias.index)
    table.attrs.update(bias.attrs, gold=None if prompt.gold_index is None else f"doc_{prompt.gold_index + 1}")
    return table
