"""The TransformerBridge hook points focuslens uses, named in one place.

Every intervention and measurement hooks a layer's attention, ``blocks.{layer}.attn.hook_{point}``:

* ``rot_q`` / ``rot_k`` — queries and keys after RoPE, ``[batch, pos, head, d_head]`` (keys
  have one slot per KV head under grouped-query attention): focus directions add here;
* ``attn_scores`` — attention logits before the softmax, ``[batch, head, query, key]``;
* ``pattern`` — attention weights after it (same shape): span masses, split-softmax;
* ``z`` — each head's output before the output projection, ``[batch, pos, head, d_head]``:
  patching and ablation.

Measurements never keep a pattern: a ``pattern`` hook reduces it at once with
:func:`mass_on`, the one span-mass reduction (scoring, per-prompt masses, sweep probes).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from jaxtyping import Float
from torch import Tensor

from focuslens.data.render import Span
from focuslens.errors import FocusLensError
from focuslens.model.spans import span_mask

__all__ = ["attn_hook", "key_indicator", "mass_on", "last_position_only", "POINTS"]

POINTS = ("rot_q", "rot_k", "attn_scores", "pattern", "z")


def attn_hook(layer: int | str, point: str) -> str:
    """The name of hook point ``point`` (one of :data:`POINTS`) of layer ``layer``'s
    attention; ``layer="{layer}"`` gives a template (for metadata)."""
    if point not in POINTS:
        raise FocusLensError(f"point={point!r}: choose one of {POINTS}.")
    return f"blocks.{layer}.attn.hook_{point}"


def key_indicator(n_keys: int, columns: Sequence[Sequence]) -> Float[Tensor, "key column"]:
    """``[n_keys, n_columns]``: 1 where a key lies in one of a column's spans (``Span`` or
    ``(start, end)``)."""
    indicator = torch.zeros(n_keys, len(columns))
    for col, spans in enumerate(columns):
        for span in spans:
            indicator[:, col] += span_mask(span if isinstance(span, Span) else Span(int(span[0]), int(span[1])), n_keys)
    return indicator.clamp_max(1)


def mass_on(pattern_rows: Float[Tensor, "... row key"], indicator: Float[Tensor, "key column"]) -> Float[Tensor, "... column"]:
    """The one span-mass reduction (scoring, per-prompt masses and the sweeps' probes):
    each row's attention summed over a column's keys, then the mean over rows."""
    return (pattern_rows @ indicator.to(pattern_rows)).mean(dim=-2)


def _last(resid: Tensor, hook) -> Tensor:
    return resid[:, -1:]


def last_position_only() -> tuple[str, object]:
    """The hook spec that unembeds only the last position (``unembed.hook_in`` cut to one
    row): every caller that needs next-token logits at the end uses it, so a forward pass
    never computes ``[pos, vocab]`` logits it throws away."""
    return ("unembed.hook_in", _last)
