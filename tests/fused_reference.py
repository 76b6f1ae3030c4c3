"""Span mass and split-softmax without an attention pattern: the building blocks of a
long-context or serving-engine implementation (docs/scaling.md).

The bridge computes attention eagerly and hands every hook a ``[batch, head, query, key]``
pattern: H·T² numbers per layer, 8.6 GB per layer for a 32-head model at 32k tokens in
bf16. Fused kernels (FlashAttention, SDPA, vLLM's paged attention) never form it, but they
can return — or be asked for — the row log-sum-exp, and they accept masks. That is enough:

* **Span mass from log-sum-exp.** With scores ``s_ij = q_i·k_j·scale`` (causal),
  ``π_i(S) = Σ_{j∈S} softmax(s_i)_j = exp(LSE_{j∈S} s_ij − LSE_j s_ij)``.
* **Split-softmax as two masked attention calls.** Split-softmax rescales a row's weights
  inside the span by ``π^τ/π`` and outside by ``(1−π^τ)/(1−π)``; the head's output is
  linear in the weights, so it is a mix of two attention calls that each see one side::

      O_i = π_i^τ · Attn(q_i, K_S, V_S) + (1 − π_i^τ) · Attn(q_i, K_¬S, V_¬S)

  (rows with π ∈ {0, 1} are plain attention, as in
  :func:`focuslens.steer.split_softmax.split_softmax_pattern`).

These functions take post-RoPE ``q [batch, head, query, d]``, ``k``/``v [batch, kv_head,
key, d]`` (grouped-query heads are repeated here) and run on patterns-free SDPA; the tests
check them against the bridge's ``hook_pattern``/``hook_z`` under the split-softmax hooks.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from jaxtyping import Bool, Float
from torch import Tensor

__all__ = ["span_mass_lse", "split_softmax_attention"]


def _expand(k: Tensor, n_heads: int) -> Tensor:
    return k.repeat_interleave(n_heads // k.shape[1], dim=1)


def _masks(n_query: int, n_key: int, span: Tensor) -> tuple[Tensor, Tensor]:
    """``[batch, 1, query, key]`` causal masks restricted to the span and to its complement
    (the queries are the last ``n_query`` positions)."""
    pos = torch.arange(n_key - n_query, n_key)[:, None]
    causal = (torch.arange(n_key)[None, :] <= pos)[None, None]
    inside = span[:, None, None, :].bool()
    return causal & inside, causal & ~inside


def span_mass_lse(
    q: Float[Tensor, "batch head query d"],
    k: Float[Tensor, "batch kv_head key d"],
    span: Bool[Tensor, "batch key"],
    scale: float,
) -> Float[Tensor, "batch head query"]:
    """Each row's causal attention mass on ``span`` from two log-sum-exps (float32). This
    reference forms the scores to take the LSEs; a fused kernel returns them blockwise."""
    s = torch.einsum("bhqd,bhkd->bhqk", q.float(), _expand(k, q.shape[1]).float()) * scale
    on, off = _masks(q.shape[2], k.shape[2], span)
    lse = lambda m: torch.logsumexp(s.masked_fill(~m, float("-inf")), dim=-1)  # noqa: E731
    return torch.exp(lse(on) - torch.logaddexp(lse(on), lse(off)))


def split_softmax_attention(
    q: Float[Tensor, "batch head query d"],
    k: Float[Tensor, "batch kv_head key d"],
    v: Float[Tensor, "batch kv_head key d"],
    span: Bool[Tensor, "batch key"],
    tau: float | Float[Tensor, "head"],
    scale: float,
) -> Float[Tensor, "batch head query d"]:
    """The heads' outputs under split-softmax (span mass π → π^τ), from two masked SDPA
    calls and the span mass, never forming the steered pattern (module docstring)."""
    pi = span_mass_lse(q, k, span, scale)[..., None]  # [b, h, q, 1]
    H = q.shape[1]
    q, k, v = q.float(), _expand(k, H).float(), _expand(v, H).float()
    on, off = _masks(q.shape[2], k.shape[2], span)
    o_in = F.scaled_dot_product_attention(q, k, v, attn_mask=on, scale=scale)
    o_out = F.scaled_dot_product_attention(q, k, v, attn_mask=off, scale=scale)
    tau = torch.as_tensor(tau, dtype=torch.float32).reshape(-1, 1, 1)  # per head (or one)
    target = pi.clamp_min(0) ** tau
    mixed = target * torch.nan_to_num(o_in) + (1 - target) * torch.nan_to_num(o_out)
    plain = F.scaled_dot_product_attention(q, k, v, attn_mask=on | off, scale=scale)
    ok = (pi > 0) & (pi < 1)
    return torch.where(ok, mixed, plain)
