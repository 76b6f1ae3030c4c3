"""Metrics and evaluation loops.

Two ways to score a multi-document QA prompt:

* **One forward pass** (:func:`evaluate_next_token`): the prompt ends where the answer
  starts (the answer prefix, e.g. ``"Varnex Motors is based in"``), so the next-token
  logits decide. ``correct`` = the gold answer's first token is the top-1 token over the
  vocabulary; ``candidate_correct`` = it beats the first tokens of the other documents'
  answers (the example's ``candidates`` that appear in the prompt).
* **Greedy generation** (:func:`evaluate_generation`) scored with Lost-in-the-Middle's
  ``best_subspan_em``: 1 if any SQuAD-normalised gold answer is a substring of the
  normalised prediction.

Both return one row per example (a pandas DataFrame) so results can be grouped by
number of documents or gold position.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable, Iterable, Sequence

import numpy as np
import pandas as pd
import torch
from torch import Tensor
from tqdm.auto import tqdm

from focuslens.data.examples import QAExample, normalize_answer
from focuslens.data.render import Prompt, render
from focuslens.errors import DataError
from focuslens.hooks import attn_hook, key_indicator, mass_on
from focuslens.kvcache import PrefixCache

__all__ = [
    "normalize_answer",
    "best_subspan_em",
    "spearman",
    "first_token_id",
    "candidate_token_ids",
    "next_token_logits",
    "evaluate_next_token",
    "evaluate_generation",
    "evaluate_variants",
    "greedy_generate",
    "position_label",
    "accuracy_by",
    "distraction",
    "distraction_summary",
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


def first_token_id(tokenizer, answer: str, *, leading_space: bool = True) -> int:
    """The id of the first token of ``answer`` as it would follow the answer prefix."""
    ids = tokenizer((" " if leading_space else "") + answer, add_special_tokens=False)["input_ids"]
    if not ids:
        raise DataError(f"answer {answer!r} tokenizes to nothing.")
    return ids[0]


def candidate_token_ids(tokenizer, example: QAExample) -> tuple[int, list[int]]:
    """The gold answer's first token, and the first tokens of the other candidates that
    appear in the prompt's documents (the competitors of candidate accuracy)."""
    gold = first_token_id(tokenizer, example.answers[0])
    in_prompt = [c for c in example.candidates if any(c in d.text for d in example.documents)]
    return gold, sorted({first_token_id(tokenizer, c) for c in in_prompt} - {gold})


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


def _render_all(model, examples: Sequence[QAExample]) -> list[Prompt]:
    if not examples:
        raise DataError("the example list is empty: nothing to evaluate.")
    return [render(ex, model.tokenizer, max_length=model.cfg.n_ctx) for ex in examples]


def evaluate_next_token(
    model,
    examples: Sequence[QAExample],
    *,
    batch_size: int | None = None,
    hooks: Sequence[tuple[str, Callable]] = (),
    quiet: bool = False,
    desc: str = "evaluate",
) -> pd.DataFrame:
    """Score every example from one forward pass; one row per example.

    Columns: ``correct`` (gold first token is top-1 over the vocabulary),
    ``candidate_correct`` (gold beats the in-prompt candidates), ``gold_logit``,
    ``margin`` (gold logit minus the best other candidate), ``prediction`` (top-1 token),
    ``n_documents``, ``gold_index``, ``position``, ``qid``.
    """
    tok = model.tokenizer
    prompts = _render_all(model, examples)
    logits = next_token_logits(model, prompts, batch_size=batch_size, hooks=hooks, quiet=quiet, desc=desc)
    rows = []
    for ex, lg in zip(examples, logits):
        gold, others = candidate_token_ids(tok, ex)
        best_other = lg[others].max().item() if others else float("-inf")
        top = int(lg.argmax())
        rows.append(
            {
                "qid": ex.qid,
                "n_documents": ex.n_documents,
                "gold_index": ex.gold_index,
                "position": position_label(ex.gold_index, ex.n_documents),
                "correct": top == gold,
                "candidate_correct": lg[gold].item() > best_other,
                "gold_logit": lg[gold].item(),
                "margin": lg[gold].item() - best_other,
                "prediction": tok.decode([top]),
            }
        )
    return pd.DataFrame(rows)


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
        list(zip(examples, _render_all(model, examples))), desc="generate", disable=quiet, leave=False
    ):
        answer = greedy_generate(model, prompt, max_new_tokens=max_new_tokens)
        rows.append(
            {
                "qid": ex.qid,
                "n_documents": ex.n_documents,
                "gold_index": ex.gold_index,
                "position": position_label(ex.gold_index, ex.n_documents),
                "prediction": answer,
                "correct": bool(best_subspan_em((ex.answer_prefix or "") + answer, ex.answers)),
            }
        )
    return pd.DataFrame(rows)


