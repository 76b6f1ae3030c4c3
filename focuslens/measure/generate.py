"""Greedy generation of many interventions at once, for tasks scored on the answer text.

Open-domain QA (NQ) is scored by greedy decoding and ``best_subspan_em``, not by one
next-token logit. :func:`generate_variants` decodes ``n`` variants of one prompt together,
one batch row each, with the same hooks the context managers install:

* ``rows="answer"``: the prompt before its answer rows is the unsteered model's, so it is
  prefilled once (:class:`~focuslens.model.prefix.PrefixCache`) and its KV cache is repeated
  for the ``n`` rows;
* ``rows="all"``: every position is steered, so each variant prefills the whole prompt
  (a few variants per batch).

Each row then decodes greedily with the KV cache until EOS or ``max_new_tokens``. The
result equals ``greedy_generate`` under the context manager (tested).
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Sequence

import pandas as pd
import torch
from torch import Tensor

from focuslens.data.render import Prompt
from focuslens.errors import DataError
from focuslens.measure.evaluate import (
    best_subspan_em,
    example_columns,
    probe_hooks,
    run_in_chunks,
    to_prompts,
)
from focuslens.model.parallel import gather, is_main, share
from focuslens.model.prefix import PrefixCache
from focuslens.progress import tqdm

__all__ = ["generate_variants"]


def _once(hooks: list, state: dict) -> list:
    """Wrap probe hooks so they only read the first forward pass (the prompt's answer rows)."""
    return [(name, lambda x, hook, fn=fn: fn(x, hook) if state["first"] else None) for name, fn in hooks]


@torch.no_grad()
def _greedy(model, hooks: list, tokens: Tensor, cache, max_new_tokens: int, state: dict) -> Tensor:
    """Greedy continuation ``[batch, new]`` of ``tokens`` after ``cache`` (None: no prefix)."""
    eos = model.tokenizer.eos_token_id
    out, done = [], torch.zeros(tokens.shape[0], dtype=torch.bool)
    last = [("unembed.hook_in", lambda resid, hook: resid[:, -1:])]
    with model.hooks(fwd_hooks=[*hooks, *last]):
        if cache is None:
            logits, cache = model(tokens, return_type="logits_and_cache")
        else:
            logits = model(tokens, past_key_values=cache)
        state["first"] = False
        for step in range(max_new_tokens):
            nxt = logits[:, -1].argmax(-1).cpu()
            out.append(torch.where(done, torch.full_like(nxt, eos if eos is not None else 0), nxt))
            done |= nxt == eos
            if bool(done.all()) or step == max_new_tokens - 1:
                break
            logits = model(nxt[:, None].to(model.cfg.device), past_key_values=cache)
    return torch.stack(out, dim=1)


def _decode(model, new: Tensor) -> list[str]:
    return [model.tokenizer.decode(row, skip_special_tokens=True) for row in new]


def generate_variants(
    model,
    examples: Sequence,
    n_variants: int,
    hooks_for: Callable[[Prompt, slice], Sequence[tuple[str, Callable]]],
    *,
    rows: str = "answer",
    max_new_tokens: int = 16,
    probe_heads: Tensor | None = None,
    quiet: bool = False,
    desc: str = "generate variants",
) -> pd.DataFrame:
    """Greedy answers of ``n_variants`` interventions on every example, scored with
    ``best_subspan_em`` (``correct``). ``hooks_for`` and ``probe_heads`` as in
    :func:`focuslens.measure.evaluate.evaluate_variants` (the probes read the prompt's answer rows).
    One row per (example, variant) with ``prediction``."""
    if rows not in ("answer", "all"):
        raise DataError(f"rows={rows!r}: generation runs rows='all' or rows='answer'.")
    out, prompts = [], to_prompts(model, examples)
    n_probe = probe_heads.sum((1, 2)).clamp_min(1) if probe_heads is not None else None
    for i in tqdm(share(len(prompts)), desc=desc, disable=quiet or not is_main(), leave=False):
        store: dict = {}  # under a launcher: this process's share of the prompts (focuslens.model.parallel)
        texts = _prompt_variants(model, prompts[i], n_variants, hooks_for, rows, max_new_tokens, probe_heads, store)
        ex = prompts[i].example
        for v, text in enumerate(texts):
            row = {"example": i, **example_columns(ex), "variant": v, "prediction": text,
                   "correct": bool(best_subspan_em((ex.answer_prefix or "") + text, ex.answers))}
            row.update({name: float(total[v] / n_probe[v]) for name, total in store.items()})
            out.append(row)
    return pd.DataFrame(gather(out))


def _prompt_variants(model, prompt, n, hooks_for, rows, max_new_tokens, probe_heads, store) -> list[str]:
    if rows == "answer":
        pc = PrefixCache(model, prompt.input_ids, split=prompt.answer.start)
        cache = copy.deepcopy(pc.cache)
        cache.batch_repeat_interleave(n)
        state = {"first": True}
        hooks = list(hooks_for(prompt, slice(0, n)))
        if probe_heads is not None:
            hooks += _once(probe_hooks(prompt, pc.offset, probe_heads, store), state)
        return _decode(model, _greedy(model, hooks, pc.suffix[None].expand(n, -1), cache, max_new_tokens, state))

    def run(tokens, hooks, probes):
        state = {"first": True}
        return _decode(model, _greedy(model, [*hooks, *_once(probes, state)], tokens, None, max_new_tokens, state))

    return sum(run_in_chunks(model, prompt, n, hooks_for, probe_heads, store, run), [])
