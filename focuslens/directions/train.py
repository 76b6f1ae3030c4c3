"""Learning focus directions with the model frozen (Zhu et al. §3.3).

One forward pass per prompt caches what the objective needs at the answer rows: the
post-RoPE queries, every key and the model's own attention pattern
(:func:`collect_attention_inputs`). Adding ``α·d_q`` to a head's queries reweights that
pattern per key, ``a'_ij ∝ a_ij · exp(α d_q·k_j/√d)`` (:func:`span_attention`), so the
gold-span mass of every head can be computed and differentiated on the cached tensors
alone, without another forward pass. :func:`train_directions` optimises all heads at once
with AdamW and per-head early stopping on validation gold mass.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Sequence
from pathlib import Path

import einops
import torch
from jaxtyping import Float
from torch import Tensor

from focuslens.data.examples import QAExample
from focuslens.data.render import Prompt
from focuslens.directions.artifact import FocusDirections
from focuslens.directions.cache import AttentionInputs, TrainingCache, collect_attention_inputs
from focuslens.directions.checkpoint import TrainerState, load_state, save_state
from focuslens.directions.streamed import ShardedInputs, cache_to_disk, fingerprint
from focuslens.errors import DataError
from focuslens.measure.scoring import prepare_prompts
from focuslens.model.finite import require_finite
from focuslens.model.heads import ranking_of
from focuslens.model.hooks import attn_hook
from focuslens.model.load import architecture_of, library_versions, model_id
from focuslens.model.parallel import is_main
from focuslens.progress import tqdm

__all__ = ["span_attention", "train_directions", "cache_scores"]


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
        # GQA: query head h = kv·group + g reads KV head kv (HF's repeat_kv layout)
        per_group = einops.rearrange(a_dq, "l (kv g) d -> l kv g d", kv=kv)
        bias = einops.rearrange(torch.einsum("lkgd,blktd->blkgt", per_group, inputs.k), "b l kv g t -> b l (kv g) t")
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
def _gold_mass(inputs, dq: Tensor | None, dk: Tensor | None, layers: slice, chunk: int = 16) -> Tensor:
    """``[layer, head]`` of ``layers``: mean gold mass over the cached prompts under (dq, dk)."""
    with torch.no_grad():
        return torch.cat([span_attention(inputs.batch(range(i, min(i + chunk, len(inputs))), layers), dq, dk)["gold"]
                          for i in range(0, len(inputs), chunk)]).mean(0)


def cache_scores(cache: TrainingCache, chunk: int = 16) -> Float[Tensor, "layer head"]:
    """Every head's contextual score from a training cache: the mean attention mass from the
    answer rows onto the gold document, over the cached prompts (the model's own patterns,
    no direction applied). The same number as
    :func:`~focuslens.measure.scoring.score_heads` on those prompts (up to the cache's
    dtype), without another forward pass: the ranking of a streamed run costs nothing."""
    return _gold_mass(cache, None, None, slice(None), chunk)


def _epoch(train, order: Tensor, batch_size: int, groups, params, opts) -> float:
    """One pass over the training cache in ``order``, one layer group after the other (the
    objective is a sum of per-head terms and AdamW is per element, so the groups are
    independent and the result equals one pass over all layers). Returns the mean gold
    mass per head it saw."""
    n_heads = sum(dq.shape[0] * dq.shape[1] for dq, _ in params)
    losses = torch.zeros(-(-len(train) // batch_size), dtype=torch.float64)
    for layers, (dq, dk), opt in zip(groups, params, opts):
        for b, start in enumerate(range(0, len(train), batch_size)):
            batch = train.batch(order[start : start + batch_size], layers)
            # sum over heads of each head's mean gold mass: each head gets its own gradient
            loss = -span_attention(batch, dq, dk)["gold"].mean(0).sum()
            require_finite(loss, f"the training loss (layers {layers.start}-{layers.stop - 1}, batch {b})",
                           "the cached queries, keys or patterns hold NaN/inf (a broken model when they were "
                           "cached, or a damaged cache file): cache them again")
            opt.zero_grad()
            loss.backward()
            opt.step()
            losses[b] += loss.item()
    return float(-(losses / n_heads).mean())


def _layer_groups(n_layers: int, layers_per_group: int | None) -> list[slice]:
    size = layers_per_group or n_layers
    return [slice(a, min(a + size, n_layers)) for a in range(0, n_layers, size)]


def _fresh_or_resumed(checkpoint, identity, params, opts, g, current, val_mass, shape, quiet) -> dict:
    """The early-stopping state at the start: new (the validation mass before training),
    or the one saved after the last finished epoch, with the parameters, the optimizers and
    the shuffling generator restored from it."""
    saved = load_state(checkpoint, identity or {}) if checkpoint is not None else None
    if saved is None:
        best_q, best_k = current()
        before = val_mass()
        best = before.clone() if before is not None else None
        return {"best_q": best_q, "best_k": best_k, "before": before, "best": best,
                "best_epoch": torch.zeros(shape, dtype=torch.long), "waiting": torch.zeros(shape, dtype=torch.long),
                "history": [], "epoch": 0}
    with torch.no_grad():
        for (dq, dk), (q, k) in zip(params, saved["params"]):
            dq.copy_(q)
            dk.copy_(k)
    for opt, state in zip(opts, saved["optimizers"]):
        opt.load_state_dict(state)
    g.set_state(saved["generator"])
    if not quiet and is_main():
        print(f"train directions: resumed after epoch {saved['epoch']} from {checkpoint}", flush=True)
    return {k: saved[k] for k in ("best_q", "best_k", "before", "best", "best_epoch", "waiting", "history", "epoch")}


def _train_on_inputs(train, validation, *, epochs: int, lr: float, weight_decay: float, batch_size: int,
                     init_std: float, patience: int, seed: int, quiet: bool,
                     layers_per_group: int | None = None, checkpoint=None,
                     identity: dict | None = None) -> tuple[Tensor, Tensor, dict]:
    """AdamW on every head, one optimizer per layer group (all layers: one group); per-head
    early stopping on validation gold mass. ``train``/``validation``: an
    :class:`AttentionInputs` or a :class:`~focuslens.directions.streamed.ShardedInputs`.
    ``checkpoint``: a folder where the state is saved after every epoch and resumed from
    (:mod:`focuslens.directions.checkpoint`; ``identity`` must match the saved one)."""
    L, H, d, t0 = train.n_layers, train.n_heads, train.d_head, time.perf_counter()
    g = torch.Generator().manual_seed(seed)
    q0, k0 = torch.randn(L, H, d, generator=g) * init_std, torch.randn(L, H, d, generator=g) * init_std
    groups = _layer_groups(L, layers_per_group)
    params = [(torch.nn.Parameter(q0[s].clone()), torch.nn.Parameter(k0[s].clone())) for s in groups]
    opts = [torch.optim.AdamW([dq, dk], lr=lr, weight_decay=weight_decay) for dq, dk in params]

    def current() -> tuple[Tensor, Tensor]:
        return torch.cat([dq.detach() for dq, _ in params]), torch.cat([dk.detach() for _, dk in params])

    def val_mass() -> Tensor | None:
        return None if validation is None else torch.cat(
            [_gold_mass(validation, dq, dk, s) for s, (dq, dk) in zip(groups, params)])

    st = _fresh_or_resumed(checkpoint, identity, params, opts, g, current, val_mass, (L, H), quiet)
    done = validation is not None and st["epoch"] > 0 and bool((st["waiting"] >= patience).all())
    bar = tqdm(range(st["epoch"], epochs if not done else st["epoch"]), desc="train directions",
               disable=quiet or not is_main(), leave=False)
    for epoch in bar:
        started = time.perf_counter()
        order = torch.randperm(len(train), generator=g)
        entry = {"epoch": epoch + 1, "train_gold_mass": _epoch(train, order, batch_size, groups, params, opts)}
        mass = val_mass()
        if mass is not None:
            better, (dq, dk) = mass > st["best"], current()
            st["best"] = torch.where(better, mass, st["best"])
            st["best_q"][better], st["best_k"][better] = dq[better], dk[better]
            st["best_epoch"][better] = epoch + 1
            st["waiting"] = torch.where(better, torch.zeros_like(st["waiting"]), st["waiting"] + 1)
            entry |= {"val_gold_mass": float(mass.mean()), "heads_improved": int(better.sum()),
                      "dq_norm_mean": float(dq.norm(dim=-1).mean())}
        st["history"].append(entry | {"seconds": time.perf_counter() - started})
        st["epoch"] = epoch + 1
        bar.set_postfix({k: round(v, 4) for k, v in entry.items() if isinstance(v, float)})
        if checkpoint is not None and is_main():
            save_state(checkpoint, TrainerState(st, params=[(dq.detach(), dk.detach()) for dq, dk in params],
                                                optimizers=[opt.state_dict() for opt in opts],
                                                generator=g.get_state()), identity or {})
        if mass is not None and bool((st["waiting"] >= patience).all()):
            break
    best_q, best_k = current() if validation is None else (st["best_q"], st["best_k"])
    info = {"history": st["history"], "epochs_run": len(st["history"]), "train_seconds": time.perf_counter() - t0}
    if st["before"] is not None:
        info |= {"val_gold_mass_before": st["before"].tolist(), "val_gold_mass_after": st["best"].tolist(),
                 "best_epoch": st["best_epoch"].tolist()}
    return best_q, best_k, info


def _attention_caches(model, train_p, val_p, inputs, quiet, cache_dir=None, cache_dtype="float32"):
    """The (train, validation) attention-input caches: collected here (in memory, or streamed
    to ``cache_dir``/train and /validation, resumed if there), or checked against the prompts."""
    if inputs is None and cache_dir is not None:
        train_in = cache_to_disk(model, train_p, Path(cache_dir) / "train", dtype=cache_dtype, quiet=quiet)
        val_in = cache_to_disk(model, val_p, Path(cache_dir) / "validation", dtype=cache_dtype, quiet=quiet) if val_p else None
        return train_in, val_in
    if inputs is None:
        train_in = collect_attention_inputs(model, train_p, quiet=quiet)
        return train_in, collect_attention_inputs(model, val_p, quiet=quiet) if val_p else None
    train_in, val_in = inputs
    for name, cache in (("inputs[0]", train_in), ("inputs[1]", val_in)):
        if cache is not None and not isinstance(cache, TrainingCache):
            raise DataError(f"{name} is a {type(cache).__name__}: pass AttentionInputs or ShardedInputs "
                            "(collect_attention_inputs, cache_to_disk).")
    if len(train_in) != len(train_p) or (val_in is not None and len(val_in) != len(val_p or [])):
        raise DataError(f"inputs hold {len(train_in)} training / {len(val_in) if val_in else 0} validation "
                        f"prompts, not {len(train_p)} / {len(val_p or [])}.")
    return train_in, val_in


def _checked_settings(**settings) -> dict:
    """The training settings for the metadata, after checking each (``DataError`` naming it):
    ``epochs``, ``batch_size``, ``patience`` integers ≥ 1, ``lr`` > 0, ``weight_decay`` and
    ``init_std`` ≥ 0, all finite."""
    for name in ("epochs", "batch_size", "patience", "layers_per_group"):
        if name not in settings:
            continue
        value = settings[name]
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise DataError(f"train_directions: {name}={value!r} must be an integer of at least 1.")
    for name, low in (("lr", "> 0"), ("weight_decay", ">= 0"), ("init_std", ">= 0")):
        value = settings[name]
        ok = isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)
        if not ok or (value <= 0 if low == "> 0" else value < 0):
            raise DataError(f"train_directions: {name}={value!r} must be a finite number {low}.")
    return settings | {"optimizer": "AdamW",
                       "objective": "maximise mean attention mass from the answer rows onto the gold document"}


def _settings_args(settings: dict) -> dict:
    """The trainer's keyword arguments among the checked settings."""
    names = ("epochs", "lr", "weight_decay", "batch_size", "init_std", "patience", "seed")
    return {name: settings[name] for name in names}


