"""Prefill once, continue many times: a prompt prefix's KV cache serving a whole sweep.

Interventions at the answer rows (patching a head's output there, ablating it, steering
its attention) leave every earlier position untouched, so the keys and values of the
prompt up to the answer rows are the same in every run. :class:`PrefixCache` computes
them once; each :meth:`PrefixCache.run` then only processes the few answer-row tokens,
optionally as a batch of variants (one per head, per α, …) sharing the same prefix.

Hooks active in :meth:`run` see only the suffix positions as queries (``hook_z``:
``[batch, suffix, head, d_head]``) but every position as keys (``hook_pattern``:
``[batch, head, suffix, prefix + suffix]``); ``offset`` converts between the two.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Sequence

import torch

from focuslens.errors import FocusLensError

__all__ = ["PrefixCache"]


class PrefixCache:
    """The KV cache of ``tokens[:split]`` and the suffix ``tokens[split:]`` to re-run.

    >>> pc = PrefixCache(model, prompt.input_ids, split=prompt.answer.start)  # doctest: +SKIP
    >>> logits = pc.run(hooks=[("blocks.3.attn.hook_z", patch)], batch=9)   # doctest: +SKIP
    """

    @torch.no_grad()
    def __init__(self, model, tokens: torch.Tensor, split: int):
        tokens = tokens.reshape(-1)
        if not 0 < split < tokens.shape[0]:
            raise FocusLensError(f"split={split} must leave a non-empty prefix and suffix of {tokens.shape[0]} tokens.")
        self.model = model
        self.offset = split
        device = model.cfg.device
        # the prefix's logits are never used: unembed one position, not all of them
        with model.hooks(fwd_hooks=[("unembed.hook_in", lambda resid, hook: resid[:, -1:])]):
            _, self.cache = model(tokens[None, :split].to(device), return_type="logits_and_cache")
        self.suffix = tokens[split:].to(device)

    def run(
        self,
        hooks: Sequence[tuple[str, Callable]] = (),
        *,
        batch: int = 1,
        last_only: bool = True,
        grad: bool = False,
    ) -> torch.Tensor:
        """Logits of the suffix ``[batch, suffix_len, d_vocab]`` (or ``[batch, d_vocab]``
        at the last position when ``last_only``), with ``hooks`` active."""
        cache = copy.deepcopy(self.cache)
        if batch > 1:
            cache.batch_repeat_interleave(batch)
        with torch.set_grad_enabled(grad):
            logits = self.model.run_with_hooks(
                self.suffix[None].expand(batch, -1), past_key_values=cache, fwd_hooks=list(hooks)
            )
        return logits[:, -1] if last_only else logits
