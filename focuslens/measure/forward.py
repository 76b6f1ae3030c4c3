"""Forward passes and the metrics they are scored with: the layer under every evaluation.

* **Metrics**: Lost-in-the-Middle's ``best_subspan_em`` for generated answers; for one
  forward pass, the one row scorer :func:`score_rows` — ``correct`` (the gold answer's first
  visible token is top-1 over the vocabulary), ``candidate_correct`` (it beats the tokens the
  other documents' answers need at that position; NaN when there is none to beat),
  ``gold_logit`` and ``margin`` — the same columns in every table (evaluation, sweeps,
  ablation).
* **Forward passes**: last-position logits of many prompts (:func:`next_token_logits`,
  sharing KV caches of common prefixes), prompt checks (:func:`to_prompts`), and the
  sweeps' probes (:class:`Probe`: the steered heads' span masses at the answer rows).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Iterable, Sequence

import pandas as pd
import torch
from jaxtyping import Float
from torch import Tensor

from focuslens.data.examples import QAExample, normalize_answer
from focuslens.data.render import Prompt, render, scored_tokens, tokenizer_id
from focuslens.errors import DataError
from focuslens.measure.record import Recording
from focuslens.model.finite import require_finite
from focuslens.model.hooks import last_position_only
from focuslens.model.parallel import cat, is_main, share
from focuslens.progress import tqdm

__all__ = ["best_subspan_em", "warn_unscorable", "position_label", "next_token_logits", "check_context",
           "to_prompts", "check_finite", "shared_logits", "example_columns", "score_rows", "Probe",
           "accuracy_by", "teacher_forced_ids", "answer_logprob"]


# ------------------------------------------------------------------ metrics
def best_subspan_em(prediction: str, answers: Iterable[str]) -> float:
    """1.0 if any normalised answer is a substring of the normalised prediction."""
    pred = normalize_answer(prediction)
    return float(any(normalize_answer(a) in pred for a in answers))


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
    bar = tqdm(total=len(prompts), desc=desc, disable=quiet or not is_main(), leave=False)
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
    last_only = [last_position_only()]
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
    """Every pre-rendered :class:`Prompt` in ``items`` must be of the model's tokenizer
    (its ids would index another vocabulary) and fit the model's context: a longer one
    would run past ``n_ctx`` (examples are refused when rendered, with ``max_length``).
    The one check of every entry point that accepts Prompts."""
    n_ctx, own = model.cfg.n_ctx, None
    for i, item in enumerate(items):
        if not isinstance(item, Prompt):
            continue
        if item.tokenizer:
            own = own or tokenizer_id(model.tokenizer)
            if item.tokenizer != own:
                raise DataError(f"examples[{i}] was rendered with another tokenizer than the model's ({item.tokenizer}; "
                                f"the model's: {own}): pass the QAExamples, or render them with model.tokenizer.")
        if item.n_tokens and int(item.input_ids.max()) >= model.cfg.d_vocab:
            raise DataError(f"examples[{i}]: token id {int(item.input_ids.max())} is outside the model's vocabulary "
                            f"of {model.cfg.d_vocab}: the prompt was rendered with another tokenizer.")
        if item.n_tokens > n_ctx:
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
    are a broken model or intervention, never a wrong answer (:func:`~focuslens.model.finite.require_finite`)."""
    require_finite(logits, f"examples[{i}]: the logits")


def shared_logits(model, prompts: Sequence[Prompt], *, hooks=(), **kwargs) -> torch.Tensor:
    """:func:`next_token_logits` with the prompts shared over processes
    (:mod:`focuslens.model.parallel`; one process: the same call), the whole result on each."""
    mine = share(len(prompts))
    if len(mine) == len(prompts):
        return next_token_logits(model, prompts, hooks=hooks, **kwargs)
    kwargs["quiet"] = kwargs.get("quiet", False) or not is_main()  # one progress bar, rank 0's
    local = (lambda batch: hooks([mine[i] for i in batch])) if callable(hooks) else hooks
    return cat(next_token_logits(model, [prompts[i] for i in mine], hooks=local, **kwargs), len(prompts))


def example_columns(ex: QAExample) -> dict:
    """The columns that say which example a result row is about."""
    return {"qid": ex.qid, "n_documents": ex.n_documents, "gold_index": ex.gold_index,
            "position": position_label(ex.gold_index, ex.n_documents)}