def _metadata(model, train_p, val_p, answer_rows, data, settings, cache) -> dict:
    """What a trained direction artifact records about its model, data and settings."""
    return {
        "model": model_id(model),
        "source": "trained",
        "architecture": architecture_of(model),
        "hook_points": {"q": attn_hook("{layer}", "rot_q"), "k": attn_hook("{layer}", "rot_k")},
        "data": {"description": data, "n_train": len(train_p), "n_validation": len(val_p or []),
                 "answer_rows": answer_rows, "qids_train": [p.example.qid for p in train_p]},
        "settings": settings,
        "cache": {k: v for k, v in cache.items() if k != "seconds"},
        "cache_seconds": cache["seconds"],
        "versions": library_versions(),
    }


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
    ranking=None,
    data: str | None = None,
    inputs: tuple | None = None,  # (TrainingCache, TrainingCache | None), checked by name below
    cache_dir: str | Path | None = None,
    cache_dtype: str = "float32",
    layers_per_group: int | None = None,
    checkpoint: str | Path | None = None,
    quiet: bool = False,
) -> FocusDirections:
    """Learn focus directions for every head with the model frozen (module docstring).

    Args:
        train, validation: examples (rendered here) or rendered prompts with a gold span.
        answer_rows: where the answer rows come from: ``"prefix"``, ``"greedy"`` or
            ``"gold_answer"`` (the paper: the gold-only prompt's greedy answer), as in
            :func:`focuslens.measure.scoring.score_heads`.
        epochs, lr, weight_decay, batch_size, init_std: the paper's AdamW settings by
            default (10 epochs, lr 1e-3, batch 1, init N(0, 0.01²)).
        patience: per-head early stopping: a head keeps its best-validation epoch;
            training stops when no head improved for ``patience`` epochs.
        ranking: the head ranking stored with them (any ranking source): ``heads=k`` is its top k.
        data: a description of the training data for the metadata.
        inputs: the ``(train, validation)`` caches (:func:`collect_attention_inputs`, or
            :class:`~focuslens.directions.streamed.ShardedInputs`) if already collected for
            these prompts, which ``train``/``validation`` must then be.
        cache_dir, cache_dtype: stream the caches to disk (:func:`~focuslens.directions.streamed.cache_to_disk`).
        layers_per_group: train this many layers at a time (memory: one batch of one group).
        checkpoint: a folder for the trainer's state after every epoch: called again, a
            killed run resumes (:mod:`focuslens.directions.checkpoint`).
    """
    settings = _checked_settings(epochs=epochs, lr=lr, weight_decay=weight_decay, batch_size=batch_size,
                                 init_std=init_std, patience=patience, seed=seed)
    train_p = prepare_prompts(model, train, answer_rows=answer_rows, quiet=quiet)
    val_p = prepare_prompts(model, validation, answer_rows=answer_rows, quiet=quiet) if validation else None
    if layers_per_group is not None:
        _checked_settings(**settings, layers_per_group=layers_per_group)  # names it if it is not an integer ≥ 1
    train_in, val_in = _attention_caches(model, train_p, val_p, inputs, quiet, cache_dir, cache_dtype)
    identity = json.loads(json.dumps({"model": model_id(model), "settings": settings, "train": fingerprint(train_p),
                                      "layers_per_group": layers_per_group,
                                      "validation": fingerprint(val_p) if val_p else None}))
    dq, dk, info = _train_on_inputs(train_in, val_in, **_settings_args(settings), quiet=quiet,
                                    layers_per_group=layers_per_group, checkpoint=checkpoint, identity=identity)
    cache = {"where": "disk" if isinstance(train_in, ShardedInputs) else "memory", "dtype": cache_dtype,
             "layers_per_group": layers_per_group, "seconds": train_in.seconds + (val_in.seconds if val_in else 0)}
    meta = _metadata(model, train_p, val_p, answer_rows, data, settings, cache) | info
    return FocusDirections(dq, dk, ranking_of(ranking) if ranking is not None else [], meta)
