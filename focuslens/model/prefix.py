"""Prefill once, continue many times: a prompt prefix's KV cache serving a whole sweep.

Interventions at the answer rows (patching a head's output there, ablating it, steering
its attention) leave every earlier position untouched, so the keys and values of the
prompt up to the answer rows are the same in every run. :class:`PrefixCache` computes
them once; each :meth:`PrefixCache.run` then only processes the few answer-row tokens,
optionally as a batch of variants (one per head, per α, …) sharing the same prefix.

Hooks active in :meth:`run` see only the suffix positions as queries (``hook_z``:
``[batch, suffix, head, d_head]``) but every position as keys (``hook_pattern``:
``[batch, head, suffix, prefix + suffix]``); ``offset`` converts between the two.

**Packed variants.** A batch of ``n`` variants would copy the prefix's keys and values
``n`` times (and expand them again for grouped-query attention): on a CPU that memory
traffic, not arithmetic, is the cost. Instead the ``n`` copies of the suffix are laid end
to end in *one* sequence, every copy gets the same position ids, and a block-diagonal
attention mask lets each copy see the prefix and itself only. Hooks still see the usual
batch layout: activations are reshaped to ``[n, suffix, …]`` (attention patterns to
``[n, head, suffix, prefix + suffix]``) before a hook runs and written back after it, so a
hook cannot tell the two paths apart (``tests/test_kvcache.py`` checks they agree).
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Sequence
from types import MethodType

import torch

from focuslens.errors import FocusLensError
from focuslens.model.hooks import last_position_only

__all__ = ["PrefixCache", "PrefillStore", "full_cache", "keep_every_position"]

_ATTENTION_HOOKS = ("hook_attn_scores", "hook_pattern")  # [batch, head, query, key]


def full_cache():
    """An empty KV cache that keeps every position's keys and values in every layer."""
    from transformers import DynamicCache

    return DynamicCache()


def keep_every_position(model) -> bool:
    """Make every KV cache the model builds keep every position (:func:`full_cache`);
    True when the model has sliding-window layers (Gemma 3), which needed it.

    Hugging Face's default cache for such a model keeps only the last ``window`` positions
    of its sliding layers, so in a later pass key ``j`` is no longer position ``j``.
    focuslens names keys by their position everywhere (spans, the answer rows
    ``T_key − T_query + i``, split-softmax masks), in its own passes and in a user's
    ``model(tokens, return_type="logits_and_cache")`` alike, so
    :func:`~focuslens.model.load.load_model` gives the model's decoder a forward that
    passes a full cache wherever it would have made its own. The window still applies
    through the mask (built from positions), and the logits are the same
    (``tests/test_attention.py``). Memory: the sliding layers' keys and values of the whole
    sequence, as the prefill held anyway."""
    decoder = getattr(getattr(model, "original_model", None), "model", None)
    types = getattr(getattr(decoder, "config", None), "layer_types", None) or []
    if all(t == "full_attention" for t in types):
        return False
    if "_focuslens_forward" not in vars(decoder):
        decoder._focuslens_forward = decoder.forward

        def forward(self, *args, past_key_values=None, use_cache=None, **kwargs):
            if past_key_values is None and (self.config.use_cache if use_cache is None else use_cache):
                past_key_values = full_cache()
            return self._focuslens_forward(*args, past_key_values=past_key_values, use_cache=use_cache, **kwargs)

        object.__setattr__(decoder, "forward", MethodType(forward, decoder))
    return True


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
        with model.hooks(fwd_hooks=[last_position_only()]):
            _, self.cache = model(tokens[None, :split].to(device), return_type="logits_and_cache")
        self.suffix = tokens[split:].to(device)

    def with_suffix(self, suffix: torch.Tensor) -> PrefixCache:
        """This prefix's cache (shared, never modified: :meth:`run` copies it) continued by
        ``suffix`` instead."""
        suffix = suffix.reshape(-1).to(self.suffix.device)
        if suffix.shape == self.suffix.shape and bool((suffix == self.suffix).all()):
            return self
        if suffix.numel() == 0:
            raise FocusLensError("with_suffix: the suffix is empty.")
        other = copy.copy(self)
        other.suffix = suffix
        return other

    def run(
        self,
        hooks: Sequence[tuple[str, Callable]] = (),
        *,
        batch: int = 1,
        last_only: bool = True,
        grad: bool = False,
        packed: bool | None = None,
    ) -> torch.Tensor:
        """Logits of the suffix ``[batch, suffix_len, d_vocab]`` (or ``[batch, d_vocab]``
        at the last position when ``last_only``), with ``hooks`` active.

        ``packed`` (default: whenever ``batch > 1`` and the model has no sliding window)
        runs the variants as one packed sequence (module docstring); ``False`` forces a
        real batch, which gives the same numbers up to float rounding.
        """
        if packed is None:
            packed = batch > 1 and self._can_pack(batch)
        cache = copy.deepcopy(self.cache)
        with torch.set_grad_enabled(grad):
            if packed:
                return self._run_packed(hooks, batch, last_only, cache)
            if batch > 1:
                cache.batch_repeat_interleave(batch)
            last = [last_position_only()] if last_only else []  # a 262k vocabulary: unembed what is returned
            logits = self.model.run_with_hooks(
                self.suffix[None].expand(batch, -1), past_key_values=cache, fwd_hooks=[*hooks, *last]
            )
        return logits[:, -1] if last_only else logits

    # ---------------------------------------------------------------- packing
    def _can_pack(self, batch: int) -> bool:
        window = getattr(getattr(self.model, "original_model", None), "config", None)
        window = getattr(window, "sliding_window", None)
        return window is None or window >= self.offset + batch * len(self.suffix)

    def _run_packed(self, hooks, n: int, last_only: bool, cache) -> torch.Tensor:
        model, s, T = self.model, len(self.suffix), self.offset
        device, dtype = self.suffix.device, model.cfg.dtype
        block = torch.arange(n, device=device).repeat_interleave(s)
        step = torch.arange(s, device=device).repeat(n)
        sees = (block[:, None] == block[None, :]) & (step[:, None] >= step[None, :])
        sees = torch.cat([torch.ones(n * s, T, dtype=torch.bool, device=device), sees], dim=1)
        mask = torch.zeros(sees.shape, dtype=dtype, device=device).masked_fill(~sees, torch.finfo(dtype).min)
        rows = (torch.arange(n, device=device) * s + s - 1) if last_only else slice(None)
        wrapped = [(name, self._unpacking(name, fn, n, s, T)) for name, fn in hooks]
        wrapped.append(("unembed.hook_in", lambda resid, hook: resid[:, rows]))
        logits = model.run_with_hooks(
            self.suffix.repeat(n)[None], past_key_values=cache, position_ids=(T + step)[None],
            attention_mask=mask[None, None], fwd_hooks=wrapped,
        )
        return logits[0] if last_only else logits[0].reshape(n, s, -1)

    @staticmethod
    def _unpacking(name: str, fn: Callable, n: int, s: int, T: int) -> Callable:
        """Wrap a hook so it sees (and returns) the batch layout of ``n`` variants."""
        attention = name.rsplit(".", 1)[-1] in _ATTENTION_HOOKS

        def hook(x, hook):
            if attention:  # [1, H, n*s, T + n*s] -> [n, H, s, T + s]
                H = x.shape[1]
                prefix = x[0, :, :, :T].reshape(H, n, s, T).transpose(0, 1)
                own = torch.diagonal(x[0, :, :, T:].view(H, n, s, n, s), dim1=1, dim2=3).permute(3, 0, 1, 2)
                out = fn(torch.cat([prefix, own], dim=-1), hook=hook)
                if out is None:
                    return None
                x = x.clone()
                x[0, :, :, :T] = out[..., :T].transpose(0, 1).reshape(H, n * s, T)
                torch.diagonal(x[0, :, :, T:].view(H, n, s, n, s), dim1=1, dim2=3).copy_(out[..., T:].permute(1, 2, 3, 0))
                return x
            # [1, n*s, ...] -> [n, s, ...]
            out = fn(x.reshape(n, s, *x.shape[2:]), hook=hook)
            return None if out is None else out.reshape(x.shape)

        return hook


