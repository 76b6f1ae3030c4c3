"""Evaluation: accuracy of the model, with or without an intervention, on many prompts.

Two ways to score a multi-document QA prompt:

* **One forward pass** (:func:`evaluate_next_token`): the prompt ends where the answer
  starts (the answer prefix, e.g. ``"Varnex Motors is based in"``, then any whitespace-only
  tokens the answer starts with: :func:`~focuslens.data.render.answer_lead`), so the
  next-token logits decide, scored by the one row scorer
  (:func:`~focuslens.measure.forward.score_rows`).
* **Greedy generation** (:func:`evaluate_generation`) with the one decoder
  (:mod:`focuslens.model.decode`), scored with Lost-in-the-Middle's ``best_subspan_em``.

Both take ``intervention=`` (any :class:`~focuslens.model.intervention.Intervention`), so
"accuracy under this intervention" is one call. Under both runs **one variant engine**
(:func:`evaluate_variants`, :func:`generate_variants`): an intervention holding V variants
runs as V batch rows of one prompt, with one prefill of the unsteered prompt prefix shared
by all of them when the intervention acts at ``rows="answer"`` only. Every sweep of
focuslens is a thin grid over this engine. Results are one row per example (and variant),
a pandas DataFrame with the same columns everywhere.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Sequence

import pandas as pd
import torch
from torch import Tensor

from focuslens.data.examples import QAExample
from focuslens.data.render import Prompt, candidate_token_ids
from focuslens.errors import DataError
from focuslens.measure.forward import (
    Probe,
    answer_logprob,
    best_subspan_em,
    check_finite,
    example_columns,
    score_rows,
    shared_logits,
    teacher_forced_ids,
    to_prompts,
    warn_unscorable,
)
from focuslens.model.decode import decode_rows, greedy_text, greedy_tokens
from focuslens.model.hooks import last_position_only
from focuslens.model.parallel import cat, gather, is_main, share
from focuslens.model.prefix import PrefixCache
from focuslens.progress import tqdm

__all__ = ["evaluate_next_token", "evaluate_generation", "reference_accuracies", "greedy_generate", "evaluate_variants",
           "generate_variants", "gold_logprob_variants"]


def evaluate_next_token(
    model,
    examples: Sequence[QAExample | Prompt],
    *,
    intervention=None,
    batch_size: int | None = None,
    hooks: Sequence[tuple[str, Callable]] = (),
    quiet: bool = False,
    desc: str = "evaluate",
) -> pd.DataFrame:
    """Score every example from one forward pass; one row per example.

    ``intervention`` (an :class:`~focuslens.model.intervention.Intervention`, e.g.
    ``SplitSoftmax(20, ranking=scores)`` or ``Focus(dirs, alpha=0.5)``): the accuracy under
    it, in one call (each prompt resolves the intervention's span names and rows).
    ``hooks``: extra static ``(hook name, fn)`` pairs active during every forward pass.

    Columns: ``correct`` (gold first visible token is top-1 over the vocabulary),
    ``candidate_correct`` (1.0 / 0.0: gold beats the in-prompt candidates; NaN without
    any), ``gold_logit``, ``margin`` (gold logit minus the best other candidate; NaN without
    any), ``prediction`` (top-1 token), ``n_documents``, ``gold_index``, ``position``, ``qid``.
    Warns about examples it cannot score as intended (:func:`warn_unscorable`).
    """
    if intervention is not None:
        if intervention.n_variants(model) != 1:
            raise DataError("intervention holds several variants: evaluate them with a sweep or evaluate_variants.")
        with model.hooks(fwd_hooks=list(hooks)):
            table = evaluate_variants(model, examples, intervention, quiet=quiet, desc=desc)
        return table.drop(columns=["example", "variant"])
    tok = model.tokenizer
    prompts = to_prompts(model, examples)
    examples = [p.example for p in prompts]
    warn_unscorable(tok, examples)
    logits = shared_logits(model, prompts, batch_size=batch_size, hooks=hooks, quiet=quiet, desc=desc)
    rows = []
    for i, (ex, lg) in enumerate(zip(examples, logits)):
        check_finite(lg, i)
        (scored,) = score_rows(lg[None], candidate_token_ids(tok, ex))
        rows.append({**example_columns(ex), **scored, "prediction": tok.decode([int(lg.argmax())])})
    return pd.DataFrame(rows)


def greedy_generate(model, prompt: Prompt, *, max_new_tokens: int = 32) -> str:
    """Greedy continuation of a rendered prompt (stops at EOS), decoded without specials
    (:func:`~focuslens.model.decode.greedy_text`)."""
    return greedy_text(model, prompt.input_ids, max_new_tokens=max_new_tokens)


def evaluate_generation(
    model,
    examples: Sequence[QAExample],
    *,
    intervention=None,
    max_new_tokens: int = 32,
    quiet: bool = False,
) -> pd.DataFrame:
    """Greedy answers scored with ``best_subspan_em``; one row per example. With
    ``intervention``, the answers under it (:func:`generate_variants`, one variant)."""
    if intervention is not None:
        if intervention.n_variants(model) != 1:
            raise DataError("intervention holds several variants: generate them with generate_variants.")
        table = generate_variants(model, examples, intervention, max_new_tokens=max_new_tokens, quiet=quiet)
        return table.drop(columns=["example", "variant"])
    rows = []
    for ex, prompt in tqdm(
        [(p.example, p) for p in to_prompts(model, examples)], desc="generate", disable=quiet or not is_main(), leave=False
    ):
        answer = greedy_generate(model, prompt, max_new_tokens=max_new_tokens)
        rows.append({**example_columns(ex), "prediction": answer,
                     "correct": bool(best_subspan_em((ex.answer_prefix or "") + answer, ex.answers))})
    return pd.DataFrame(rows)


def _unique(examples):
    """Examples with distinct rendered content (gold-only / no-gold variants of one
    question at several gold positions are the same prompt)."""
    seen, out = set(), []
    for ex in examples:
        key = (ex.documents, ex.question)
        if key not in seen:
            seen.add(key)
            out.append(ex)
    return out


def reference_accuracies(model, examples, *, quiet: bool = False) -> dict:
    """Top-1 accuracy with the gold document alone and with it removed: the ceiling and
    the floor an intervention on the distracted prompts is read against."""

    gold_only = evaluate_next_token(model, _unique([ex.gold_only() for ex in examples]), quiet=quiet, desc="gold only")
    no_gold = evaluate_next_token(model, _unique([ex.without_gold() for ex in examples]), quiet=quiet, desc="no gold")
    return {"gold_only": float(gold_only.correct.mean()), "no_gold": float(no_gold.correct.mean()),
            "n_gold_only": len(gold_only), "n_no_gold": len(no_gold)}


# ------------------------------------------------------------------ the variant engine
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
        probe = Probe(model, prompt, probe_heads) if probe_heads is not None else None
        hooks = list(hooks_for(prompt, slice(0, n_variants))) + (probe.hooks() if probe else [])
        logits = pc.run(hooks, batch=n_variants).float().cpu()
        store.update(probe.totals() if probe else {})
        return logits
    if rows != "all":
        raise DataError(f"rows={rows!r}: a sweep runs rows='all' or rows='answer'.")
    last = [last_position_only()]

    def run(tokens, hooks, probes):
        return model.run_with_hooks(tokens, fwd_hooks=[*hooks, *probes, *last])[:, -1].float().cpu()

    return torch.cat(run_in_chunks(model, prompt, n_variants, hooks_for, probe_heads, store, run))


def run_in_chunks(model, prompt: Prompt, n_variants: int, hooks_for, probe_heads, store: dict, run,
                  ids: Tensor | None = None) -> list:
    """The whole prompt once per variant (``rows="all"``), a few variants per batch.

    ``run(tokens, hooks, probes)`` runs one chunk (``tokens`` ``[chunk, pos]``: the prompt's
    ids, or ``ids`` when given); the probe masses of every chunk are concatenated into
    ``store``. Returns the chunks' outputs.
    """
    outs, step = [], _variant_chunk(model)
    ids = prompt.input_ids if ids is None else ids
    for v0 in range(0, n_variants, step):
        v = slice(v0, min(v0 + step, n_variants))
        probe = Probe(model, prompt, probe_heads[v]) if probe_heads is not None else None
        tokens = ids[None].expand(v.stop - v.start, -1).to(model.cfg.device)
        outs.append(run(tokens, list(hooks_for(prompt, v)), probe.hooks() if probe else []))
        for name, value in (probe.totals() if probe else {}).items():
            store.setdefault(name, []).append(value)
    for name in list(store):
        store[name] = torch.cat(store[name])
    return outs


def _variant_rows(i: int, ex, logits: Tensor, candidates, store: dict, n_probe) -> list[dict]:
    """One result row per variant of example ``i`` (accuracy columns and probe masses)."""
    return [{"example": i, **example_columns(ex), "variant": v, **scored,
             **{name: float(total[v] / n_probe[v]) for name, total in store.items()}}
            for v, scored in enumerate(score_rows(logits, candidates))]


def evaluate_variants(
    model,
    examples: Sequence[QAExample | Prompt],
    intervention,
    *,
    probe_heads: Tensor | None = None,
    return_logits: bool = False,
    prefills=None,
    quiet: bool = False,
    desc: str = "variants",
):
    """Score ``n_variants`` interventions on every example, one batch row per variant.

    Args:
        intervention: an :class:`~focuslens.model.intervention.Intervention` holding
            ``n_variants(model)`` variants (e.g. a
            :class:`~focuslens.steer.split_softmax.SplitSoftmax` with a ``[variant, layer,
            head]`` mask), one batch row each; the result equals running each variant as a
            context manager. Its ``rows`` decide the schedule: ``"answer"``: the
            interventions act at the answer rows only, so one prefill of the prompt before
            them (a :class:`~focuslens.model.prefix.PrefixCache`) serves every variant, run
            packed. ``"all"``: they act at every position, so every variant re-runs the whole
            prompt (batched a few variants at a time).
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
    n_variants, rows, hooks_for = intervention.n_variants(model), intervention.rows, intervention.hooks_for(model)
    if probe_heads is not None and probe_heads.shape[0] != n_variants:
        raise DataError(f"probe_heads has {probe_heads.shape[0]} variants, not n_variants={n_variants}.")
    tok = model.tokenizer
    prompts = to_prompts(model, intervention.rewrite(model, examples))
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


def generate_variants(
    model,
    examples: Sequence,
    intervention,
    *,
    max_new_tokens: int = 16,
    probe_heads: Tensor | None = None,
    prefills=None,
    quiet: bool = False,
    desc: str = "generate variants",
) -> pd.DataFrame:
    """Greedy answers of ``n_variants`` interventions on every example, scored with
    ``best_subspan_em`` (``correct``). ``intervention`` and ``probe_heads`` as in
    :func:`focuslens.measure.evaluate.evaluate_variants` (the probes read the prompt's answer
    rows of the first pass). ``prefills``: a :class:`~focuslens.model.prefix.PrefillStore`
    shared with other sweeps of the same prompts. One row per (example, variant) with
    ``prediction``."""
    n_variants, rows, hooks_for = intervention.n_variants(model), intervention.rows, intervention.hooks_for(model)
    if rows not in ("answer", "all"):
        raise DataError(f"rows={rows!r}: generation runs rows='all' or rows='answer'.")
    out, prompts = [], to_prompts(model, intervention.rewrite(model, examples))
    n_probe = probe_heads.sum((1, 2)).clamp_min(1) if probe_heads is not None else None
    for i in tqdm(share(len(prompts)), desc=desc, disable=quiet or not is_main(), leave=False):
        store: dict = {}  # under a launcher: this process's share of the prompts (focuslens.model.parallel)
        texts = _prompt_variants(model, prompts[i], n_variants, hooks_for, rows, max_new_tokens, probe_heads, store,
                                 prefills)
        ex = prompts[i].example
        for v, text in enumerate(texts):
            row = {"example": i, **example_columns(ex), "variant": v, "prediction": text,
                   "correct": bool(best_subspan_em((ex.answer_prefix or "") + text, ex.answers))}
            row.update({name: float(total[v] / n_probe[v]) for name, total in store.items()})
            out.append(row)
    return pd.DataFrame(gather(out))


def _prompt_variants(model, prompt, n, hooks_for, rows, max_new_tokens, probe_heads, store, prefills=None) -> list[str]:
    """Greedy answers of ``n`` variants of one prompt (the probes record the pass that holds
    the answer rows: the prefill's suffix or, with ``rows="all"``, the first pass)."""
    if rows == "answer":
        split = prompt.answer.start
        pc = prefills.get(model, prompt.input_ids, split) if prefills else PrefixCache(model, prompt.input_ids, split)
        cache = copy.deepcopy(pc.cache)
        cache.batch_repeat_interleave(n)
        probe = Probe(model, prompt, probe_heads) if probe_heads is not None else None
        hooks = list(hooks_for(prompt, slice(0, n))) + (probe.hooks() if probe else [])
        texts = decode_rows(model, greedy_tokens(model, hooks, pc.suffix[None].expand(n, -1), cache, max_new_tokens))
        store.update(probe.totals() if probe else {})
        return texts

    def run(tokens, hooks, probes):
        return decode_rows(model, greedy_tokens(model, [*hooks, *probes], tokens, None, max_new_tokens))

    return sum(run_in_chunks(model, prompt, n, hooks_for, probe_heads, store, run), [])


def gold_logprob_variants(
    model,
    examples: Sequence,
    intervention,
    *,
    probe_heads: Tensor | None = None,
    prefills=None,
    quiet: bool = False,
    desc: str = "gold log-prob",
) -> pd.DataFrame:
    """The teacher-forced log-probability of the gold answer under ``n_variants``
    interventions on every example: the prompt is followed by its gold answer's tokens
    (:func:`~focuslens.measure.forward.teacher_forced_ids`) and ``gold_logprob`` is their
    summed log-probability (``answer_tokens`` of them), each predicted after the true ones
    before it. A graded metric: it moves when greedy answers do not, so it measures an
    intervention with far fewer prompts than exact match.

    ``intervention``, ``probe_heads`` and ``prefills`` as in :func:`evaluate_variants`
    (``intervention=None``: the model as it is); with
    ``rows="answer"`` one prefill of the prompt before the answer rows serves every variant
    and the greedy answers of :func:`generate_variants` (one ``prefills`` store for both),
    the answer rows and the answer tokens run packed. The intervention acts at the
    prompt's rows (``rows="answer"``: its answer rows and every later position, the answer
    tokens included, as in generation); the probes read the answer rows. One row per
    (example, variant)."""
    if intervention is None:  # the model as it is: one variant, no hooks
        n_variants, rows, hooks_for = 1, "answer", lambda prompt, variants: []
    else:
        n_variants, rows, hooks_for = intervention.n_variants(model), intervention.rows, intervention.hooks_for(model)
    if rows not in ("answer", "all"):
        raise DataError(f"rows={rows!r}: the teacher-forced metric runs rows='all' or rows='answer'.")
    prompts = to_prompts(model, examples if intervention is None else intervention.rewrite(model, examples))
    n_probe = probe_heads.sum((1, 2)).clamp_min(1) if probe_heads is not None else None
    out = []
    for i in tqdm(share(len(prompts)), desc=desc, disable=quiet or not is_main(), leave=False):
        prompt, store = prompts[i], {}
        ids = teacher_forced_ids(model.tokenizer, prompt)
        with torch.no_grad():
            logits, offset = _forced_logits(model, prompt, ids, n_variants, hooks_for, rows, probe_heads, store,
                                            prefills)
        check_finite(logits, i)
        logprob = answer_logprob(logits, ids, prompt.n_tokens, offset)
        ex = prompt.example
        for v in range(n_variants):
            out.append({"example": i, **example_columns(ex), "variant": v, "gold_logprob": float(logprob[v]),
                        "answer_tokens": int(ids.shape[0] - prompt.n_tokens),
                        **{name: float(total[v] / n_probe[v]) for name, total in store.items()}})
    return pd.DataFrame(gather(out))


def _forced_logits(model, prompt, ids, n, hooks_for, rows, probe_heads, store, prefills) -> tuple[Tensor, int]:
    """Logits ``[variant, pos, vocab]`` of the teacher-forced tokens ``ids`` from position
    ``offset`` on (the answer rows, or the prompt's last token), and ``offset``."""
    if rows == "answer":
        split = prompt.answer.start
        pc = prefills.get(model, ids, split) if prefills else PrefixCache(model, ids, split)
        probe = Probe(model, prompt, probe_heads) if probe_heads is not None else None
        hooks = list(hooks_for(prompt, slice(0, n))) + (probe.hooks() if probe else [])
        logits = pc.run(hooks, batch=n, last_only=False).float().cpu()
        store.update(probe.totals() if probe else {})
        return logits, split
    first = prompt.n_tokens - 1  # unembed only the positions that predict the answer
    tail = [("unembed.hook_in", lambda resid, hook: resid[:, first:])]

    def run(tokens, hooks, probes):
        return model.run_with_hooks(tokens, fwd_hooks=[*hooks, *probes, *tail]).float().cpu()

    return torch.cat(run_in_chunks(model, prompt, n, hooks_for, probe_heads, store, run, ids=ids)), first