# ------------------------------------------------------------------ interventions
def _prompt(model, item: QAExample | Prompt) -> Prompt:
    return item if isinstance(item, Prompt) else render(item, model.tokenizer, max_length=model.cfg.n_ctx)


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
    best_other = logits[:, others].max(-1).values if others else torch.full((len(logits),), float("-inf"))
    rows = []
    for v in range(len(logits)):
        row = {"example": i, "qid": ex.qid, "n_documents": ex.n_documents, "gold_index": ex.gold_index,
               "position": position_label(ex.gold_index, ex.n_documents), "variant": v,
               "correct": bool(logits[v].argmax() == gold), "candidate_correct": bool(logits[v, gold] > best_other[v]),
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
            :func:`focuslens.steering.split_softmax_hooks` with ``masks[variants]``. The
            hooks must steer at ``rows`` (build them with the same ``rows=`` and
            ``prompt=``): the result then equals running them as a context manager.
        rows: ``"answer"``: the interventions act at the answer rows only, so one prefill
            of the prompt before them (a :class:`~focuslens.kvcache.PrefixCache`) serves
            every variant, run packed. ``"all"``: they act at every position, so every
            variant re-runs the whole prompt (batched a few variants at a time).
        probe_heads: optional ``[variant, layer, head]`` mask; adds ``gold_mass`` and
            ``sink_mass``: the mean attention mass of those heads from the answer rows onto
            the gold document and the sink, as steered.
        return_logits: also return the last-position logits ``[example, variant, vocab]``.
        prefills: a :class:`~focuslens.kvcache.PrefillStore` shared with other sweeps of
            the same prompts (``rows="answer"``): each prompt is prefilled once in all.

    Returns one row per (example, variant): ``example`` (its index in ``examples``),
    ``variant``, the columns of :func:`evaluate_next_token`, and the probe masses.
    """
    if not examples:
        raise DataError("the example list is empty: nothing to evaluate.")
    if probe_heads is not None and probe_heads.shape[0] != n_variants:
        raise DataError(f"probe_heads has {probe_heads.shape[0]} variants, not n_variants={n_variants}.")
    tok = model.tokenizer
    rows_out, all_logits = [], []
    for i, item in enumerate(tqdm(examples, desc=desc, disable=quiet, leave=False)):
        prompt = _prompt(model, item)
        ex = prompt.example
        store: dict = {}
        with torch.no_grad():
            logits = _run_variants(model, prompt, n_variants, hooks_for, rows, probe_heads, store, prefills)
        if return_logits:
            all_logits.append(logits)
        n_probe = probe_heads.sum((1, 2)).clamp_min(1) if probe_heads is not None else None
        rows_out += _variant_rows(i, ex, logits, candidate_token_ids(tok, ex), store, n_probe)
    df = pd.DataFrame(rows_out)
    return (df, torch.stack(all_logits)) if return_logits else df


def accuracy_by(results: pd.DataFrame, column: str, metric: str = "correct") -> dict:
    """Mean of ``metric`` grouped by ``column`` (e.g. 'n_documents' or 'position')."""
    return {k: float(v) for k, v in results.groupby(column)[metric].mean().items()}


# ------------------------------------------------------------------ distraction
def distraction(
    model,
    examples: Sequence[QAExample],
    *,
    n_documents: Sequence[int] = (1, 5, 10, 20),
    positions: Sequence[str] = ("first", "middle", "last"),
    seed: int = 0,
    batch_size: int | None = None,
    quiet: bool = False,
) -> pd.DataFrame:
    """The distraction experiment: the same questions with 1, 5, 10, … documents.

    For each ``n`` in ``n_documents`` every example keeps its gold document and its first
    ``n - 1`` distractors, with the gold at a seeded random position (``setting="random"``).
    For the largest ``n`` the gold is also placed first, in the middle and last
    (``setting=<position>``). Returns one row per (example, setting, n) with the columns of
    :func:`evaluate_next_token` plus ``setting``.
    """

    rng = random.Random(seed)
    runs: list[tuple[str, int, list[QAExample]]] = []
    for n in n_documents:
        runs.append(("random", n, [ex.with_n_documents(n, rng.randrange(n)) for ex in examples]))
    n_max = max(n_documents)
    for pos in positions:
        index = {"first": 0, "middle": (n_max - 1) // 2, "last": n_max - 1}[pos]
        runs.append((pos, n_max, [ex.with_n_documents(n_max, index) for ex in examples]))
    # one call for every setting: variants of one example share their leading documents,
    # so on CPU each prompt re-uses the KV cache of the prefix it shares with another
    everything = [ex for _, _, exs in runs for ex in exs]
    df = evaluate_next_token(model, everything, batch_size=batch_size, quiet=quiet, desc="distraction")
    df["setting"] = [setting for setting, _, exs in runs for _ in exs]
    return df


def distraction_summary(results: pd.DataFrame) -> dict:
    """The ``"distraction"`` section of ``summary.json`` from :func:`distraction` rows."""
    rand = results[results.setting == "random"]
    n_max = int(results.n_documents.max())
    pos = results[(results.setting != "random") & (results.n_documents == n_max)]
    return {
        "n_prompts": int(rand.groupby("n_documents").size().min()),
        "metric": "top-1 next-token accuracy of the gold answer's first token",
        "accuracy": {str(k): v for k, v in accuracy_by(rand, "n_documents").items()},
        "candidate_accuracy": {
            str(k): v for k, v in accuracy_by(rand, "n_documents", "candidate_correct").items()
        },
        f"by_gold_position_{n_max}": accuracy_by(pos, "setting"),
    }
