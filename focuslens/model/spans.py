"""Positions, named one way: the rows an intervention acts on and the key spans it reads.

**Spans** (keys) are named by what they are in the prompt and resolved per prompt
(:func:`resolve_span`): ``"gold"``, ``"doc_3"`` (documents numbered as the prompt numbers
them), ``"question"``, ``"sink"``, ``"instruction"``, ``"answer"`` — the names of
:meth:`~focuslens.data.render.Prompt.spans` — or an explicit
:class:`~focuslens.data.render.Span` (or ``(start, end)``). A name lets one intervention value
serve a whole list of prompts; its span differs in each.

**Rows** (queries) are :data:`ROWS`: ``"answer"`` — the one meaning of "answer rows" in
focuslens, the prompt's :attr:`~focuslens.data.render.Prompt.answer` span (the positions
whose next-token predictions produce the answer) and every later position (generated
tokens) — or ``"all"``, or explicit positions.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from jaxtyping import Bool
from torch import Tensor

from focuslens.data.render import Span
from focuslens.errors import DataError

__all__ = ["ROWS", "Rows", "resolve_rows", "first_row", "rows_mask", "rows_reach", "resolve_span", "require_gold", "span_mask", "span_key_mask"]


def resolve_span(span, prompt=None, *, field: str = "span") -> Span:
    """A key span: a name of ``prompt.spans()`` resolved in ``prompt``, a :class:`Span`, or a
    ``(start, end)`` pair; it must be non-empty and inside the prompt when one is given."""
    if isinstance(span, str):
        if prompt is None:
            raise DataError(f"{field}={span!r} is a span name: it needs the prompt it names a span of.")
        named = prompt.spans()
        if span not in named:
            hint = " (this prompt has no gold document)" if span == "gold" else ""
            raise DataError(f"{field}={span!r} is not a span of this prompt{hint}; it has {sorted(named)}.")
        span = named[span]
    elif not isinstance(span, Span):
        try:
            start, end = (int(v) for v in span)
        except (TypeError, ValueError):
            raise DataError(f"{field}={span!r}: use a span name such as 'gold' or 'doc_3', a Span, or (start, end).") from None
        span = Span(start, end)
    if span.end == span.start or span.start < 0:
        raise DataError(f"{field} {span} is empty or starts before the prompt.")
    if prompt is not None and span.end > prompt.n_tokens:
        raise DataError(f"{field} {span} is outside the prompt of {prompt.n_tokens} tokens.")
    return span


def require_gold(prompt, i: int, purpose: str) -> Span:
    """The gold document's span of ``prompt`` (``examples[i]``), checked like every span;
    a DataError that says ``purpose`` when there is none (the one "no gold" check)."""
    if prompt.gold_index is None:
        raise DataError(f"example {i} has no gold document (gold_index is None): {purpose}.")
    return resolve_span(prompt.gold, prompt, field=f"example {i}: the gold span")


#: Where an intervention acts. ``"all"``: every position, as the paper does (the documents'
#: own queries are steered too, so their downstream keys change). ``"answer"``: the prompt's
#: answer rows and every position after them (generated tokens), nothing before: the
#: prompt up to the answer rows is then the unsteered model's and one prefill can serve a
#: whole sweep (:class:`~focuslens.model.prefix.PrefixCache`). Explicit rows: an ``int`` (that
#: position and every later one), a :class:`Span`, or a sequence of positions. Explicit rows
#: must select at least one position of ``prompt`` when one is given, and of every forward
#: pass that starts at position 0 (no KV cache: a plain forward, generation's prefill):
#: rows all past its end raise :class:`~focuslens.errors.DataError` instead of steering
#: nothing. Later cached passes (generated tokens) may lie wholly past the prompt.
ROWS = ("all", "answer")
Rows = str | Span | int | Sequence[int] | None


def resolve_rows(rows: Rows, prompt=None) -> Span | int | Tensor | None:
    """``rows`` as absolute positions: None (every position), an int (from there on), a
    Span, or a tensor of positions. ``"answer"`` needs the ``prompt`` it refers to; with a
    ``prompt``, explicit rows must select at least one of its positions."""
    if rows is None or (isinstance(rows, str) and rows == "all"):
        return None
    if isinstance(rows, str):
        if rows != "answer":
            raise DataError(f"rows={rows!r}: use 'all', 'answer', a start position, a Span or a list of positions.")
        if prompt is None:
            raise DataError("rows='answer' needs the prompt whose answer rows it means: pass prompt=<Prompt>.")
        return int(prompt.answer.start)
    where = _explicit_rows(rows)
    if prompt is not None and not rows_reach(where, prompt.n_tokens):
        raise rows_past_end(rows, prompt.n_tokens, "prompt")
    return where


def _explicit_rows(rows) -> Span | int | Tensor:
    """A start position, a Span or a list of positions, checked (:func:`resolve_rows`)."""
    if isinstance(rows, Span):
        check_span(rows, "rows")
        return rows
    if isinstance(rows, bool) or not isinstance(rows, (int, Sequence, Tensor)):
        raise DataError(f"rows={rows!r}: use 'all', 'answer', a start position, a Span or a list of positions.")
    if isinstance(rows, int):
        if rows < 0:
            raise DataError(f"rows={rows}: a start position must be >= 0.")
        return rows
    pos = torch.as_tensor(rows, dtype=torch.long).flatten()
    if pos.numel() == 0 or (pos < 0).any():
        raise DataError(f"rows={rows!r}: give at least one position, all >= 0.")
    return pos


def check_span(span: Span, name: str) -> None:
    """A :class:`Span` argument (``name``: ``"span"`` or ``"rows"``) must be a non-empty
    range from a position >= 0 (a reversed one is refused when the Span is made)."""
    if span.end == span.start or span.start < 0:
        raise DataError(f"span {span} is empty or starts before the prompt: nothing to boost." if name == "span"
                        else f"rows={span}: a row span must be non-empty and start at a position >= 0.")


def rows_reach(where: Span | int | Tensor | None, n: int) -> bool:
    """Whether resolved rows select any of the positions ``0..n-1`` (no device sync)."""
    if where is None:
        return n > 0
    if isinstance(where, Span):
        return where.start < n
    if isinstance(where, int):
        return where < n
    return bool((where < n).any())


def first_row(where: Span | int | Tensor | None) -> int:
    """The first absolute position of resolved rows (0 for every row): what a hook declares
    to the pattern-free attention path (:class:`~focuslens.model.hooks.RowHook`)."""
    if where is None:
        return 0
    if isinstance(where, Span):
        return where.start
    if isinstance(where, int):
        return where
    return int(where.min()) if where.numel() else 0


def rows_past_end(rows, n: int, what: str = "forward pass") -> DataError:
    """The error for explicit ``rows`` that select none of the ``n`` positions of a prompt
    or of a forward pass from position 0 (the intervention would change nothing)."""
    shown = rows.tolist() if isinstance(rows, Tensor) else rows
    return DataError(f"rows={shown!r} selects none of the {n} positions (0..{n - 1}) of the {what}: the "
                     f"intervention would leave it unchanged. Rows are absolute positions < {n}; to steer only "
                     f"the generated tokens start at the last one (rows={n - 1}), whose row predicts the first.")


def rows_mask(rows: Span | int | Tensor | None, positions: Tensor) -> Bool[Tensor, "..."]:
    """Which of the absolute ``positions`` (any shape) lie in resolved ``rows``."""
    if rows is None:
        return torch.ones_like(positions, dtype=torch.bool)
    if isinstance(rows, Span):
        return (positions >= rows.start) & (positions < rows.end)
    if isinstance(rows, int):
        return positions >= rows
    return torch.isin(positions, rows.to(positions.device))


def check_span_arg(span) -> None:
    """``span`` of :func:`split_softmax_hooks`, checked before any forward pass."""
    if isinstance(span, Span):
        check_span(span, "span")
    elif torch.as_tensor(span).ndim not in (1, 2):
        raise DataError(f"span mask of shape {tuple(torch.as_tensor(span).shape)}: expected (n_keys,) or "
                        "(1 or batch, n_keys).")


def span_mask(span: Span, n_keys: int) -> Bool[Tensor, "key"]:
    """The one Span → key mask: True on the span's positions among ``n_keys`` keys."""
    mask = torch.zeros(n_keys, dtype=torch.bool)
    mask[span.start : span.end] = True
    return mask


def span_key_mask(span, n_keys: int, batch: int) -> Bool[Tensor, "... key"]:
    """``span`` (a Span or a ``[key]`` / ``[batch, key]`` mask over the prompt) as a key
    mask over ``n_keys`` keys (keys past the prompt, e.g. generated ones, are outside)."""
    if isinstance(span, Span):
        if span.start >= n_keys:
            raise DataError(f"span {span} starts after the {n_keys} keys of the prompt: nothing to boost.")
        return span_mask(span, n_keys)
    mask = torch.as_tensor(span).bool()
    if mask.ndim == 2 and mask.shape[0] not in (1, batch):
        rows = "1" if batch == 1 else f"1 or {batch}"
        raise DataError(f"span mask of shape {tuple(mask.shape)} for a batch of {batch}: expected "
                        f"({mask.shape[-1]},) or ({rows}, {mask.shape[-1]}): one row, or one per batch row.")
    if mask.shape[-1] < n_keys:  # a mask over the prompt; later (generated) keys are outside
        mask = torch.cat([mask, mask.new_zeros(*mask.shape[:-1], n_keys - mask.shape[-1])], dim=-1)
    return mask[..., :n_keys]


