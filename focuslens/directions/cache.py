"""The training cache of focus directions: what one forward pass per prompt leaves for the
objective (Zhu et al. §3.3) — post-RoPE queries at the answer rows, every key, and the
model's own attention pattern at those rows.

Two implementations share one interface (:class:`TrainingCache`): :class:`AttentionInputs`
in memory (this module) and :class:`~focuslens.directions.streamed.ShardedInputs` on disk.
The trainer takes either and never asks which.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

import einops
import torch
from jaxtyping import Bool, Float, Int
from torch import Tensor

from focuslens.data.render import Prompt
from focuslens.errors import DataError
from focuslens.model.hooks import RowHook, attn_hook, last_position_only
from focuslens.model.load import attention_scaling
from focuslens.model.parallel import cat, is_main, share
from focuslens.model.spans import require_gold, span_mask
from focuslens.progress import tqdm

__all__ = ["TrainingCache", "AttentionInputs", "collect_attention_inputs"]


@runtime_checkable
class TrainingCache(Protocol):
    """What the trainer reads: a number of prompts, the model's shapes, and batches."""

    seconds: float

    def __len__(self) -> int: ...

    def batch(self, index: Tensor, layers: slice) -> AttentionInputs: ...


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

    @property
    def n_layers(self) -> int:
        return self.q.shape[1]

    @property
    def n_heads(self) -> int:
        return self.q.shape[2]

    @property
    def d_head(self) -> int:
        return self.q.shape[-1]

    def batch(self, index, layers: slice) -> AttentionInputs:
        """Prompts ``index`` and ``layers``, as :class:`~focuslens.directions.streamed.ShardedInputs` gives
        them: cropped to the longest of these prompts; the layers and the crop are sliced
        before the prompts are gathered, so only what is returned is copied (a slice of
        prompts is a view)."""
        if isinstance(index, int):
            index = slice(index, index + 1)
        if not isinstance(index, slice):
            index = torch.as_tensor(index)
        T = int(self.n_keys[index].max())
        return AttentionInputs(self.q[:, layers][index], self.k[:, layers, :, :T][index],
                               self.pattern[:, layers, ..., :T][index], self.row_pos[index], self.n_keys[index],
                               self.gold[:, :T][index], self.sink[:, :T][index], self.scaling)

    def select(self, index) -> AttentionInputs:
        """A subset of prompts, all layers (see :meth:`batch`)."""
        return self.batch(index, slice(None))


@torch.no_grad()
def collect_attention_inputs(model, prompts: Sequence[Prompt], *, quiet: bool = False,
                             shared: bool = True) -> AttentionInputs:
    """One forward pass per prompt through the frozen model, keeping the post-RoPE
    queries at the answer rows (``hook_rot_q``) and the keys (``hook_rot_k``) of every layer.
    Under a launcher each process runs its share of the prompts (:mod:`focuslens.model.parallel`)
    and every process gets the whole cache; ``shared=False``: this process runs them all
    (:func:`~focuslens.directions.streamed.cache_to_disk` shares chunks instead)."""
    if not prompts:
        raise DataError("no prompts: directions need training data.")
    for i, p in enumerate(prompts):
        require_gold(p, i, "directions are trained to attend to it")
    n, R, T = len(prompts), max(len(p.answer) for p in prompts), max(p.n_tokens for p in prompts)
    t0 = time.perf_counter()
    if not shared:
        q, k, pattern = _forward_block(model, prompts, R, T, quiet)
    else:
        q, k, pattern = (cat(x, n) for x in _forward_block(model, [prompts[i] for i in share(n)], R, T, quiet))
    row_pos = torch.full((n, R), -1, dtype=torch.long)
    gold = torch.zeros(n, T, dtype=torch.bool)
    sink = torch.zeros(n, T, dtype=torch.bool)
    for i, p in enumerate(prompts):
        row_pos[i, : len(p.answer)] = torch.arange(p.answer.start, p.answer.end)
        gold[i], sink[i] = span_mask(p.gold, T), span_mask(p.sink, T)
    n_keys = torch.tensor([p.n_tokens for p in prompts])
    return AttentionInputs(q, k, pattern, row_pos, n_keys, gold, sink, attention_scaling(model), time.perf_counter() - t0)


def _forward_block(model, prompts: Sequence[Prompt], R: int, T: int, quiet: bool) -> tuple[Tensor, Tensor, Tensor]:
    """``q``, ``k`` and ``pattern`` of :class:`AttentionInputs` for ``prompts``, padded to
    ``R`` answer rows and ``T`` keys."""
    c = model.cfg
    n, L, H, d = len(prompts), c.n_layers, c.n_heads, c.d_head
    q = torch.zeros(n, L, H, R, d)
    k = torch.zeros(n, L, c.n_key_value_heads or H, T, d)
    pattern = torch.zeros(n, L, H, R, T)
    pattern[..., 0] = 1  # padding rows: all weight on key 0 (they are dropped from every mean)
    for i, p in enumerate(tqdm(prompts, desc="cache q/k", disable=quiet or not is_main(), leave=False)):
        rows = p.answer.to_slice()

        def keep(x, hook, i=i, rows=rows, n_tok=p.n_tokens):
            layer, n_rows = int(hook.name.split(".")[1]), rows.stop - rows.start
            if hook.name.endswith("hook_rot_q"):  # [1, pos, head, d_head]
                q[i, layer, :, :n_rows] = einops.rearrange(x[0, rows], "row head d -> head row d").float().cpu()
            elif hook.name.endswith("hook_rot_k"):
                k[i, layer, :, :n_tok] = einops.rearrange(x[0], "key kv d -> kv key d").float().cpu()
            else:  # hook_pattern: [1, head, query, key], the last `query` rows of the pass
                first = x.shape[-1] - x.shape[-2]
                pattern[i, layer, :, :n_rows, :n_tok] = x[0, :, rows.start - first : rows.stop - first].float().cpu()

        hooks = [(attn_hook(layer, point), keep) for layer in range(L) for point in ("rot_q", "rot_k")]
        hooks += [(attn_hook(layer, "pattern"), RowHook(keep, rows.start)) for layer in range(L)]
        hooks.append(last_position_only())
        model.run_with_hooks(p.input_ids[None].to(c.device), fwd_hooks=hooks)
    return q, k, pattern


