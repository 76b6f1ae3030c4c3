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

>>> dirs = train_directions(model, train_examples, validation=val_examples)   # doctest: +SKIP
>>> with focus(model, dirs, alpha=0.5, heads=scores.top_k(20)):                # doctest: +SKIP
...     model.generate(prompt.input_ids[None], max_new_tokens=20, do_sample=False)
"""

from __future__ import annotations

import json
import math
import re
import time
from collections.abc import Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd
import torch
from jaxtyping import Bool, Float, Int
from torch import Tensor
from tqdm.auto import tqdm

from focuslens.data.examples import QAExample
from focuslens.data.render import Prompt
from focuslens.errors import DataError, ModelError
from focuslens.steering import Head, HookSpec, _per_variant, _variant_masks, resolve_rows, rows_mask

__all__ = [
    "FocusDirections",
    "AttentionInputs",
    "collect_attention_inputs",
    "span_attention",
    "train_directions",
    "focus_hooks",
    "focus",
    "import_release",
    "focus_sweep",
    "focus_variants",
    "best_setting",
    "MagnitudeControl",
    "ARTIFACT_FORMAT",
]

ARTIFACT_FORMAT = "focuslens.FocusDirections/1"
_Q_HOOK, _K_HOOK = "blocks.{}.attn.hook_rot_q", "blocks.{}.attn.hook_rot_k"


def _scaling(model) -> float:
    """The attention's logit scale (1/√d_head for Llama, Qwen2, Mistral)."""
    attn = getattr(model.blocks[0].attn, "original_component", None)
    return float(getattr(attn, "scaling", model.cfg.d_head**-0.5))


def _architecture(model) -> dict:
    c = model.cfg
    archs = getattr(getattr(model, "original_model", None), "config", None)
    return {
        "architecture": (getattr(archs, "architectures", None) or [type(getattr(model, "original_model", model)).__name__])[0],
        "n_layers": c.n_layers,
        "n_heads": c.n_heads,
        "n_key_value_heads": c.n_key_value_heads or c.n_heads,
        "d_head": c.d_head,
        "d_model": c.d_model,
    }


def _versions() -> dict:
    import importlib.metadata as md

    out = {}
    for dist in ("focuslens", "torch", "transformer-lens", "transformers"):
        try:
            out[dist] = md.version(dist)
        except md.PackageNotFoundError:
            out[dist] = None
    return out