class PrefillStore:
    """Prefix caches kept across sweeps, so one prefill of a prompt serves all of them.

    Every answer-row sweep (:func:`~focuslens.steer.focus.focus_sweep`,
    :func:`~focuslens.steer.split_softmax.split_softmax_sweep`, given ``prefills=store``) asks the
    store for the prompt's :class:`PrefixCache`; the first ask computes it, later asks reuse
    it. ``prefills`` counts the forward passes per prompt (the demo prints it: goal 1).
    The caches stay in memory until :meth:`clear` (for SmolLM2 ≈ 46 kB per prompt token in
    fp32: 200 prompts of 400 tokens ≈ 3.7 GB).

    >>> store = PrefillStore()                                                    # doctest: +SKIP
    >>> split_softmax_sweep(model, test, ranking, rows="answer", prefills=store)  # doctest: +SKIP
    >>> focus_sweep(model, dirs, test, rows="answer", prefills=store)             # doctest: +SKIP
    >>> store.per_prompt()                                                        # doctest: +SKIP
    1.0
    """

    def __init__(self):
        self._caches: dict[tuple, PrefixCache] = {}
        self.prefills: dict[tuple, int] = {}
        self.uses = 0

    def get(self, model, tokens: torch.Tensor, split: int) -> PrefixCache:
        """The cache of ``tokens[:split]`` for ``model`` (computed on the first ask), with
        ``tokens[split:]`` as its suffix: runs that share the prefix but continue it
        differently (the prompt's answer rows; the same rows and a teacher-forced answer)
        share one prefill."""
        tokens = tokens.reshape(-1)
        key = (id(model), split, tuple(tokens[:split].tolist()))
        self.uses += 1
        if key not in self._caches:
            self._caches[key] = PrefixCache(model, tokens, split)
            self.prefills[key] = self.prefills.get(key, 0) + 1
        return self._caches[key].with_suffix(tokens[split:])

    def per_prompt(self) -> float:
        """Prefills per distinct prompt seen (1.0 when every prompt was prefilled once)."""
        return sum(self.prefills.values()) / max(len(self.prefills), 1)

    def clear(self) -> None:
        """Free the caches (the counts stay)."""
        self._caches.clear()