def teacher_forced_ids(tokenizer, prompt: Prompt) -> Tensor:
    """The prompt's token ids followed by its gold answer's (``answers[0]``), as the model
    would write them: the tokens from ``prompt.n_tokens`` on are the answer the
    teacher-forced metric scores (:func:`answer_logprob`).

    The answered text is tokenized whole (the prompt already ends with the answer's
    whitespace lead, :func:`~focuslens.data.render.answer_lead`); it must continue the
    prompt's own tokens, or the answer would be scored in a tokenization the prompt never
    had (a ``DataError`` saying so)."""
    ex = prompt.example
    separator = " " if ex.answer_prefix and not ex.answer_prefix[-1].isspace() else ""
    full = render(ex, tokenizer, response=(ex.answer_prefix or "") + separator + ex.answers[0]).input_ids
    P = prompt.n_tokens
    if full.shape[0] <= P or not bool((full[:P] == prompt.input_ids).all()):
        raise DataError(f"{ex.qid or 'an example'}: the prompt followed by its answer {ex.answers[0]!r} does not "
                        "tokenize as the prompt's tokens and then the answer's: it cannot be teacher-forced.")
    return full


def answer_logprob(logits: Float[Tensor, "variant pos vocab"], ids: Tensor, first: int, offset: int = 0) -> Tensor:
    """``[variant]``: the summed log-probability (float64) of the answer tokens
    ``ids[first:]``, from the logits of a pass over ``ids`` whose position ``0`` is the
    token at ``offset`` (a :class:`~focuslens.model.prefix.PrefixCache` suffix run starting
    there; 0 for a whole pass): position ``j`` predicts token ``j + 1``."""
    N = ids.shape[0]
    if not offset < first < N or logits.shape[1] < N - 1 - offset:
        raise DataError(f"answer_logprob: answer tokens {first}..{N} are not predicted by a pass from position {offset} "
                        f"with {logits.shape[1]} positions.")
    pred = logits[:, first - 1 - offset : N - 1 - offset].double().log_softmax(-1)
    target = ids[first:].to(pred.device)[None, :, None].expand(len(pred), -1, 1)
    return pred.gather(-1, target)[..., 0].sum(-1)


def score_rows(logits: Tensor, candidates: tuple[int, list[int]]) -> list[dict]:
    """The one row scorer: per row of ``logits`` (``[row, vocab]``, last position), the
    columns ``correct``, ``candidate_correct``, ``gold_logit`` and ``margin`` for the gold
    token and the rival tokens ``candidates = (gold, others)``
    (:func:`~focuslens.data.render.candidate_token_ids`)."""
    gold, others = candidates
    best_other = logits[:, others].max(-1).values if others else torch.full((len(logits),), math.nan)
    return [{"correct": bool(logits[v].argmax() == gold),
             "candidate_correct": float(logits[v, gold] > best_other[v]) if others else math.nan,
             "gold_logit": float(logits[v, gold]), "margin": float(logits[v, gold]) - float(best_other[v])}
            for v in range(len(logits))]


# ------------------------------------------------------------------ probes
class Probe:
    """The sweeps' probe: per variant, the mean attention mass of its probe heads from the
    prompt's answer rows onto the gold document (``gold_mass``), the sink (``sink_mass``)
    and all other documents together (``irrelevant_mass``), as steered. A
    :class:`~focuslens.measure.record.Recording` of every
    head of the probed layers, summed over each variant's heads (``probe_heads``, a
    ``[variant, layer, head]`` mask) layer by layer."""

    def __init__(self, model, prompt: Prompt, probe_heads: Tensor):
        self.masks = probe_heads
        layers = probe_heads.any(0).any(-1).nonzero().flatten().tolist()
        others = [s for i, s in enumerate(prompt.documents) if i != prompt.gold_index] if prompt.gold else []
        spans = {name: span for name, span in (("gold_mass", prompt.gold), ("sink_mass", prompt.sink),
                                               ("irrelevant_mass", others or None)) if span is not None}
        heads = [(layer, head) for layer in layers for head in range(model.cfg.n_heads)]
        self.recording = Recording(model, heads, spans, prompt=prompt) if heads and spans else None

    def hooks(self) -> list:
        return self.recording.hooks() if self.recording else []

    def totals(self) -> dict[str, Tensor]:
        """Per probe span: ``[variant]`` mass summed over each variant's probe heads."""
        rec = self.recording
        return {name: rec.masked_sum(self.masks, name) for name in rec.names} if rec else {}


def accuracy_by(results: pd.DataFrame, column: str, metric: str = "correct") -> dict:
    """Mean of ``metric`` grouped by ``column`` (e.g. 'n_documents' or 'position')."""
    return {k: float(v) for k, v in results.groupby(column)[metric].mean().items()}