# ------------------------------------------------------------------ the artifact
@dataclass
class FocusDirections:
    """Query and key vectors for every (layer, head), plus metadata.

    Attributes:
        q, k: ``[n_layers, n_heads, d_head]``, added after RoPE (per *query* head, also
            under grouped-query attention).
        ranking: heads ``(layer, head)``, best first: the contextual-head ranking that
            ``heads=k`` selects from (may be empty).
        metadata: model id and architecture, hook points, training data and settings,
            history, versions.
    """

    q: Float[Tensor, "layer head d_head"]
    k: Float[Tensor, "layer head d_head"]
    ranking: list[Head] = field(default_factory=list)
    metadata: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.q.ndim != 3 or self.q.shape != self.k.shape:
            raise DataError(
                f"q {tuple(self.q.shape)} and k {tuple(self.k.shape)} must both be [n_layers, n_heads, d_head]."
            )
        self.ranking = [(int(layer), int(head)) for layer, head in self.ranking]

    @property
    def shape(self) -> tuple[int, int, int]:
        return tuple(self.q.shape)

    @property
    def model(self) -> str | None:
        return self.metadata.get("model")

    def top_k(self, k: int) -> list[Head]:
        """The first k heads of the ranking."""
        if not self.ranking:
            raise DataError("these directions carry no head ranking: pass heads=[(layer, head), ...] explicitly.")
        if not 0 < k <= len(self.ranking):
            raise DataError(f"k={k}: choose 1..{len(self.ranking)} (the length of the ranking).")
        return self.ranking[:k]

    def norms(self) -> pd.DataFrame:
        """One row per head: ``layer``, ``head``, ``q_norm``, ``k_norm`` and ``rank`` (its
        place in the ranking, NaN if unranked)."""
        rank = {h: r for r, h in enumerate(self.ranking)}
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
        top = df[df["rank"] < top_k] if self.ranking else df.iloc[:0]
        out = {}
        for col in ("q_norm", "k_norm"):
            out[col] = {"median": float(df[col].median()), "max": float(df[col].max())}
            if len(top):
                out[col][f"median_top{top_k}"] = float(top[col].median())
        return out

    # ---------------------------------------------------------------- what a direction does
    @torch.no_grad()
    def key_bias(self, model, prompt: Prompt, alpha: float = 1.0, heads=None) -> Float[Tensor, "head key"]:
        """The logit bias ``b_j = α d_q·k_j / √d`` each chosen head adds to every key of
        ``prompt`` (keys of the unsteered model), one row per head in ``heads`` order.

        Softmax turns a bias into a factor ``exp(b_j)`` on the attention weight, so keys
        with a large bias are the ones the direction makes the head read.
        """
        self.check_model(model)
        heads = self._heads(heads)
        keys: dict[int, Tensor] = {}
        layers = sorted({layer for layer, _ in heads})

        def keep(k, hook, layer):
            keys[layer] = k[0].detach()  # [key, kv_head, d_head]

        hooks = [(_K_HOOK.format(layer), lambda k, hook, layer=layer: keep(k, hook, layer)) for layer in layers]
        model.run_with_hooks(prompt.input_ids[None].to(model.cfg.device), fwd_hooks=hooks,
                             stop_at_layer=max(layers) + 1)
        group = model.cfg.n_heads // (model.cfg.n_key_value_heads or model.cfg.n_heads)
        rows = [keys[layer][:, head // group].float().cpu() @ self.q[layer, head].float() for layer, head in heads]
        return alpha * _scaling(model) * torch.stack(rows)

    # ---------------------------------------------------------------- checks
    def _heads(self, heads) -> list[Head]:
        if heads is None:
            return [(layer, head) for layer in range(self.shape[0]) for head in range(self.shape[1])]
        if isinstance(heads, int):
            return self.top_k(heads)
        return [(int(layer), int(head)) for layer, head in heads]

    def check_model(self, model, *, strict: bool = True) -> None:
        """Raise ``ModelError`` unless these directions fit ``model``: the shapes must match;
        with ``strict``, the model identity recorded at training must match too."""
        from focuslens.models import model_id

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
    def save(self, path: str | Path) -> Path:
        """Write ``path/focus_directions.safetensors`` (``q``, ``k``) and
        ``path/focus_directions.json`` (metadata and ranking); returns the directory."""
        from safetensors.torch import save_file

        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        save_file({"q": self.q.contiguous().float(), "k": self.k.contiguous().float()},
                  str(path / "focus_directions.safetensors"))
        blob = {"format": ARTIFACT_FORMAT, "shape": list(self.shape), "ranking": [list(h) for h in self.ranking],
                "metadata": self.metadata}
        (path / "focus_directions.json").write_text(json.dumps(blob, indent=1))
        return path

    @classmethod
    def load(cls, path: str | Path, *, model=None, strict: bool = True) -> FocusDirections:
        """Read :meth:`save` output; with ``model``, check shapes and identity."""
        from safetensors.torch import load_file

        path = Path(path)
        meta_file, tensor_file = path / "focus_directions.json", path / "focus_directions.safetensors"
        for f in (meta_file, tensor_file):
            if not f.exists():
                raise DataError(f"{f} is missing: {path} is not a directory written by FocusDirections.save.")
        blob = json.loads(meta_file.read_text())
        if blob.get("format") != ARTIFACT_FORMAT:
            raise DataError(f"{meta_file} has format {blob.get('format')!r}, expected {ARTIFACT_FORMAT!r}.")
        tensors = load_file(str(tensor_file))
        if list(tensors["q"].shape) != blob["shape"]:
            raise DataError(f"{tensor_file}: q has shape {list(tensors['q'].shape)}, the metadata says {blob['shape']}.")
        out = cls(tensors["q"], tensors["k"], [tuple(h) for h in blob["ranking"]], blob["metadata"])
        if model is not None:
            out.check_model(model, strict=strict)
        return out

    def __repr__(self) -> str:
        return (f"FocusDirections(model={self.model!r}, shape={self.shape}, ranked={len(self.ranking)}, "
                f"source={self.metadata.get('source', 'trained')!r})")

    def _repr_html_(self) -> str:
        s = self.norm_summary()
        return (f"<div><b>FocusDirections</b> for {self.model!r}: {self.shape[0]} layers × {self.shape[1]} heads × "
                f"{self.shape[2]}; median ‖d_q‖ {s['q_norm']['median']:.3g}, median ‖d_k‖ {s['k_norm']['median']:.3g}; "
                f"ranking of {len(self.ranking)} heads; top 5: {self.ranking[:5]}</div>")


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

    def read(f: Path) -> Tensor:
        t = torch.load(f, map_location="cpu", weights_only=True)
        t = t.detach().float() if isinstance(t, Tensor) else None
        if t is None or t.ndim != 2:
            raise DataError(f"{f} does not hold a [n_heads, head_dim] tensor.")
        return t

    q = [read(found["q"][layer]) for layer in range(n_layers)]
    k = [read(found["k"][layer]) for layer in range(n_layers)]
    shapes = {tuple(t.shape) for t in q + k}
    if len(shapes) != 1:
        raise DataError(f"{directory}: the per-layer tensors differ in shape: {sorted(shapes)}.")
    ranking_file = Path(ranking) if ranking else next(iter(sorted(directory.rglob("relevant_heads.json"))), None)
    heads: list[Head] = []
    if ranking_file is not None:
        from focuslens.scoring import HeadScores

        n_heads = q[0].shape[0]
        heads = HeadScores.from_ranking_json(ranking_file, n_layers=n_layers, n_heads=n_heads).ranking("rank_score")
        heads = heads[: len(json.loads(ranking_file.read_text()))]
    name = model or directory.name.replace("_", "/", 1)
    meta = {
        "model": name,
        "source": "release",
        "release_dir": str(directory),
        "ranking_file": str(ranking_file) if ranking_file else None,
        "architecture": {"n_layers": n_layers, "n_heads": q[0].shape[0], "d_head": q[0].shape[1]},
        "hook_points": {"q": _Q_HOOK.format("{layer}"), "k": _K_HOOK.format("{layer}")},
    }
    return FocusDirections(torch.stack(q), torch.stack(k), heads, meta)


# ------------------------------------------------------------------ cached activations
@dataclass
class AttentionInputs:
    """What training needs from the frozen model, per prompt and layer, at the answer rows:
    the post-RoPE queries, the keys of every position, the model's own attention pattern,
    and the spans.

    Shapes: ``q [prompt, layer, head, row, d_head]``, ``k [prompt, layer, kv_head, key,
    d_head]``, ``pattern [prompt, layer, head, row, key]`` (``hook_pattern`` at the answer
    rows), ``row_pos [prompt, row]`` (absolute positions, −1 = padding), ``n_keys
    [prompt]``, ``gold`` and ``sink`` ``[prompt, key]`` masks. Padding is cropped away when
    prompts are selected.
    """

    q: Float[Tensor, "prompt layer head row d_head"]
    k: Float[Tensor, "prompt layer kv_head key d_head"]
    pattern: Float[Tensor, "prompt layer head row key"]
    row_pos: Int[Tensor, "prompt row"]
    n_keys: Int[Tensor, "prompt"]
    gold: Bool[Tensor, "prompt key"]
    sink: Bool[Tensor, "prompt key"]
    scaling: float
    seconds: float = 0.0

    def __len__(self) -> int:
        return self.q.shape[0]

    def select(self, index) -> AttentionInputs:
        """A subset of prompts (a slice is a view), cropped to its longest prompt."""
        if isinstance(index, int):
            index = slice(index, index + 1)
        if not isinstance(index, slice):
            index = torch.as_tensor(index)
        T = int(self.n_keys[index].max())
        return AttentionInputs(self.q[index], self.k[index][..., :T, :], self.pattern[index][..., :T],
                               self.row_pos[index], self.n_keys[index], self.gold[index][:, :T],
                               self.sink[index][:, :T], self.scaling)


@torch.no_grad()
def collect_attention_inputs(model, prompts: Sequence[Prompt], *, quiet: bool = False) -> AttentionInputs:
    """One forward pass per prompt through the frozen model, keeping the post-RoPE
    queries at the answer rows (``hook_rot_q``) and the keys (``hook_rot_k``) of every layer."""
    if not prompts:
        raise DataError("no prompts: directions need training data.")
    for i, p in enumerate(prompts):
        if p.gold is None or len(p.gold) == 0:
            raise DataError(f"prompt {i} has no gold document span: directions are trained to attend to it.")
    c = model.cfg
    n, L, H, d = len(prompts), c.n_layers, c.n_heads, c.d_head
    kv = c.n_key_value_heads or H
    R = max(len(p.answer) for p in prompts)
    T = max(p.n_tokens for p in prompts)
    q = torch.zeros(n, L, H, R, d)
    k = torch.zeros(n, L, kv, T, d)
    pattern = torch.zeros(n, L, H, R, T)
    pattern[..., 0] = 1  # padding rows: all weight on key 0 (they are dropped from every mean)
    row_pos = torch.full((n, R), -1, dtype=torch.long)
    gold = torch.zeros(n, T, dtype=torch.bool)
    sink = torch.zeros(n, T, dtype=torch.bool)
    t0 = time.perf_counter()
    for i, p in enumerate(tqdm(prompts, desc="cache q/k", disable=quiet, leave=False)):
        rows = p.answer.to_slice()

        def keep(x, hook, i=i, rows=rows, n_tok=p.n_tokens):
            layer, n_rows = int(hook.name.split(".")[1]), rows.stop - rows.start
            if hook.name.endswith("hook_rot_q"):  # [1, pos, head, d_head]
                q[i, layer, :, :n_rows] = x[0, rows].transpose(0, 1).float().cpu()
            elif hook.name.endswith("hook_rot_k"):
                k[i, layer, :, :n_tok] = x[0].transpose(0, 1).float().cpu()
            else:  # hook_pattern: [1, head, query, key]
                pattern[i, layer, :, :n_rows, :n_tok] = x[0, :, rows].float().cpu()

        names = (_Q_HOOK, _K_HOOK, "blocks.{}.attn.hook_pattern")
        hooks = [(name.format(layer), keep) for layer in range(L) for name in names]
        hooks.append(("unembed.hook_in", lambda resid, hook: resid[:, -1:]))
        model.run_with_hooks(p.input_ids[None].to(c.device), fwd_hooks=hooks)
        row_pos[i, : len(p.answer)] = torch.arange(p.answer.start, p.answer.end)
        gold[i, p.gold.start : p.gold.end] = True
        sink[i, p.sink.start : p.sink.end] = True
    n_keys = torch.tensor([p.n_tokens for p in prompts])
    return AttentionInputs(q, k, pattern, row_pos, n_keys, gold, sink, _scaling(model), time.perf_counter() - t0)


def span_attention(
    inputs: AttentionInputs,
    dq: Float[Tensor, "layer head d_head"] | None = None,
    dk: Float[Tensor, "layer head d_head"] | None = None,
    *,
    alpha: float | Float[Tensor, "layer head"] = 1.0,
    spans: Sequence[str] = ("gold",),
) -> dict[str, Float[Tensor, "prompt layer head"]]:
    """Attention mass from the answer rows onto each span (``"gold"``, ``"sink"``), mean
    over rows, with ``α·dq`` added to the queries and ``α·dk`` to the keys of every head.

    The steered logit is the model's own plus what the vectors add::

        (q_i + α d_q)·(k_j + α d_k)/√d = s_ij + b_j + c_i,
        b_j = α d_q·k_j/√d,   c_i = (q_i + α d_q)·α d_k/√d

    so the steered attention is the model's own pattern reweighted per key and renormalised,
    ``a'_ij ∝ a_ij · exp(b_j)`` (``c_i`` multiplies numerator and denominator alike and
    cancels, which is why ``d_k`` gets no gradient; it is still applied, as in the paper).
    A row's span mass is a ratio of two matrix-vector products (float64): this is what makes
    training every head on cached tensors fast. The tests check it against the bridge's
    ``hook_pattern`` with the vectors added in the model. Differentiable in ``dq``, ``dk``.
    """
    B, L, H, _, T = inputs.pattern.shape
    kv = inputs.k.shape[2]
    alpha = torch.as_tensor(alpha, dtype=torch.float32)
    alpha = alpha[..., None] if alpha.ndim == 2 else alpha
    base = inputs.pattern.double()  # [B, L, H, R, T]
    a_dq = alpha * dq.float() if dq is not None else None
    if a_dq is not None:
        bias = torch.einsum("lkgd,blktd->blkgt", a_dq.view(L, kv, H // kv, -1), inputs.k).reshape(B, L, H, T)
        bias = (bias * inputs.scaling).double()
        weight = torch.exp(bias - bias.amax(-1, keepdim=True))  # [B, L, H, T]
    else:
        weight = torch.ones(B, L, H, T, dtype=torch.float64)
    total = torch.einsum("blhrt,blht->blhr", base, weight)
    row = torch.ones_like(total)
    if dk is not None:
        q = inputs.q + (a_dq[None, :, :, None] if a_dq is not None else 0)
        c = torch.einsum("blhrd,lhd->blhr", q, alpha * dk.float()).double() * inputs.scaling
        row = torch.exp(c - c.detach())  # 1, with the (vanishing) gradient of a row constant
    real = (inputs.row_pos >= 0).double()  # [B, R]
    out = {}
    for name in spans:
        mask = getattr(inputs, name).double()[:, None, None, :]  # [B, 1, 1, T]
        mass = (torch.einsum("blhrt,blht->blhr", base, weight * mask) * row) / (total * row).clamp_min(1e-300)
        out[name] = (torch.einsum("blhr,br->blh", mass, real) / real.sum(1)[:, None, None]).float()
    return out


# ------------------------------------------------------------------ training
def _train_on_inputs(
    train: AttentionInputs,
    validation: AttentionInputs | None,
    *,
    epochs: int,
    lr: float,
    weight_decay: float,
    batch_size: int,
    init_std: float,
    patience: int,
    seed: int,
    quiet: bool,
) -> tuple[Tensor, Tensor, dict]:
    """AdamW on every head at once; per-head early stopping on validation gold mass."""
    _, L, H, _, d = train.q.shape
    g = torch.Generator().manual_seed(seed)
    dq = torch.nn.Parameter(torch.randn(L, H, d, generator=g) * init_std)
    dk = torch.nn.Parameter(torch.randn(L, H, d, generator=g) * init_std)
    opt = torch.optim.AdamW([dq, dk], lr=lr, weight_decay=weight_decay)

    def val_mass() -> Tensor | None:
        if validation is None:
            return None
        with torch.no_grad():
            return torch.cat([span_attention(validation.select(slice(i, i + 16)), dq, dk)["gold"]
                              for i in range(0, len(validation), 16)]).mean(0)

    best_q, best_k = dq.detach().clone(), dk.detach().clone()
    before = val_mass()
    best = before.clone() if before is not None else None
    best_epoch = torch.zeros(L, H, dtype=torch.long)
    waiting = torch.zeros(L, H, dtype=torch.long)
    history = []
    bar = tqdm(range(epochs), desc="train directions", disable=quiet, leave=False)
    for epoch in bar:
        order = torch.randperm(len(train), generator=g)
        losses = []
        for start in range(0, len(train), batch_size):
            chunk = order[start : start + batch_size]
            batch = train.select(int(chunk) if len(chunk) == 1 else chunk)
            # sum over heads of each head's mean gold mass: each head gets its own gradient
            loss = -span_attention(batch, dq, dk)["gold"].mean(0).sum()
            opt.zero_grad()
            loss.backward()
            opt.step()
            losses.append(loss.item() / (L * H))
        entry = {"epoch": epoch + 1, "train_gold_mass": -sum(losses) / len(losses)}
        current = val_mass()
        if current is not None:
            better = current > best
            best = torch.where(better, current, best)
            best_q[better], best_k[better] = dq.detach()[better], dk.detach()[better]
            best_epoch[better] = epoch + 1
            waiting = torch.where(better, torch.zeros_like(waiting), waiting + 1)
            entry |= {"val_gold_mass": float(current.mean()), "heads_improved": int(better.sum())}
        history.append(entry)
        bar.set_postfix({k: round(v, 4) for k, v in entry.items() if isinstance(v, float)})
        if current is not None and bool((waiting >= patience).all()):
            break
    if validation is None:
        best_q, best_k = dq.detach().clone(), dk.detach().clone()
    info = {"history": history, "epochs_run": len(history)}
    if before is not None:
        info |= {"val_gold_mass_before": before.tolist(), "val_gold_mass_after": best.tolist(),
                 "best_epoch": best_epoch.tolist()}
    return best_q, best_k, info


def train_directions(
    model,
    train: Sequence[QAExample | Prompt],
    validation: Sequence[QAExample | Prompt] | None = None,
    *,
    answer_rows: str = "prefix",
    epochs: int = 10,
    lr: float = 1e-3,
    weight_decay: float = 0.01,
    batch_size: int = 1,
    init_std: float = 0.01,
    patience: int = 2,
    seed: int = 0,
    ranking: Sequence[Head] | None = None,
    data: str | None = None,
    quiet: bool = False,
) -> FocusDirections:
    """Learn focus directions for every head with the model frozen (module docstring).

    Args:
        train, validation: examples (rendered here) or rendered prompts with a gold span.
        answer_rows: where the answer rows come from: ``"prefix"``, ``"greedy"`` or
            ``"gold_answer"`` (the paper: the gold-only prompt's greedy answer), as in
            :func:`focuslens.scoring.score_heads`.
        epochs, lr, weight_decay, batch_size, init_std: the paper's AdamW settings by
            default (10 epochs, lr 1e-3, batch 1, init N(0, 0.01²)).
        patience: per-head early stopping: a head keeps its best-validation epoch;
            training stops when no head improved for ``patience`` epochs.
        ranking: the head ranking to store with the directions (e.g.
            ``scores.ranking()``), so that ``heads=k`` means the top k.
        data: a description of the training data for the metadata.
    """
    from focuslens.models import model_id
    from focuslens.scoring import prepare_prompts

    train_p = prepare_prompts(model, train, answer_rows=answer_rows, quiet=quiet)
    val_p = prepare_prompts(model, validation, answer_rows=answer_rows, quiet=quiet) if validation else None
    train_in = collect_attention_inputs(model, train_p, quiet=quiet)
    val_in = collect_attention_inputs(model, val_p, quiet=quiet) if val_p else None
    settings = {"epochs": epochs, "lr": lr, "weight_decay": weight_decay, "batch_size": batch_size,
                "init_std": init_std, "patience": patience, "seed": seed, "optimizer": "AdamW",
                "objective": "maximise mean attention mass from the answer rows onto the gold document"}
    t0 = time.perf_counter()
    dq, dk, info = _train_on_inputs(train_in, val_in, epochs=epochs, lr=lr, weight_decay=weight_decay,
                                    batch_size=batch_size, init_std=init_std, patience=patience, seed=seed, quiet=quiet)
    seconds = time.perf_counter() - t0
    meta = {
        "model": model_id(model),
        "source": "trained",
        "architecture": _architecture(model),
        "hook_points": {"q": _Q_HOOK.format("{layer}"), "k": _K_HOOK.format("{layer}")},
        "data": {"description": data, "n_train": len(train_p), "n_validation": len(val_p or []),
                 "answer_rows": answer_rows, "qids_train": [p.example.qid for p in train_p]},
        "settings": settings,
        "cache_seconds": train_in.seconds + (val_in.seconds if val_in else 0.0),
        "train_seconds": seconds,
        "versions": _versions(),
        **info,
    }
    return FocusDirections(dq, dk, list(ranking or []), meta)


# ------------------------------------------------------------------ applying
def _rope_frequency(model) -> tuple[float, int]:
    """The lowest rotary frequency (radians per position) and its channel in ``cos``/``sin``
    (HF lays them out as ``cat(freqs, freqs)`` over ``inv_freq``)."""
    for _, module in model.named_modules():
        inv = getattr(module, "inv_freq", None)
        if isinstance(inv, Tensor):
            return float(inv.min()), int(inv.argmin())
    raise ModelError("the model has no rotary embedding (inv_freq): rows other than 'all' need one to locate positions.")


def _position_hooks(model, state: dict) -> list[HookSpec]:
    """Hooks that record the absolute position of every query of the running forward pass.

    The bridge computes RoPE's ``cos``/``sin`` once per forward, before block 0, from the
    true position ids (offset by the KV cache in generation, shared by the packed variants
    of a :class:`~focuslens.kvcache.PrefixCache`). On the lowest frequency ``f`` the angle
    ``p·f`` stays below π over the whole context, so ``p = atan2(sin, cos) / f`` exactly
    (rounded), whatever positive rescaling the model applies to both.
    """
    freq, channel = _rope_frequency(model)
    if freq * model.cfg.n_ctx >= math.pi:
        raise ModelError(f"the lowest RoPE frequency {freq:.3g} wraps within n_ctx={model.cfg.n_ctx}.")

    def keep_cos(cos, hook):
        state["cos"] = cos[..., channel].float()

    def positions(sin, hook):
        angle = torch.atan2(sin[..., channel].float(), state.pop("cos"))
        state["positions"] = torch.round(angle / freq).long()  # [batch or 1, pos]

    return [("rotary_emb.hook_cos", keep_cos), ("rotary_emb.hook_sin", positions)]


def focus_hooks(
    model,
    directions: FocusDirections,
    alpha: float | Sequence[float] | Tensor,
    heads=None,
    *,
    rows="all",
    prompt: Prompt | None = None,
    keys: bool = False,
    strict: bool = True,
) -> list[HookSpec]:
    """Hook specs adding ``α·d_q`` to the queries of the chosen heads (and, with
    ``keys=True``, ``α·d_k`` to their keys), at ``rows``.

    Args:
        heads: ``k`` (the top k of ``directions.ranking``), ``(layer, head)`` pairs, None
            (every head), or a ``[variant, layer, head]`` mask with ``alpha`` one value per
            variant (batch row).
        rows: where the queries are steered (:data:`focuslens.steering.ROWS`): ``"all"``
            (default: every position, as the paper), ``"answer"`` (the answer rows of
            ``prompt`` and every later position, e.g. generated tokens), a start position,
            a :class:`~focuslens.data.render.Span` or a list of positions.
        prompt: the prompt that ``rows="answer"`` refers to.
        keys: also apply the key vectors. They change nothing (module docstring), so they
            are off by default; on, they are added per query head as the paper does (under
            grouped-query attention through ``hook_attn_scores``: ``(q_i+α d_q)·α d_k/√d``),
            on the same rows.
    """
    directions.check_model(model, strict=strict)
    if isinstance(heads, int):
        heads = directions.top_k(heads)
    where = resolve_rows(rows, prompt)
    masks = _variant_masks(model, heads)
    alphas = _per_variant(alpha, masks.shape[0], "alpha")
    scale = _scaling(model)
    state: dict = {}
    hooks: list[HookSpec] = [] if where is None else _position_hooks(model, state)

    def row_gate(x: Tensor) -> Tensor | float:  # [batch or 1, pos, 1, 1] (1.0 for every row)
        if where is None:
            return 1.0
        if "positions" not in state:
            raise ModelError("no RoPE positions were recorded in this forward pass; use rows='all'.")
        pos = state["positions"].to(x.device)
        return rows_mask(where, pos.reshape(-1, x.shape[1]))[..., None, None].to(x.dtype)

    for layer in masks.any(0).any(-1).nonzero().flatten().tolist():
        gate = alphas[:, None, None] * masks[:, layer, :, None]  # [variant, head, 1]
        delta_q = (gate * directions.q[layer].float()).to(model.cfg.dtype)  # [variant, head, d_head]
        stash: dict[str, Tensor] = {}

        def add_q(x, hook, delta=delta_q, stash=stash):
            x = x + delta.to(x.device)[:, None] * row_gate(x)  # x: [batch, pos, head, d_head]
            if keys:
                stash["q"] = x
            return x

        hooks.append((_Q_HOOK.format(layer), add_q))
        if keys:
            delta_k = (gate * directions.k[layer].float()).to(model.cfg.dtype)

            def add_k(scores, hook, delta=delta_k, stash=stash):  # scores: [batch, head, q, key]
                q = stash.pop("q")
                row = torch.einsum("bqhd,bhd->bhq", q * row_gate(q), delta.to(scores.device).expand(scores.shape[0], -1, -1))
                return scores + scale * row[..., None]

            hooks.append((f"blocks.{layer}.attn.hook_attn_scores", add_k))
    return hooks


@contextmanager
def focus(model, directions: FocusDirections, alpha: float = 0.5, heads=20, *, rows="all",
          prompt: Prompt | None = None, keys: bool = False, strict: bool = True):
    """Context manager: steer ``heads`` with ``α·directions`` at ``rows`` while the block
    runs (forward passes and ``model.generate``); no span labels are needed. Hooks are
    removed on exit, also on error. Arguments as in :func:`focus_hooks`;
    :func:`focus_sweep` measures exactly this.

    >>> with focus(model, dirs, alpha=0.5, heads=20):             # doctest: +SKIP
    ...     out = model.generate(prompt, max_new_tokens=16, do_sample=False)
    """
    hooks = focus_hooks(model, directions, alpha, heads, rows=rows, prompt=prompt, keys=keys, strict=strict)
    with model.hooks(fwd_hooks=hooks):
        yield model


# ------------------------------------------------------------------ sweeps (paper Fig. 4)
def focus_variants(model, directions: FocusDirections, ks: Sequence[int | None] | dict, alphas: Sequence[float],
                   rankings: dict[str, Sequence[Head]] | None = None) -> tuple[list[tuple[str, int, float]], Tensor]:
    """The (ranking, k, α) grid of a sweep, α = 0 included for every k, and its
    ``[variant, layer, head]`` head masks. ``rankings`` (default: ``{"directions":
    directions.ranking}``) names the head orders that ``k`` takes the top of (k = None: every
    head; ``ks`` may also map each ranking to its own k values)."""
    from focuslens.steering import head_masks

    rankings = rankings or {"directions": directions.top_k(len(directions.ranking)) if directions.ranking else []}
    everyone = [(layer, head) for layer in range(model.cfg.n_layers) for head in range(model.cfg.n_heads)]
    grid, groups = [], []
    for name, ranking in rankings.items():
        ranking = [(int(layer), int(head)) for layer, head in ranking]
        for k in (ks[name] if isinstance(ks, dict) else ks):
            if k is not None and not 0 < k <= len(ranking):
                raise DataError(f"k={k}: ranking {name!r} has {len(ranking)} heads.")
            for alpha in sorted({0.0, *map(float, alphas)}):
                grid.append((name, k or len(everyone), alpha))
                groups.append(ranking[:k] if k is not None else everyone)
    return grid, head_masks(model, groups)


def focus_sweep(
    model,
    directions: FocusDirections,
    examples: Sequence,
    *,
    ks: Sequence[int | None] = (1, 5, 10, 20, 50, None),
    alphas: Sequence[float] = (-0.5, 0.1, 0.25, 0.4, 0.5, 0.75, 1.0, 2.0),
    rows: str = "all",
    rankings: dict[str, Sequence[Head]] | None = None,
    max_new_tokens: int | None = None,
    return_logits: bool = False,
    quiet: bool = False,
) -> pd.DataFrame:
    """Accuracy with ``α·d_q`` on the top-k heads of ``directions.ranking`` (or of each of
    ``rankings``; ``k=None``: all heads), for every k and α, at ``rows`` (``"all"``, the
    paper's, or ``"answer"``); no span labels are used to steer.

    Every cell equals :func:`focus` with the same arguments on that prompt (tested). With
    ``rows="answer"`` one prefill per example serves every variant; with ``"all"`` every
    variant re-runs the whole prompt (a few variants per batch). Each k also runs at α = 0
    (the unsteered model, so ``gold_mass``/``sink_mass`` of the same heads before
    steering). Returns one row per (example, variant) with ``ranking``, ``k``, ``alpha``, the
    accuracy columns, and the steered heads' ``gold_mass`` and ``sink_mass`` at the answer
    rows (and the logits ``[example, variant, vocab]`` with ``return_logits``). With
    ``max_new_tokens`` each variant answers by greedy generation instead, scored with
    ``best_subspan_em`` (:func:`focuslens.generate.generate_variants`).
    """
    from focuslens.eval import evaluate_variants
    from focuslens.generate import generate_variants

    grid, masks = focus_variants(model, directions, ks, alphas, rankings)
    alpha = torch.tensor([a for _, _, a in grid])

    def hooks_for(prompt, v):
        return focus_hooks(model, directions, alpha[v], masks[v], rows=rows, prompt=prompt)

    desc = f"focus sweep ({rows} rows)"
    if max_new_tokens is not None:
        df = generate_variants(model, examples, len(grid), hooks_for, rows=rows, max_new_tokens=max_new_tokens,
                               probe_heads=masks, quiet=quiet, desc=desc)
    else:
        df = evaluate_variants(model, examples, len(grid), hooks_for, rows=rows, probe_heads=masks,
                               return_logits=return_logits, quiet=quiet, desc=desc)
    df, logits = df if return_logits else (df, None)
    meta = pd.DataFrame([{"ranking": r, "k": k, "alpha": a} for r, k, a in grid])
    df = df.join(meta, on="variant")
    return (df, logits) if return_logits else df


def best_setting(sweep: pd.DataFrame, *, by: Sequence[str] = ("k", "alpha")) -> dict:
    """The setting with the highest accuracy (ties: higher mean margin), as a dict of the
    ``by`` columns plus ``accuracy``."""
    keys = ["correct", "margin"] if "margin" in sweep else ["correct"]  # generated answers have no margin
    table = sweep.groupby(list(by))[keys].mean()
    best = table.sort_values(keys, ascending=False).index[0]
    best = best if isinstance(best, tuple) else (best,)
    return {**{c: (v.item() if hasattr(v, "item") else v) for c, v in zip(by, best)},
            "accuracy": float(table.loc[best if len(best) > 1 else best[0], "correct"])}


# ------------------------------------------------------------------ magnitude control
@dataclass
class MagnitudeControl:
    """Per-prompt strength without labels: keep the attention that the steered heads move
    off the sink within the range calibrated on validation prompts.

    The ICLR revision of the paper frames focus directions as moving attention "from the
    attention sink to the contexts", and too much movement as harmful. Prompts differ in
    how far a fixed α moves them. The controller reads, per prompt, the steered heads' sink
    mass at α = 0 and over a grid of α, and takes the **largest α whose moved mass
    ``sink(0) − sink(α)`` stays at or below the calibrated upper bound** (α = 0, no
    steering, if even the smallest α overshoots). The range is the ``quantiles`` of the
    moved mass over validation prompts at the best fixed α. Only the sink span, never the
    gold document, is read.

    Attributes:
        k: the number of top heads steered.
        target: the median moved mass at ``alpha`` on the validation prompts.
        low, high: the calibrated range (quantiles of that moved mass).
        alpha: the fixed α it was calibrated at.
        grid: the α values the controller may choose from (α ≥ 0, 0 included).
        ranking: the head ranking of the sweep rows it reads (None: a sweep of one ranking).
    """

    k: int
    target: float
    alpha: float
    grid: tuple[float, ...]
    low: float = -math.inf
    high: float = math.inf
    ranking: str | None = None

    @classmethod
    def fit(cls, sweep: pd.DataFrame, k: int, alpha: float, grid: Sequence[float] | None = None, *,
            ranking: str | None = None, quantiles: tuple[float, float] = (0.25, 0.75)) -> MagnitudeControl:
        """Calibrate on the prompts of a :func:`focus_sweep` table (e.g. validation) at (k, α)."""
        moved = _moved_sink(sweep, k, ranking)
        if alpha not in moved.columns:
            raise DataError(f"alpha={alpha} was not run for k={k} in this sweep (have {sorted(moved.columns)}).")
        grid = tuple(sorted({0.0, *(a for a in (grid if grid is not None else moved.columns) if a >= 0)}))
        at = moved[alpha]
        return cls(k=int(k), target=float(at.median()), alpha=float(alpha), grid=grid,
                   low=float(at.quantile(quantiles[0])), high=float(at.quantile(quantiles[1])), ranking=ranking)

    def choose(self, moved: Float[Tensor, "grid"] | Sequence[float]) -> float:
        """The largest grid α whose moved sink mass is at most ``high`` (else 0)."""
        ok = [a for a, m in zip(self.grid, [float(m) for m in moved]) if m <= self.high]
        return max(ok) if ok else 0.0

    def apply_to_sweep(self, sweep: pd.DataFrame) -> pd.DataFrame:
        """Per prompt of a sweep table: the chosen α and that variant's row (as if the
        controller had run at inference: it reads only sink masses)."""
        moved = _moved_sink(sweep, self.k, self.ranking)
        missing = [a for a in self.grid if a not in moved.columns]
        if missing:
            raise DataError(f"the sweep lacks alpha={missing} for k={self.k}.")
        chosen = {i: self.choose(row[list(self.grid)].to_numpy()) for i, row in moved.iterrows()}
        rows = _rows_of(sweep, self.k, self.ranking)
        return rows[rows.alpha == rows["example"].map(chosen)].drop_duplicates("example")

    def alpha_for(self, model, directions: FocusDirections, prompt: Prompt, *, rows: str = "all") -> float:
        """Choose α for one prompt at inference: a sweep of the grid at ``rows`` measuring
        the steered heads' sink mass."""
        sweep = focus_sweep(model, directions, [prompt], ks=(self.k,), alphas=self.grid, rows=rows, quiet=True)
        return self.choose(_moved_sink(sweep, self.k).iloc[0][list(self.grid)].to_numpy())


def _rows_of(sweep: pd.DataFrame, k: int, ranking: str | None) -> pd.DataFrame:
    sub = sweep[sweep.k == k]
    if ranking is not None:
        sub = sub[sub.ranking == ranking]
    if sub.empty:
        raise DataError(f"k={k}{'' if ranking is None else f', ranking={ranking!r}'} is not in this sweep "
                        f"(have k={sorted(sweep.k.unique())}).")
    return sub


def _moved_sink(sweep: pd.DataFrame, k: int, ranking: str | None = None) -> pd.DataFrame:
    """``sink(α=0) − sink(α)`` per prompt (rows) and α (columns) for the top-k heads."""
    table = _rows_of(sweep, k, ranking).pivot_table(index="example", columns="alpha", values="sink_mass")
    if 0.0 not in table.columns:
        raise DataError("the sweep has no alpha=0 run to measure the unsteered sink mass.")
    return table.rsub(table[0.0], axis=0)
