"""Metrics and evaluation loops.

Two ways to score a multi-document QA prompt:

* **One forward pass** (:func:`evaluate_next_token`): the prompt ends where the answer
  starts (the answer prefix, e.g. ``"Varnex Motors is based in"``, then any whitespace-only
  tokens the answer starts with: :func:`~focuslens.data.render.answer_lead`), so the
  next-token logits decide. ``correct`` = the gold answer's first visible token is the
  top-1 token over the vocabulary; ``candidate_correct`` = it beats the tokens the other
  documents' answers (the example's ``candidates`` that appear in the prompt) need at that
  position (NaN when there is none to beat).
* **Greedy generation** (:func:`evaluate_generation`) scored with Lost-in-the-Middle's
  ``best_subspan_em``: 1 if any SQuAD-normalised gold answer is a substring of the
  normalised prediction.

Both return one row per example (a pandas DataFrame) so results can be grouped by
number of documents or gold position.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Iterable, Sequence

import numpy as np
import pandas as pd
import torch
from torch import Tensor

from focuslens.data.examples import QAExample, normalize_answer
from focuslens.data.render import Prompt, candidate_token_ids, first_token_id, render, scored_tokens
from focuslens.errors import DataError
from focuslens.model.hooks import attn_hook, key_indicator, mass_on
from focuslens.model.parallel import cat, gather, is_main, share
from focuslens.model.prefix import PrefixCache
from focuslens.progress import tqdm

__all__ = [
    "normalize_answer",
    "best_subspan_em",
    "spearman",
    "first_token_id",
    "candidate_token_ids",
    "scored_tokens",
    "warn_unscorable",
    "next_token_logits",
    "evaluate_next_token",
    "evaluate_generation",
    "evaluate_variants",
    "greedy_generate",
    "position_label",
    "accuracy_by",
    "check_context",
    "to_prompts",
]


# ------------------------------------------------------------------ metrics
def best_subspan_em(prediction: str, answers: Iterable[str]) -> float:
    """1.0 if any normalised answer is a substring of the normalised prediction."""
    pred = normalize_answer(prediction)
    return float(any(normalize_answer(a) in pred for a in answers))


def wilson_interval(accuracy: float, n: int, z: float = 1.96) -> tuple[float, float]:
    """The Wilson score interval (95 % by default) of an accuracy measured on ``n`` prompts;
    unlike ``p ± z·se`` it stays inside [0, 1] and is not empty at p = 0 or 1.

    >>> [round(x, 3) for x in wilson_interval(0.5, 40)]
    [0.352, 0.648]
    """
    if n <= 0:
        return float("nan"), float("nan")
    centre = (accuracy + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(accuracy * (1 - accuracy) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return max(0.0, centre - half), min(1.0, centre + half)


def spearman(x, y) -> float:
    """Spearman rank correlation over the pairs where both values are finite (ties get
    their average rank); NaN for fewer than two pairs or a constant input.

    >>> spearman([1, 2, 3, 4], [10, 20, 30, 35]), spearman([1, 2, 3], [3, 2, 1])
    (1.0, -1.0)
    """
    x, y = (pd.Series(v.detach().cpu().double().flatten().numpy() if isinstance(v, torch.Tensor)
                      else np.asarray(v, dtype=float).ravel()) for v in (x, y))
    if len(x) != len(y):
        raise DataError(f"spearman: x has {len(x)} values, y has {len(y)}.")
    keep = x.notna() & y.notna() & (x.abs() != float("inf")) & (y.abs() != float("inf"))
    rx, ry = x[keep].rank(), y[keep].rank()
    if len(rx) < 2 or rx.std() == 0 or ry.std() == 0:
        return float("nan")
    return float(round(rx.corr(ry), 12))


def warn_unscorable(tokenizer, examples: Sequence[QAExample]) -> None:
    """Warn (once per call, a ``UserWarning``) about examples that one forward pass cannot
    score as intended: without an ``answer_prefix`` the only answer row is the newline after
    the assistant header; a candidate sharing the gold's scored token (``"1987"`` and
    ``"1992"`` both start with '1') is indistinguishable from it for top-1 and candidate
    accuracy."""
    bare = [ex.qid or ex.question for ex in examples if not ex.answer_prefix]
    if bare:
        warnings.warn(f"{len(bare)} of {len(examples)} examples have no answer_prefix (e.g. {bare[0]!r}): the "
                      "only answer row is the newline after the assistant header, and the score is the "
                      "model's first response token. Set QAExample.answer_prefix (e.g. \"The answer is\") so "
                      "that the next token is the answer.", UserWarning, stacklevel=3)
    shared = []
    for ex in examples:
        gold, rivals = scored_tokens(tokenizer, ex)
        golds = {normalize_answer(a) for a in ex.answers}
        shared += [f"{ex.answers[0]!r} and {c!r} ({tokenizer.decode([gold])!r})" for c, t in rivals.items()
                   if t == gold and normalize_answer(c) not in golds]
    if shared:
        warnings.warn(f"{len(shared)} gold answer / candidate pairs share the scored first token: "
                      f"{'; '.join(shared[:5])}{' …' if len(shared) > 5 else ''}. Top-1 and candidate accuracy "
                      "cannot tell them apart (such candidates are left out of candidate_correct and margin).",
                      UserWarning, stacklevel=3)


def position_label(gold_index: int | None, n_documents: int) -> str:
    """'first', 'middle', 'last' or 'other' (Lost-in-the-Middle's positional buckets)."""
    if gold_index is None:
        return "none"
    if gold_index == 0:
        return "first"
    if gold_index == n_documents - 1:
        return "last"
    return "middle" if gold_index == (n_documents - 1) // 2 else "other"


# ------------------------------------------------------------------ forward passes
def _batches(prompts: Sequence[Prompt], batch_size: int) -> Iterable[list[int]]:
    order = sorted(range(len(prompts)), key=lambda i: prompts[i].n_tokens)
    for i in range(0, len(order), batch_size):
        yield order[i : i + batch_size]


@torch.no_grad()
def next_token_logits(
    model,
    prompts: Sequence[Prompt],
    *,
    batch_size: int | None = None,
    hooks: Sequence[tuple[str, Callable]] | Callable[[list[int]], Sequence] = (),
    quiet: bool = False,
    desc: str = "forward",
) -> torch.Tensor:
    """Logits [n_prompts, d_vocab] at each prompt's last position.

    Prompts are right-padded into length-sorted batches; causal attention means real
    tokens never see the padding, and only the last real position is unembedded.
    ``hooks`` are extra ``(hook_name, fn)`` pairs active during the forward passes, or a
    callable that gets the prompt indices of each batch (in batch-row order) and returns
    such pairs, for hooks that need per-prompt spans.
    ``batch_size`` defaults to 1 on CPU (batching buys nothing there) and 16 on GPU.
    """
    if batch_size is None:
        batch_size = 1 if str(model.cfg.device).startswith("cpu") else 16
    pad = model.tokenizer.pad_token_id or 0
    out = torch.empty(len(prompts), model.cfg.d_vocab, dtype=torch.float32)
    bar = tqdm(total=len(prompts), desc=desc, disable=quiet, leave=False)
    if batch_size == 1 and not hooks:
        _shared_prefix_logits(model, prompts, out, bar)
        bar.close()
        return out
    for idx in _batches(prompts, batch_size):
        lengths = torch.tensor([prompts[i].n_tokens for i in idx])
        tokens = torch.full((len(idx), int(lengths.max())), pad, dtype=torch.long)
        for row, i in enumerate(idx):
            tokens[row, : lengths[row]] = prompts[i].input_ids
        last = lengths - 1

        def only_last(resid, hook, last=last):
            return resid[torch.arange(resid.shape[0]), last.to(resid.device)][:, None]

        extra = hooks(idx) if callable(hooks) else hooks
        logits = model.run_with_hooks(
            tokens.to(model.cfg.device), fwd_hooks=[*extra, ("unembed.hook_in", only_last)]
        )
        out[idx] = logits[:, -1].float().cpu()
        bar.update(len(idx))
    bar.close()
    return out


def _shared_prefix_logits(model, prompts: Sequence[Prompt], out: torch.Tensor, bar, min_shared: int = 16) -> None:
    """One prompt at a time in lexicographic token order, each reusing the KV cache of the
    longest prefix it shares with the previous one (the system prompt and instruction
    always; e.g. the documents before the gold one when the same example is evaluated with
    the gold at several positions). Exact up to float rounding; used without extra hooks."""
    order = sorted(range(len(prompts)), key=lambda i: prompts[i].input_ids.tolist())
    prev, cache = None, None
    last_only = [("unembed.hook_in", lambda resid, hook: resid[:, -1:])]
    for i in order:
        ids = prompts[i].input_ids
        shared = 0
        if prev is not None:
            n = min(len(prev), len(ids) - 1)
            diff = (prev[:n] != ids[:n]).nonzero()
            shared = int(diff[0]) if len(diff) else n
        if shared >= min_shared:
            extra = cache.get_seq_length() - shared
            if extra > 0:
                cache.crop(-extra)  # negative: drop that many tokens (valid in every transformers 5.x)
        else:
            shared, cache = 0, None
        logits, cache = model.run_with_hooks(
            ids[None, shared:].to(model.cfg.device), past_key_values=cache,
            return_type="logits_and_cache", fwd_hooks=last_only,
        )
        out[i] = logits[0, -1].float().cpu()
        prev = ids
        bar.update(1)


def check_context(model, items: Sequence) -> None:
    """Every pre-rendered :class:`Prompt` in ``items`` must fit the model's context: a
    longer one would run past ``n_ctx`` (examples are refused when rendered, with
    ``max_length``). The one check of every entry point that accepts Prompts."""
    n_ctx = model.cfg.n_ctx
    for i, item in enumerate(items):
        if isinstance(item, Prompt) and item.n_tokens > n_ctx:
            raise DataError(f"examples[{i}]: the prompt has {item.n_tokens} tokens, more than the model's context "
                            f"of n_ctx={n_ctx}; use fewer or shorter documents.")


def to_prompts(model, items: Sequence[QAExample | Prompt]) -> list[Prompt]:
    """Rendered prompts of ``items``: examples rendered for ``model`` (refused past its
    context, ``max_length=n_ctx``), pre-rendered prompts checked to fit it."""
    if not items:
        raise DataError("the example list is empty: nothing to evaluate.")
    check_context(model, items)
    return [item if isinstance(item, Prompt) else render(item, model.tokenizer, max_length=model.cfg.n_ctx)
            for item in items]


def check_finite(logits: Tensor, i: int) -> None:
    """Refuse NaN/inf logits of example ``i`` (``[vocab]`` or ``[variant, vocab]``): they
    are a broken model or intervention, never a wrong answer."""
    broken = ~torch.isfinite(logits)
    if bool(broken.any()):
        where = f" (variants {broken.any(-1).nonzero().flatten().tolist()[:5]})" if logits.dim() > 1 else ""
        raise DataError(f"examples[{i}]: the logits are not finite{where}; check the model's weights and "
                        "the intervention's settings (alpha, tau, directions).")


def shared_logits(model, prompts: Sequence[Prompt], *, hooks=(), **kwargs) -> torch.Tensor:
    """:func:`next_token_logits` with the prompts shared over processes
    (:mod:`focuslens.model.parallel`; one process: the same call), the whole result on each."""
    mine = share(len(prompts))
    if len(mine) == len(prompts):
        return next_token_logits(model, prompts, hooks=hooks, **kwargs)
    kwargs["quiet"] = kwargs.get("quiet", False) or not is_main()  # one progress bar, rank 0's
    local = (lambda batch: hooks([mine[i] for i in batch])) if callable(hooks) else hooks
    return cat(next_token_logits(model, [prompts[i] for i in mine], hooks=local, **kwargs), len(prompts))


def evaluate_next_token(
    model,
    examples: Sequence[QAExample | Prompt],
    *,
    batch_size: int | None = None,
    hooks: Sequence[tuple[str, Callable]] = (),
    quiet: bool = False,
    desc: str = "evaluate",
) -> pd.DataFrame:
    """Score every example from one forward pass; one row per example.

    Columns: ``correct`` (gold first visible token is top-1 over the vocabulary),
    ``candidate_correct`` (1.0 / 0.0: gold beats the in-prompt candidates; NaN without
    any), ``gold_logit``, ``margin`` (gold logit minus the best other candidate; NaN without
    any), ``prediction`` (top-1 token), ``n_documents``, ``gold_index``, ``position``, ``qid``.
    Warns about examples it cannot score as intended (:func:`warn_unscorable`).
    """
    tok = model.tokenizer
    prompts = to_prompts(model, examples)
    examples = [p.example for p in prompts]
    warn_unscorable(tok, examples)
    logits = shared_logits(model, prompts, batch_size=batch_size, hooks=hooks, quiet=quiet, desc=desc)
    rows = []
    for i, (ex, lg) in enumerate(zip(examples, logits)):
        check_finite(lg, i)
        gold, others = candidate_token_ids(tok, ex)
        best_other = lg[others].max().item() if others else math.nan
        top = int(lg.argmax())
        rows.append({**example_columns(ex), "correct": top == gold,
                     "candidate_correct": float(lg[gold].item() > best_other) if others else math.nan,
                     "gold_logit": lg[gold].item(), "margin": lg[gold].item() - best_other,
                     "prediction": tok.decode([top])})
    return pd.DataFrame(rows)


def example_columns(ex: QAExample) -> dict:
    """The columns that say which example a result row is about."""
    return {"qid": ex.qid, "n_documents": ex.n_documents, "gold_index": ex.gold_index,
            "position": position_label(ex.gold_index, ex.n_documents)}


@torch.no_grad()
def greedy_generate(
    model, prompt: Prompt, *, max_new_tokens: int = 32, use_past_kv_cache: bool = True
) -> str:
    """Greedy continuation of a rendered prompt (stops at EOS), decoded without specials."""
    out = model.generate(
        prompt.input_ids[None].to(model.cfg.device),
        max_new_tokens=max_new_tokens,
        do_sample=False,
        stop_at_eos=True,
        use_past_kv_cache=use_past_kv_cache,
        return_type="tokens",
        verbose=False,
    )
    new = out[0, prompt.n_tokens :]
    return model.tokenizer.decode(new, skip_special_tokens=True)


def evaluate_generation(
    model,
    examples: Sequence[QAExample],
    *,
    max_new_tokens: int = 32,
    quiet: bool = False,
) -> pd.DataFrame:
    """Greedy answers scored with ``best_subspan_em``; one row per example."""
    rows = []
    for ex, prompt in tqdm(
        [(p.example, p) for p in to_prompts(model, examples)], desc="generate", disable=quiet, leave=False
    ):
        answer = greedy_generate(model, prompt, max_new_tokens=max_new_tokens)
        rows.append({**example_columns(ex), "prediction": answer,
                     "correct": bool(best_subspan_em((ex.answer_prefix or "") + answer, ex.answers))})
    return pd.DataFrame(rows)


# ------------------------------------------------------------------ interventions
def probe_hooks(prompt: Prompt, offset: int, probe_heads: Tensor, store: dict) -> list:
    """``hook_pattern`` reductions: per variant, the mean attention mass of its probe heads
    at the answer rows on the gold document and on the sink (summed over layers into
    ``store``). ``offset``: the absolute position of the first query row the hooks see."""
    rows = slice(prompt.answer.start - offset, prompt.answer.end - offset)
    spans = {name: span for name, span in (("gold_mass", prompt.gold), ("sink_mass", prompt.sink)) if span is not None}
    columns = [[span] for span in spans.values()]
    indicator = key_indicator(prompt.n_tokens, columns)
    hooks = []
    for layer in probe_heads.any(0).any(-1).nonzero().flatten().tolist():
        heads = probe_heads[:, layer].float()  # [variant, head]

        def reduce(pattern, hook, heads=heads):
            keys = indicator if pattern.shape[-1] == len(indicator) else key_indicator(pattern.shape[-1], columns)
            mass = mass_on(pattern[:, :, rows].float(), keys)  # [variant, head, span]
            for col, name in enumerate(spans):
                store[name] = store.get(name, 0) + (mass[..., col] * heads.to(mass.device)).sum(-1).cpu()

        hooks.append((attn_hook(layer, "pattern"), reduce))
    return hooks


def _variant_chunk(model) -> int:
    """Variants per batch when every position is re-run: a CPU gains little from batching
    (4 rows ≈ 0.9 × 4 single runs for a 400-token SmolLM2 prompt), a GPU a lot."""
    return 4 if str(model.cfg.device).startswith("cpu") else 32


def _run_variants(model, prompt: Prompt, n_variants: int, hooks_for, rows: str, probe_heads, store,
                  prefills=None) -> Tensor:
    """Last-position logits ``[variant, vocab]`` of every variant on one prompt."""
    if rows == "answer":  # the prompt before the answer rows is unsteered: prefill it once
        split = prompt.answer.start
        pc = prefills.get(model, prompt.input_ids, split) if prefills else PrefixCache(model, prompt.input_ids, split)
        hooks = list(hooks_for(prompt, slice(0, n_variants)))
        if probe_heads is not None:
            hooks += probe_hooks(prompt, pc.offset, probe_heads, store)
        return pc.run(hooks, batch=n_variants).float().cpu()
    if rows != "all":
        raise DataError(f"rows={rows!r}: a sweep runs rows='all' or rows='answer'.")
    last = [("unembed.hook_in", lambda resid, hook: resid[:, -1:])]

    def run(tokens, hooks, probes):
        return model.run_with_hooks(tokens, fwd_hooks=[*hooks, *probes, *last])[:, -1].float().cpu()

    return torch.cat(run_in_chunks(model, prompt, n_variants, hooks_for, probe_heads, store, run))


def run_in_chunks(model, prompt: Prompt, n_variants: int, hooks_for, probe_heads, store: dict, run) -> list:
    """The whole prompt once per variant (``rows="all"``), a few variants per batch.

    ``run(tokens, hooks, probes)`` runs one chunk (``tokens`` ``[chunk, pos]``); the probe
    masses of every chunk are concatenated into ``store``. Returns the chunks' outputs.
    """
    outs, step = [], _variant_chunk(model)
    for v0 in range(0, n_variants, step):
        v = slice(v0, min(v0 + step, n_variants))
        part: dict[str, Tensor] = {}
        probes = probe_hooks(prompt, 0, probe_heads[v], part) if probe_heads is not None else []
        tokens = prompt.input_ids[None].expand(v.stop - v.start, -1).to(model.cfg.device)
        outs.append(run(tokens, list(hooks_for(prompt, v)), probes))
        for name, value in part.items():
            store.setdefault(name, []).append(value)
    for name in list(store):
        store[name] = torch.cat(store[name])
    return outs


def _variant_rows(i: int, ex, logits: Tensor, candidates, store: dict, n_probe) -> list[dict]:
    """One result row per variant of example ``i`` (accuracy columns and probe masses)."""
    gold, others = candidates
    best_other = logits[:, others].max(-1).values if others else torch.full((len(logits),), math.nan)
    rows = []
    for v in range(len(logits)):
        row = {"example": i, **example_columns(ex), "variant": v, "correct": bool(logits[v].argmax() == gold),
               "candidate_correct": float(logits[v, gold] > best_other[v]) if others else math.nan,
               "gold_logit": float(logits[v, gold]), "margin": float(logits[v, gold] - best_other[v])}
        row.update({name: float(total[v] / n_probe[v]) for name, total in store.items()})
        rows.append(row)
    return rows


def evaluate_variants(
    model,
    examples: Sequence[QAExample | Prompt],
    n_variants: int,
    hooks_for: Callable[[Prompt, slice], Sequence[tuple[str, Callable]]],
    *,
    rows: str = "answer",
    probe_heads: Tensor | None = None,
    return_logits: bool = False,
    prefills=None,
    quiet: bool = False,
    desc: str = "variants",
):
    """Score ``n_variants`` interventions on every example, one batch row per variant.

    Args:
        hooks_for: ``(prompt, variants) -> hook specs`` for the variants ``variants`` (a
            slice of ``range(n_variants)``), one batch row each, e.g. the hooks of
            :func:`focuslens.steer.split_softmax.split_softmax_hooks` with ``masks[variants]``. The
            hooks must steer at ``rows`` (build them with the same ``rows=`` and
            ``prompt=``): the result then equals running them as a context manager.
        rows: ``"answer"``: the interventions act at the answer rows only, so one prefill
            of the prompt before them (a :class:`~focuslens.model.prefix.PrefixCache`) serves
            every variant, run packed. ``"all"``: they act at every position, so every
            variant re-runs the whole prompt (batched a few variants at a time).
        probe_heads: optional ``[variant, layer, head]`` mask; adds ``gold_mass`` and
            ``sink_mass``: the mean attention mass of those heads from the answer rows onto
            the gold document and the sink, as steered.
        return_logits: also return the last-position logits ``[example, variant, vocab]``.
        prefills: a :class:`~focuslens.model.prefix.PrefillStore` shared with other sweeps of
            the same prompts (``rows="answer"``): each prompt is prefilled once in all.

    Returns one row per (example, variant): ``example`` (its index in ``examples``),
    ``variant``, the columns of :func:`evaluate_next_token`, and the probe masses. Warns
    like :func:`evaluate_next_token`. Under a launcher each process runs its share of the
    examples and every process gets every row, in input order (:mod:`focuslens.model.parallel`).
    """
    if probe_heads is not None and probe_heads.shape[0] != n_variants:
        raise DataError(f"probe_heads has {probe_heads.shape[0]} variants, not n_variants={n_variants}.")
    tok = model.tokenizer
    prompts = to_prompts(model, examples)
    warn_unscorable(tok, [p.example for p in prompts])
    rows_out, all_logits = [], []
    n_probe = probe_heads.sum((1, 2)).clamp_min(1) if probe_heads is not None else None
    for i in tqdm(share(len(prompts)), desc=desc, disable=quiet or not is_main(), leave=False):
        ex = prompts[i].example  # under a launcher: this process's share (focuslens.model.parallel)
        store: dict = {}
        with torch.no_grad():
            logits = _run_variants(model, prompts[i], n_variants, hooks_for, rows, probe_heads, store, prefills)
        check_finite(logits, i)
        if return_logits:
            all_logits.append(logits)
        rows_out.append(_variant_rows(i, ex, logits, candidate_token_ids(tok, ex), store, n_probe))
    df = pd.DataFrame([row for rows_i in gather(rows_out) for row in rows_i])
    if not return_logits:
        return df
    block = torch.stack(all_logits) if all_logits else torch.zeros(0, n_variants, model.cfg.d_vocab)
    return df, cat(block, len(prompts))


def accuracy_by(results: pd.DataFrame, column: str, metric: str = "correct") -> dict:
    """Mean of ``metric`` grouped by ``column`` (e.g. 'n_documents' or 'position')."""
    return {k: float(v) for k, v in results.groupby(column)[metric].mean().items()}
