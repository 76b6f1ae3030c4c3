"""The pattern-free attention path: SDPA inside the TransformerBridge, eager rows only where a hook looks.

The bridge re-implements attention eagerly: every layer forms two ``[batch, head, T, T]``
tensors (``hook_attn_scores``, ``hook_pattern``), 5.3 GB more peak memory for one 8k-token
SmolLM2 forward and 206 GB for one layer of Llama-3.2-3B at 32k (``docs/scaling.md`` §4).
focuslens only ever looks at a few query rows (the answer rows, R ≈ 5–30) or edits a few
heads, so :func:`install` (called by :func:`~focuslens.model.load.load_model`) gives each
attention component a forward that computes

1. **every query row with** :func:`torch.nn.functional.scaled_dot_product_attention`
   (FlashAttention / memory-efficient kernels on GPU, the flash kernel on CPU): no pattern;
2. **the rows a hook reads, eagerly**: a hook on ``hook_attn_scores`` / ``hook_pattern``
   that declares ``rows_from`` (a :class:`~focuslens.model.hooks.RowHook`: every focuslens
   reader, e.g. :class:`~focuslens.measure.record.Recording`) needs only the query rows from
   that position on. Those rows get scores and a pattern ``[batch, head, rows, T]``, the
   hooks fire on them exactly as on the eager path (rows are the *last* ones, as in a
   KV-cached pass: absolute row = ``T_key − T_query + i``), edits reach the output, and the
   rows' output replaces SDPA's;
3. **head edits on every row** (a :class:`~focuslens.model.hooks.HeadEdit`: split-softmax
   with ``rows="all"``): the edited heads only, by two more SDPA calls (the span mass, then
   a per-row key bias: :func:`_reweighted_heads`); other edits in blocks of rows, through
   the same edit function the eager hook applies.

Memory is ``O(H·R·T)`` for the observed rows plus ``O(h·B·T)`` per block of edited heads,
never ``O(H·T²)``. Padded query rows (left padding) are undefined on both paths and differ. Which hooks fire where:

* ``hook_in``, ``hook_q/k/v``, ``hook_cos/sin``, ``hook_rot_q/k``, ``hook_z`` (``o.hook_in``),
  ``hook_out``: every row, on both paths (focus directions and patching live here);
* ``hook_attn_scores`` / ``hook_pattern`` with a :class:`RowHook`: the rows from its
  ``rows_from`` on (eager path: every row);
* a :class:`HeadEdit` (split-softmax): its own pattern-free kernel on its heads, and as a
  normal hook on any rows computed eagerly;
* any other hook on ``hook_attn_scores`` / ``hook_pattern``: the layer runs eagerly.

A layer falls back to the bridge's own eager forward when a hook on ``hook_attn_scores`` or
``hook_pattern`` is not a ``RowHook`` (``run_with_cache`` of patterns, a user's own hook: they
get full patterns, as before), inside :func:`eager_attention`, or for architecture features
this path does not implement (:func:`unsupported`: softcapping, attention sinks, gated or
split q/k/v, partial or interleaved RoPE, …). Equality with the eager path (logits, span
masses, split-softmax, focus, patching, training caches, KV-cached generation, left padding;
llama, qwen2, mistral; MHA, GQA, MQA) is tested in ``tests/test_attention.py``.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from types import MethodType

import torch
import torch.nn.functional as F
from einops import rearrange, repeat
from torch import Tensor

from focuslens.errors import ModelError
from focuslens.model.hooks import HeadEdit, RowHook

__all__ = ["install", "eager_attention", "path_of", "unsupported", "attention_rows", "BLOCK_ROWS"]

BLOCK_ROWS = 512  # query rows per block when edited heads are computed explicitly
_PATTERN_POINTS = ("hook_attn_scores", "hook_pattern")


# ------------------------------------------------------------------ installing and choosing the path
def unsupported(attn) -> str | None:
    """Why the pattern-free path cannot run ``attn`` (a bridge attention component), or None."""
    from transformer_lens.model_bridge.generalized_components.position_embeddings_attention import (
        PositionEmbeddingsAttentionBridge,
    )

    if type(attn) is not PositionEmbeddingsAttentionBridge:
        return f"{type(attn).__name__} is not the rotary attention bridge"
    hf, cfg = attn.original_component, attn.config
    checks = {
        "split q/k/v inputs": getattr(cfg, "use_split_qkv_input", False) or getattr(cfg, "use_attn_in", False),
        "per-head results (use_attn_result)": getattr(cfg, "use_attn_result", False),
        "a gated query": getattr(cfg, "gated_q_proj", False) or "gate" in attn.submodules,
        "a key multiplier": getattr(hf, "key_multiplier", None) is not None,
        "logit softcapping": getattr(hf, "attn_logit_softcapping", None) is not None,
        "attention sinks": getattr(hf, "sinks", None) is not None,
        "clipped q/k/v": getattr(getattr(hf, "config", None), "clip_qkv", None) is not None,
        "non-standard RoPE": any(getattr(cfg, f, False) for f in
                                 ("rotary_interleaved_cos_sin", "rotary_adjacent_pairs", "qk_norm_after_rope")),
        "a pre-reshape or per-head q/k norm": attn._qk_norm_phase == "pre_reshape" or attn._qk_norm_per_head,
        "llama-4 query scaling": isinstance(getattr(getattr(hf, "config", None), "rope_parameters", None), dict)
        and getattr(hf.config, "rope_parameters").get("llama_4_scaling_beta") is not None,
    }
    found = [name for name, present in checks.items() if present]
    return ", ".join(found) if found else None


def install(model) -> dict[int, str]:
    """Give every supported attention layer of ``model`` the pattern-free forward and let
    Hugging Face build SDPA-style masks (``None`` when causal, boolean otherwise: no
    ``[T, T]`` float mask). Returns ``{layer: reason}`` for the layers left eager."""
    eager: dict[int, str] = {}
    for layer, block in enumerate(model.blocks):
        attn = block.attn
        reason = unsupported(attn)
        if reason:
            eager[layer] = reason
            continue
        if "_focuslens_eager" not in vars(attn):
            attn._focuslens_eager = attn.forward
            # the instance's own forward (the bridge passes other attribute writes on to the HF module)
            object.__setattr__(attn, "forward", MethodType(_forward, attn))
    if len(eager) < len(model.blocks):
        for config in _configs(model):
            config._attn_implementation = "sdpa"
    model._focuslens_eager_layers = eager
    return eager


def _configs(model) -> Iterator:
    hf = getattr(model, "original_model", None)
    seen = set()
    for module in ([hf] if hf is not None else []) + [b.attn.original_component for b in model.blocks]:
        config = getattr(module, "config", None)
        if config is not None and id(config) not in seen:
            seen.add(id(config))
            yield config
            for sub in ("text_config",):
                if getattr(config, sub, None) is not None:
                    yield getattr(config, sub)


@contextmanager
def eager_attention(model):
    """Context manager: every layer runs the bridge's eager attention (full ``hook_pattern``
    for every hook, whatever it declares) — e.g. the token view of a short prompt, or a check
    of the pattern-free path."""
    previous = getattr(model, "_focuslens_force_eager", False)
    model._focuslens_force_eager = True
    for block in model.blocks:
        block.attn._focuslens_force_eager = True
    try:
        yield model
    finally:
        model._focuslens_force_eager = previous
        for block in model.blocks:
            block.attn._focuslens_force_eager = previous


def path_of(model) -> dict[int, str]:
    """``{layer: "pattern-free" | "eager: <reason>"}`` as the next forward pass (without
    hooks) would run it."""
    eager = getattr(model, "_focuslens_eager_layers", None)
    if eager is None:
        return {layer: "eager: focuslens.model.attention.install was not called" for layer in range(model.cfg.n_layers)}
    forced = getattr(model, "_focuslens_force_eager", False)
    return {layer: f"eager: {eager[layer]}" if layer in eager else "eager: eager_attention()" if forced
            else "pattern-free" for layer in range(model.cfg.n_layers)}


def _pattern_hooks(attn) -> list | None:
    """The user hooks on the layer's score and pattern points, or None when one of them
    (or a raw PyTorch hook) is not a :class:`RowHook`: the layer must then run eagerly."""
    found = []
    for point in _PATTERN_POINTS:
        hp = getattr(attn, point)
        handles = list(hp.fwd_hooks)
        if len(handles) != len(hp._forward_hooks) or hp._forward_pre_hooks:
            return None
        for handle in handles:
            if not isinstance(handle.user_hook, RowHook):
                return None
            found.append(handle.user_hook)
    return found


# ------------------------------------------------------------------ the forward
def _forward(self, *args, **kwargs):
    """The pattern-free forward of a bridge attention component (module docstring)."""
    hooks = None if getattr(self, "_focuslens_force_eager", False) else _pattern_hooks(self)
    if hooks is None:
        return self._focuslens_eager(*args, **kwargs)
    hidden = kwargs.pop("hidden_states") if "hidden_states" in kwargs else args[0]
    position_embeddings = kwargs.pop("position_embeddings", None)
    mask = kwargs.pop("attention_mask", None)
    hidden = self.hook_in(hidden)
    q, k, v = _project(self, hidden)
    if position_embeddings is not None:
        from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

        cos, sin = self._apply_position_embedding_hooks(position_embeddings)
        if cos.shape[-1] != q.shape[-1]:
            raise ModelError(f"{self.name}: RoPE covers {cos.shape[-1]} of {q.shape[-1]} channels; "
                             "partial rotary is not supported on the pattern-free path.")
        q, k = apply_rotary_pos_emb(q, k, cos, sin)
    q, k = self.hook_rot_q(q), self.hook_rot_k(k)
    k, v = self._update_kv_cache(k, v, **kwargs)
    z = attend(self, q, k, v, mask, hooks)  # [batch, head, query, d_head]
    z = rearrange(z, "b h q d -> b q (h d)")
    o_weight = getattr(self.o.original_component, "weight", None)
    if isinstance(o_weight, Tensor) and o_weight.dtype.is_floating_point and z.dtype != o_weight.dtype:
        z = z.to(o_weight.dtype)
    return self.hook_out(self.o(z)), None


def _project(self, hidden: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """q, k, v ``[batch, head, pos, d_head]`` through the bridge's projections (``hook_q/k/v``
    fire) and post-reshape q/k norms (Gemma-3 style)."""
    head_dim = self.original_component.head_dim
    q, k, v = (rearrange(proj(hidden), "b p (h d) -> b h p d", d=head_dim) for proj in (self.q, self.k, self.v))
    if "q_norm" in self.submodules and self._qk_norm_phase == "post_reshape":
        q = self.hook_q_normed(self.q_norm(q))
        if "k_norm" in self.submodules:
            k = self.hook_k_normed(self.k_norm(k))
    return q, k, v


def _expand(kv: Tensor, n_heads: int) -> Tensor:
    """Key/value heads repeated to one per query head (grouped-query attention)."""
    return kv if kv.shape[1] == n_heads else repeat(kv, "b g t d -> b (g r) t d", r=n_heads // kv.shape[1])


def attention_rows(hooks: list, n_query: int, n_key: int) -> int:
    """The first query row (relative, ``0..n_query``) that must be computed eagerly: the
    earliest row a reading hook declares, every row in a KV-cached pass (few rows then)."""
    if n_query != n_key:
        return 0
    return max(0, min([n_query] + [h.rows_from for h in hooks if not isinstance(h, HeadEdit)]))


def attend(self, q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None, hooks: list) -> Tensor:
    """Attention output ``[batch, head, query, d_head]``: SDPA before the first observed row,
    edited heads by blocks, the observed rows eagerly with their hooks."""
    n_heads, n_query, n_key = q.shape[1], q.shape[2], k.shape[2]
    scale = float(getattr(self.original_component, "scaling", q.shape[-1] ** -0.5))
    first = attention_rows(hooks, n_query, n_key)
    for h in hooks:
        if isinstance(h, HeadEdit):
            h.check(n_query, n_key)
    if first == 0:  # every row eager (a KV-cached pass): grouped, the cache is never copied per head
        return _eager_rows(self, q, k, v, mask, scale)
    k, v = _expand(k, n_heads), _expand(v, n_heads)
    parts = []
    if first > 0:  # rows [0, first) see keys [0, first) only (causal, no cache here)
        head = mask[..., :first, :first] if mask is not None else None
        out = F.scaled_dot_product_attention(q[:, :, :first], k[:, :, :first], v[:, :, :first], attn_mask=head,
                                             is_causal=mask is None, scale=scale)
        edits = [h for h in hooks if isinstance(h, HeadEdit)]
        if len(edits) == 1 and edits[0].rows_from == 0 and edits[0].span is not None:
            out = _reweighted_heads(q, k, v, mask, out, edits[0], scale)
        elif edits:
            out = _edited_heads(self, q, k, v, mask, out, edits, scale)
        parts.append(out)
    if first < n_query:
        parts.append(_eager_rows(self, q[:, :, first:], k, v, mask, scale))
    return parts[0] if len(parts) == 1 else torch.cat(parts, dim=2)


def _grouped(x: Tensor, n_kv: int) -> Tensor:
    """``[batch, head, rows, n]`` as ``[batch, kv_head, group·rows, n]``: query head
    ``h = kv·group + g`` reads KV head ``kv`` (Hugging Face's ``repeat_kv`` layout), so one
    matmul per KV head serves its whole group without repeating the keys or values."""
    b, h, r, n = x.shape
    return x.reshape(b, n_kv, (h // n_kv) * r, n)


def _scores(self, q: Tensor, k: Tensor, mask: Tensor | None, scale: float) -> Tensor:
    """Masked scores of the last ``q.shape[2]`` query rows of a ``k.shape[2]``-key pass,
    as the bridge's eager path forms them (its own mask helper); ``k`` may hold fewer (KV)
    heads than ``q`` (grouped-query attention)."""
    b, h, r, _ = q.shape
    scores = torch.matmul(_grouped(q, k.shape[1]), k.transpose(-2, -1)).view(b, h, r, k.shape[2]) * scale
    return self._apply_reconstruct_attention_mask(attn_scores=scores, attention_mask=mask,
                                                  seq_len=k.shape[2], q_seq_len=q.shape[2])


def _softmax(self, scores: Tensor, dtype: torch.dtype) -> Tensor:
    return self._scrub_compatibility_pattern_nans(self._masked_softmax(scores, dtype=torch.float32).to(dtype))


def _eager_rows(self, q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None, scale: float) -> Tensor:
    """The last ``q.shape[2]`` rows as the eager path computes them, with ``hook_attn_scores``
    and ``hook_pattern`` firing on ``[batch, head, rows, key]``."""
    scores = self.hook_attn_scores(_scores(self, q, k, mask, scale))
    pattern = self.hook_pattern(_softmax(self, scores, q.dtype))
    b, h, r, _ = pattern.shape
    return torch.matmul(_grouped(pattern, v.shape[1]), v).view(b, h, r, v.shape[-1])


def _edited_heads(self, q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None, out: Tensor,
                  edits: list, scale: float) -> Tensor:
    """``out`` (rows ``[0, n)``) with the edited heads' rows recomputed explicitly, by blocks
    of :data:`BLOCK_ROWS` rows against every key, each edit applied to the block's pattern."""
    n = out.shape[2]
    heads = torch.stack([e.heads.to(q.device).any(0) for e in edits]).any(0).nonzero().flatten()
    start = min(e.rows_from for e in edits)
    if heads.numel() == 0 or start >= n:
        return out
    out, hs = out.clone(), heads.tolist()
    for a in range(start, n, BLOCK_ROWS):
        rows = torch.arange(a, min(a + BLOCK_ROWS, n), device=q.device)
        pattern = _softmax(self, _block_scores(q[:, hs, a : a + len(rows)], k[:, hs], rows, mask, scale), q.dtype)
        for e in edits:
            pattern = e.edit_block(pattern, rows, heads)
        out[:, hs, a : a + len(rows)] = torch.matmul(pattern, v[:, hs])
    return out


def _block_scores(q: Tensor, k: Tensor, rows: Tensor, mask: Tensor | None, scale: float) -> Tensor:
    """Scores of query ``rows`` (absolute positions, no KV cache) against every key, masked
    as the eager path masks them: causally, and by Hugging Face's mask when one is given."""
    scores = torch.matmul(q, k.transpose(-2, -1)) * scale
    low = torch.finfo(scores.dtype).min
    if mask is not None:
        mask = mask[..., rows, : k.shape[2]]
        if mask.dtype == torch.bool:
            return scores.masked_fill(~mask, low)
        return scores + mask.to(scores.dtype)
    causal = rows[:, None] >= torch.arange(k.shape[2], device=rows.device)[None]
    return scores.masked_fill(~causal, low)


def _reweighted_heads(q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None, out: Tensor, edit: HeadEdit,
                      scale: float) -> Tensor:
    """``out`` (rows ``[0, n)``) with a span-mass edit on its heads, by two SDPA calls.

    An edit that moves each row's mass π on a key span S to ``edit.target(π)`` while keeping
    the relative weights inside and outside S (split-softmax: π → π^τ) is a per-row bias
    ``β = log(t/π) − log((1−t)/(1−π))`` on the span's keys. So: (1) π = SDPA with the span's
    indicator as the values; (2) SDPA with one more channel, ``β/scale`` on the query and the
    indicator on the keys, so the scores become ``s_ij + β_i·1_S(j)``. Head dimensions stay
    equal (padded to a multiple of 8), so the fused kernels run, with no pattern.
    """
    n, d = out.shape[2], q.shape[-1]
    heads = edit.heads.to(q.device).any(0).nonzero().flatten()
    if heads.numel() == 0:
        return out
    b, hs = q.shape[0], heads.tolist()
    qh, kh, vh = q[:, hs, :n], k[:, hs, :n], v[:, hs, :n]
    span = edit.span(k.shape[2], b).to(q.device)
    span = (span[None] if span.ndim == 1 else span)[:, :n]  # [batch or 1, key]
    indicator = span[:, None, :, None].to(q.dtype).expand(b, len(hs), n, 1)
    attn_mask = mask[..., :n, :n] if mask is not None else None

    def sdpa(a: Tensor, c: Tensor, e: Tensor) -> Tensor:
        return F.scaled_dot_product_attention(a, c, e, attn_mask=attn_mask, is_causal=mask is None, scale=scale)

    pi = sdpa(qh, kh, indicator.expand(-1, -1, -1, d).contiguous())[..., 0].float()  # [batch, head, row]
    target = edit.target(pi, torch.arange(n, device=q.device), heads).float()
    inside = (pi > 0) & (pi < 1)
    pi_, t_ = pi.clamp(1e-30, 1 - 1e-7), target.clamp(1e-30, 1 - 1e-7)
    beta = torch.where(inside, (t_.log() - pi_.log()) - (torch.log1p(-t_) - torch.log1p(-pi_)), 0.0).clamp(-60, 60)
    pad = -(-(d + 1) // 8) * 8 - d - 1  # zero channels up to a multiple of 8
    zeros = qh.new_zeros(b, len(hs), n, pad)
    q2 = torch.cat([qh, (beta / scale).to(q.dtype)[..., None], zeros], -1)
    k2 = torch.cat([kh, indicator, zeros], -1)
    v2 = torch.cat([vh, qh.new_zeros(b, len(hs), n, 1 + pad)], -1)
    out = out.clone()
    out[:, hs] = sdpa(q2, k2, v2)[..., :d]
    return out
