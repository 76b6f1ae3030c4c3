"""Ms-PoE — multi-scale positional encoding (Zhang et al., NeurIPS 2024, "Found in the
Middle: How Language Models Use Long Contexts Better via Plug-and-Play Positional
Encoding", arXiv 2403.04797): rescale the RoPE position indices of chosen heads by a ratio
r > 1 (positions p → p / r), a different ratio per head, so some heads see the context
"compressed" and the middle of a long prompt moves closer in rotary angle to the end. No
labels and no training.

How it is applied here: RoPE rotates channel pair c of a query or key at position p by the
angle ``p·ω_c``. Re-rotating the *already rotated* vector by ``p·ω_c·(1/r − 1)``
(a :data:`~focuslens.model.hooks.POINTS` ``rot_q`` / ``rot_k`` hook) gives exactly the
rotation at position p / r, so the score between query i and key j depends on
``(i − j)/r``. Positions come from RoPE's own cos/sin (:func:`~focuslens.model.rope.position_hooks`,
right in KV-cached generation too) and frequencies from each layer's own table
(:func:`~focuslens.model.rope.layer_inv_freq`: Gemma 3's sliding and global layers differ).

Reproduced: the per-head position rescaling of queries and keys at every position; ratio 1
is the identity; one ratio for every head equals running the model with fractional
position ids ``p / r`` (tested against Hugging Face). Adapted:

* Ms-PoE spreads the ratios over [1.2, 1.8] and orders them by each head's
  "position-awareness" score; focuslens gives the chosen groups of a layer ratios spaced
  linearly over ``1 + (ratio − 1)·[0.4, 1.6]`` (ratio 1.5 → [1.2, 1.8]) in KV-group order;
* under grouped-query attention the keys of a KV head are shared by its query heads, so a
  ratio belongs to a KV group: choosing any head of a group rescales the whole group (on
  Gemma 3 270M, one KV head per layer, a layer at a time);
* Ms-PoE rescales layers 2 … L−1; here the heads are the top k of a ranking or ``"all"``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from einops import rearrange, repeat
from torch import Tensor

from focuslens.errors import DataError
from focuslens.model.heads import HookSpec
from focuslens.model.hooks import attn_hook
from focuslens.model.intervention import HeadIntervention
from focuslens.model.rope import layer_inv_freq, position_hooks

__all__ = ["MsPoE", "group_ratios"]


def _rotate_half(x: Tensor) -> Tensor:
    half = x.shape[-1] // 2
    return torch.cat([-x[..., half:], x[..., :half]], dim=-1)


def group_ratios(masks: Tensor, ratio: Tensor, n_kv: int) -> Tensor:
    """``[variant, layer, kv]`` position ratios: per variant and layer, the KV groups with a
    chosen head get ratios spaced over ``1 + (ratio − 1)·[0.4, 1.6]`` (one group: ``ratio``),
    the others 1."""
    v, n_layers, n_heads = masks.shape
    chosen = rearrange(masks, "v l (g r) -> v l g r", g=n_kv).any(-1)  # [variant, layer, kv]
    out = torch.ones(v, n_layers, n_kv)
    for vi in range(v):
        for layer in range(n_layers):
            groups = chosen[vi, layer].nonzero().flatten()
            if len(groups) == 0:
                continue
            spread = torch.linspace(0.4, 1.6, len(groups)) if len(groups) > 1 else torch.ones(1)
            out[vi, layer, groups] = 1 + (float(ratio[vi]) - 1) * spread
    return out


def _rerotate(x: Tensor, ratios: Tensor, positions: Tensor, inv_freq: Tensor) -> Tensor:
    """``x`` ``[batch, pos, head, d]`` (rotated at ``positions`` ``[batch or 1, pos]``) as if
    rotated at ``positions / ratios`` (``ratios`` ``[batch or 1, head]``)."""
    freqs = torch.cat([inv_freq, inv_freq]).to(x.device)  # HF layout: cat(freqs, freqs)
    scale = 1 / ratios.to(x.device) - 1  # [batch, head]
    angle = positions.to(x.device).float()[:, :, None, None] * freqs * scale[:, None, :, None]
    xf = x.float()
    return (xf * angle.cos() + _rotate_half(xf) * angle.sin()).to(x.dtype)


@dataclass
class MsPoE(HeadIntervention):
    """Ms-PoE as a value (module docstring): the chosen heads' KV groups see positions
    divided by ratios around ``ratio`` (1 changes nothing; Ms-PoE's [1.2, 1.8] is
    ``ratio=1.5``), at every row. ``heads``: any selection (an int is the top k of
    ``ranking``; ``"all"`` for every head)."""

    heads: object = "all"
    ranking: object = None
    ratio: object = 1.5
    rows: object = "all"

    STRENGTH = "ratio"
    METHOD, NEEDS_LABEL = "ms_poe", False
    PAPER = "Zhang et al. 2024, Ms-PoE (NeurIPS 2024, arXiv 2403.04797)"

    def __post_init__(self) -> None:
        if self.rows != "all":
            raise DataError(f"rows={self.rows!r}: Ms-PoE rescales the positions of every query and key; it runs "
                            "rows='all' only (keys cached unscaled would mix two position scales).")
        ratios = torch.as_tensor(self.ratio, dtype=torch.float32).flatten()
        if not torch.isfinite(ratios).all() or (ratios <= 0).any():
            raise DataError(f"ratio={ratios.tolist()}: position ratios must be finite and > 0 (1 changes nothing).")

    @classmethod
    def candidates(cls, context):
        return [({"ratio": r}, cls("all", ratio=r)) for r in (1.2, 1.5, 2.0)]

    def variant_hooks(self, model, prompt, masks: Tensor, strength: Tensor) -> list[HookSpec]:
        n_kv = int(getattr(model.cfg, "n_key_value_heads", None) or model.cfg.n_heads)
        group = model.cfg.n_heads // n_kv
        ratios = group_ratios(masks, strength, n_kv)  # [variant, layer, kv]
        state: dict = {}
        hooks: list[HookSpec] = position_hooks(model, state)
        for layer in (ratios != 1).any(0).any(-1).nonzero().flatten().tolist():
            inv_freq = layer_inv_freq(model, layer)
            r_kv = ratios[:, layer]  # [variant, kv]
            r_q = repeat(r_kv, "v g -> v (g r)", r=group)

            def rerotate(x, hook, r_q=r_q, r_kv=r_kv, inv_freq=inv_freq):
                r = r_q if x.shape[2] == r_q.shape[1] else r_kv
                if r.shape[0] not in (1, x.shape[0]):
                    raise DataError(f"{r.shape[0]} Ms-PoE variants for a batch of {x.shape[0]}.")
                return _rerotate(x, r, state["positions"], inv_freq)

            hooks += [(attn_hook(layer, "rot_q"), rerotate), (attn_hook(layer, "rot_k"), rerotate)]
        return hooks
