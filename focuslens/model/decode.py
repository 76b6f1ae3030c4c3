"""The one greedy decoder of focuslens.

:func:`greedy_tokens` continues a batch of rows with the KV cache, one batch row per
variant of an intervention, until EOS or ``max_new_tokens``; :func:`greedy_text` decodes
one prompt. Every generation in the package (evaluation, the variant sweeps) goes through
it, so steered and unsteered answers are decoded the same way.
"""

from __future__ import annotations

import torch
from torch import Tensor

from focuslens.model.hooks import last_position_only

__all__ = ["greedy_tokens", "decode_rows", "greedy_text"]


@torch.no_grad()
def greedy_tokens(model, hooks: list, tokens: Tensor, cache, max_new_tokens: int) -> Tensor:
    """Greedy continuation ``[batch, new]`` of ``tokens`` after ``cache`` (None: no prefix),
    with ``hooks`` active; rows that reach EOS are padded with EOS."""
    eos = model.tokenizer.eos_token_id
    out, done = [], torch.zeros(tokens.shape[0], dtype=torch.bool)
    last = [last_position_only()]
    with model.hooks(fwd_hooks=[*hooks, *last]):
        if cache is None:
            logits, cache = model(tokens, return_type="logits_and_cache")
        else:
            logits = model(tokens, past_key_values=cache)
        for step in range(max_new_tokens):
            nxt = logits[:, -1].argmax(-1).cpu()
            out.append(torch.where(done, torch.full_like(nxt, eos if eos is not None else 0), nxt))
            done |= nxt == eos
            if bool(done.all()) or step == max_new_tokens - 1:
                break
            logits = model(nxt[:, None].to(model.cfg.device), past_key_values=cache)
    return torch.stack(out, dim=1)


def decode_rows(model, new: Tensor) -> list[str]:
    """Each row of new tokens as text, special tokens (EOS padding) removed."""
    return [model.tokenizer.decode(row, skip_special_tokens=True) for row in new]


def greedy_text(model, input_ids: Tensor, *, max_new_tokens: int = 32, hooks=()) -> str:
    """Greedy continuation of one prompt's token ids (stops at EOS), decoded without specials."""
    new = greedy_tokens(model, list(hooks), input_ids[None].to(model.cfg.device), None, max_new_tokens)
    return decode_rows(model, new)[0]
