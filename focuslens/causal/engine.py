"""Replacing heads' outputs at the answer rows: the engine of patching and ablation.

Every causal test in focuslens re-runs a prompt's answer rows with the output ``z`` of some
heads (``blocks.{l}.attn.hook_z``, ``[batch, pos, head, d_head]``) replaced: by the clean
run's value (patching), by zeros or by a dataset mean (ablation). The prompt before the
answer rows is untouched, so one :class:`~focuslens.model.prefix.PrefixCache` serves every
replacement and :func:`run_head_groups` runs a batch of them at once (batch row *i*
replaces the heads of group *i*).
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import partial

import torch
from jaxtyping import Float
from torch import Tensor

from focuslens.data.render import Prompt
from focuslens.errors import DataError
from focuslens.model.heads import Head, resolve_heads
from focuslens.model.hooks import attn_hook, last_position_only
from focuslens.model.prefix import PrefixCache

__all__ = ["answer_rows", "forward_answer_z", "run_head_groups", "check_heads"]



def answer_rows(prompt: Prompt, offset: int) -> slice:
    """The answer rows as a slice of a PrefixCache suffix that starts at ``offset``."""
    return slice(prompt.answer.start - offset, prompt.answer.end - offset)


@torch.no_grad()
def forward_answer_z(model, prompt: Prompt) -> tuple[Tensor, Float[Tensor, "layer row head d_head"]]:
    """One full forward: the last-position logits and every head's z at the answer rows."""
    rows = prompt.answer.to_slice()
    store: dict[int, Tensor] = {}

    def keep(z, hook, layer):
        store[layer] = z[0, rows].detach().clone()

    hooks = [(attn_hook(layer, "z"), partial(keep, layer=layer)) for layer in range(model.cfg.n_layers)]
    logits = model.run_with_hooks(
        prompt.input_ids[None].to(model.cfg.device), fwd_hooks=[*hooks, last_position_only()]
    )
    return logits[0, -1].float(), torch.stack([store[layer] for layer in range(model.cfg.n_layers)])


def _replace(z, hook, batch_index: Tensor, head_index: Tensor, values: Tensor, rows: slice):
    """Write ``values`` [n, row, d_head] into z[batch_index[i], rows, head_index[i]]."""
    z = z.clone()
    z[batch_index, rows, head_index] = values.to(z.dtype)
    return z


def run_head_groups(
    pc: PrefixCache,
    groups: Sequence[Sequence[Head]],
    source: Float[Tensor, "layer row head d_head"],
    rows: slice,
    batch_size: int,
) -> Float[Tensor, "group vocab"]:
    """The generic patching loop: suffix run *i* replaces the z of every head in
    ``groups[i]`` at the answer rows with ``source`` (clean z, zeros, or the mean)."""
    out = []
    for start in range(0, len(groups), batch_size):
        chunk = groups[start : start + batch_size]
        by_layer: dict[int, tuple[list[int], list[int]]] = {}
        for b, group in enumerate(chunk):
            for layer, head in group:
                by_layer.setdefault(layer, ([], []))
                by_layer[layer][0].append(b)
                by_layer[layer][1].append(head)
        hooks = []
        for layer, (b_idx, h_idx) in by_layer.items():
            b, h = (torch.tensor(i, device=source.device) for i in (b_idx, h_idx))
            values = source[layer][:, h].transpose(0, 1)  # [n, row, d_head]
            fn = partial(_replace, batch_index=b, head_index=h, values=values, rows=rows)
            hooks.append((attn_hook(layer, "z"), fn))
        out.append(pc.run(hooks, batch=len(chunk)).float())
    return torch.cat(out)


def check_heads(model, heads="all", ranking=None) -> list[Head]:
    """The heads to patch or ablate (:func:`~focuslens.model.heads.resolve_heads`), at least one."""
    heads = resolve_heads(model, heads, ranking)
    if not heads:
        raise DataError("heads is empty: pass at least one (layer, head), an int with ranking=, or 'all'.")
    return heads
