"""The TransformerBridge hook points focuslens uses, named in one place.

Every intervention and measurement hooks a layer's attention, ``blocks.{layer}.attn.hook_{point}``:

* ``rot_q`` / ``rot_k`` — queries and keys after RoPE, ``[batch, pos, head, d_head]`` (keys
  have one slot per KV head under grouped-query attention): focus directions add here;
* ``attn_scores`` — attention logits before the softmax, ``[batch, head, query, key]``;
* ``pattern`` — attention weights after it (same shape): span masses, split-softmax;
* ``z`` — each head's output before the output projection, ``[batch, pos, head, d_head]``:
  patching and ablation.
"""

from __future__ import annotations

from focuslens.errors import FocusLensError

__all__ = ["attn_hook", "POINTS"]

POINTS = ("rot_q", "rot_k", "attn_scores", "pattern", "z")


def attn_hook(layer: int | str, point: str) -> str:
    """The name of hook point ``point`` (one of :data:`POINTS`) of layer ``layer``'s
    attention; ``layer="{layer}"`` gives a template (for metadata)."""
    if point not in POINTS:
        raise FocusLensError(f"point={point!r}: choose one of {POINTS}.")
    return f"blocks.{layer}.attn.hook_{point}"
