"""Rotary position embeddings as focuslens reads them: each query's absolute position, and
each layer's rotary frequencies.

Interventions that act on some rows only (focus directions with ``rows="answer"``) or that
re-rotate queries and keys (Ms-PoE) need the absolute position of every query of the
running pass — also in KV-cached generation and in the packed variants of a
:class:`~focuslens.model.prefix.PrefixCache`. They are read from RoPE's own ``cos``/``sin``
(:func:`position_hooks`), and the frequencies from the model's rotary tables
(:func:`layer_inv_freq`; Gemma 3 keeps one per layer type).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from focuslens.errors import ModelError
from focuslens.model.heads import HookSpec
from focuslens.model.spans import rows_past_end, rows_reach

__all__ = ["rope_frequency", "position_hooks", "layer_inv_freq"]


def _layer_types(model) -> list | None:
    config = getattr(getattr(model, "original_model", None), "config", None)
    return getattr(config, "layer_types", None) or getattr(getattr(config, "text_config", None), "layer_types", None)


def layer_inv_freq(model, layer: int) -> Tensor:
    """The inverse frequencies ``[d_head / 2]`` (radians per position, any scaling the
    model applies to positions included) of the rotary table layer ``layer`` uses: one
    table (``inv_freq``: Llama, Qwen2, Mistral) or one per layer type (Gemma 3:
    ``sliding_attention_inv_freq``, ``full_attention_inv_freq``)."""
    types = _layer_types(model)
    names = ([f"{types[layer]}_inv_freq"] if types else []) + ["inv_freq"]
    for name in names:
        for _, module in model.named_modules():
            inv = getattr(module, name, None)
            if isinstance(inv, Tensor):
                return inv.detach().float()
    raise ModelError(f"layer {layer} has no rotary table (none of {names}): this needs a RoPE model.")


def rope_frequency(model) -> tuple[float, int]:
    """The lowest rotary frequency (radians per position) of the table layer 0 uses, and its
    channel in ``cos``/``sin`` (HF lays them out as ``cat(freqs, freqs)`` over the inverse
    frequencies). One table (``inv_freq``: Llama, Qwen2, Mistral) or one per layer type
    (Gemma 3: ``sliding_attention_inv_freq`` and ``full_attention_inv_freq``)."""
    config = getattr(getattr(model, "original_model", None), "config", None)
    layer_types = getattr(config, "layer_types", None) or getattr(getattr(config, "text_config", None),
                                                                  "layer_types", None)
    names = ["inv_freq", *([f"{layer_types[0]}_inv_freq"] if layer_types else [])]
    for _, module in model.named_modules():
        for name in names:
            inv = getattr(module, name, None)
            if isinstance(inv, Tensor):
                return float(inv.min()), int(inv.argmin())
    raise ModelError(f"the model has no rotary embedding (none of {names}): rows other than 'all' need one to "
                     "locate positions.")


def position_hooks(model, state: dict, where=None, rows=None) -> list[HookSpec]:
    """Hooks that record the absolute position of every query of the running forward pass.

    Layer 0's attention receives RoPE's ``cos``/``sin`` (``blocks.0.attn.hook_cos/sin``:
    per layer, so a model with one table per layer type, as Gemma 3, is read from the one
    table layer 0 uses; the shared ``rotary_emb`` hooks fire once per table there, in an order
    that varies between processes), computed from the true position ids (offset by the KV
    cache in generation, shared by the packed variants of a
    :class:`~focuslens.model.prefix.PrefixCache`). On the lowest frequency ``f`` the angle
    ``p·f`` stays below 2π over the whole context, so ``p = atan2(sin, cos) / f`` exactly
    (rounded; a negative angle past π is taken modulo 2π), whatever positive rescaling the
    model applies to both. A pass from position 0 (no KV cache) that the resolved rows
    ``where`` do not reach raises (:func:`~focuslens.steer.split_softmax.rows_past_end`):
    the steering would change nothing.
    """
    freq, channel = rope_frequency(model)
    if freq * model.cfg.n_ctx >= 2 * math.pi:
        raise ModelError(f"the lowest RoPE frequency {freq:.3g} wraps within n_ctx={model.cfg.n_ctx}.")
    period = 2 * math.pi / freq

    def keep_cos(cos, hook):
        state["cos"] = cos[..., channel].float()

    def positions(sin, hook):
        angle = torch.atan2(sin[..., channel].float(), state.pop("cos")) / freq
        angle = torch.where(angle < -0.5, angle + period, angle)  # an angle past π comes back negative
        state["positions"] = pos = torch.round(angle).long()  # [batch or 1, pos]
        # no sync unless the rows miss a pass of this length: then is it a pass from 0?
        if not rows_reach(where, pos.shape[-1]) and int(pos[..., 0].min()) == 0:
            raise rows_past_end(rows, pos.shape[-1])

    return [("blocks.0.attn.hook_cos", keep_cos), ("blocks.0.attn.hook_sin", positions)]
