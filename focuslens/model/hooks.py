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

__all__ = ["attn_hook", "key_indicator", "mass_on", "last_position_only", "POINTS", "RowHook", "HeadEdit"]

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


class RowHook:
    """A hook on ``hook_attn_scores`` / ``hook_pattern`` that reads or edits only the query
    rows from absolute position ``rows_from`` on (the answer rows and later ones).

    On the pattern-free attention path (:mod:`focuslens.model.attention`) such a hook fires
    on those rows only, ``[batch, head, rows, key]``, the rows being the last ones of the
    pass (absolute row = ``key_len − query_len + i``, as in a KV-cached pass); any other hook
    on these points makes its layer run eagerly. ``rows_from=0`` reads every row.
    """

    def __init__(self, fn, rows_from: int = 0):
        self.fn, self.rows_from = fn, int(rows_from)

    def __call__(self, x: Tensor, hook):
        return self.fn(x, hook)


class HeadEdit(RowHook):
    """A ``hook_pattern`` edit confined to some heads, ``heads`` ``[batch or 1, head]`` (bool),
    at the rows from ``rows_from`` on, that the pattern-free path can apply to blocks of rows
    of those heads only: :meth:`edit_block` gets the block's pattern
    ``[batch, len(heads), rows, key]``, the absolute ``rows`` and the ``heads`` indices.
    Called as a hook it edits a full ``[batch, head, query, key]`` pattern (eager path).
    ``check(n_query, n_key)``, run on every pass, raises for an edit that cannot apply.

    An edit that only moves each row's mass π on one key span to a new value (keeping the
    relative weights inside and outside it, as split-softmax does) also gives ``span(n_key,
    batch)`` (``[batch or 1, key]`` bool) and ``target(pi, rows, heads)`` (the new mass,
    ``pi`` ``[batch, len(heads), rows]``): the pattern-free path then needs no pattern at all
    (:func:`focuslens.model.attention._reweighted_heads`)."""

    def __init__(self, fn, heads: Tensor, rows_from: int, edit_block, check=None, span=None, target=None):
        super().__init__(fn, rows_from)
        self.heads, self.edit_block = heads, edit_block
        self.check = check or (lambda n_query, n_key: None)
        self.span, self.target = (span, target) if span is not None and target is not None else (None, None)
