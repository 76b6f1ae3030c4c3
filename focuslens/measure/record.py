"""The recorder: what chosen heads attend to, read in one place.

Every measurement of attention in focuslens — contextual scores, per-prompt span masses,
the sweeps' gold/sink probes, where steered attention lands, the keys a focus direction
reads — is a :class:`Recording`. It installs ``hook_pattern`` hooks on the layers of the
chosen heads and **reduces each pattern at once** to the mass its query rows put on each
span (:func:`~focuslens.model.hooks.mass_on`, the one span-mass reduction); no attention
pattern is kept. Optionally it keeps named activations of those layers (``rot_k``: the
post-RoPE keys, for key biases). It is the *retain* half of baukit's ``Trace``, next to the
interventions' *edit* half (:mod:`focuslens.model.intervention`):

>>> with record(model, heads=20, ranking=scores, spans=("gold", "sink"), prompt=prompt) as rec:  # doctest: +SKIP
...     model(prompt.input_ids[None])
>>> rec.table()            # one row per head, one column per span  # doctest: +SKIP

Rows are the prompt's answer rows (``rows="answer"``, the default: the query positions in
``prompt.answer``) or every query row of the pass (``"all"``). Query rows are located by
absolute position (``key_len − query_len + i``), so a recording reads the right rows in a
plain forward, in a :class:`~focuslens.model.prefix.PrefixCache` run and in KV-cached
generation, where only the pass that contains the answer rows is recorded.

Spans are names of :meth:`~focuslens.data.render.Prompt.spans` resolved per prompt
(``"gold"``, ``"doc_3"``), :class:`~focuslens.data.render.Span` s, ``(start, end)`` pairs,
boolean key masks, or lists of those (one column covering several spans); or a function
``prompt -> {name: column}``. Each batch row may have its own prompt (``prompts=``), or
one prompt serves every row (the variants of a sweep).
"""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import contextmanager

import pandas as pd
import torch
from jaxtyping import Float
from torch import Tensor

from focuslens.errors import DataError
from focuslens.model.finite import require_finite
from focuslens.model.heads import HookSpec, resolve_heads
from focuslens.model.hooks import RowHook, attn_hook, mass_on
from focuslens.model.spans import resolve_span, span_mask

__all__ = ["Recording", "record"]


def _column(value, prompt, name: str, n_keys: int) -> Tensor:
    """One span column as a float ``[n_keys]`` indicator."""
    if isinstance(value, Tensor) and value.dtype == torch.bool:
        col = torch.zeros(n_keys)
        col[: min(n_keys, value.shape[-1])] = value[:n_keys].float()
        return col
    parts = value if isinstance(value, list) else [value]
    col = torch.zeros(n_keys, dtype=torch.bool)
    for part in parts:
        col |= span_mask(resolve_span(part, prompt, field=f"spans[{name!r}]"), n_keys)
    return col.float()


class Recording:
    """Span masses (and optional activations) of chosen heads, filled by its hooks.

    Args:
        model: a ``TransformerBridge``.
        heads, ranking: any selection of :func:`~focuslens.model.heads.resolve_heads`.
        spans: span names / spans / masks, a dict name -> column, or ``prompt -> dict``.
        prompt: the prompt of every batch row; or ``prompts``, one per batch row.
        rows: ``"answer"`` (the prompt's answer rows) or ``"all"``.
        activations: hook points (of :data:`~focuslens.model.hooks.POINTS`) to keep for
            the chosen heads' layers, batch row 0 (e.g. ``("rot_k",)``).
        top_keys: also keep, for every recorded row, the key each chosen head attends to
            most (its argmax: the retrieval score's copy events, Wu et al. 2024), read
            with :meth:`row_top_keys`.
    """

    def __init__(self, model, heads="all", spans=("gold", "sink"), *, ranking=None, prompt=None,
                 prompts: Sequence | None = None, rows: str = "answer", activations: Sequence[str] = (),
                 top_keys: bool = False):
        if rows not in ("answer", "all"):
            raise DataError(f"rows={rows!r}: a recording reads rows='answer' or rows='all'.")
        self.heads = resolve_heads(model, heads, ranking)
        if not self.heads:
            raise DataError("heads selects no head: nothing to record.")
        self.prompts = list(prompts) if prompts is not None else [prompt]
        if rows == "answer" and any(p is None for p in self.prompts):
            raise DataError("rows='answer' needs the prompt whose answer rows it reads: pass prompt= or prompts=.")
        self.rows, self.activation_points = rows, tuple(activations)
        self._spans = spans
        self.columns = [self._named(p) for p in self.prompts]
        self.names = list(self.columns[0])
        self.by_layer: dict[int, list[int]] = {}
        for layer, head in self.heads:
            self.by_layer.setdefault(layer, []).append(head)
        self.masses: dict[int, Tensor] = {}  # layer -> [batch, heads of that layer, span]
        self._indicators: dict[tuple[int, int], Tensor] = {}
        self.activations: dict[tuple[str, int], Tensor] = {}
        self.top_keys = bool(top_keys)
        self.tops: dict[int, list[Tensor]] = {}  # layer -> per batch row [heads of that layer, rows] key index

    def _named(self, prompt) -> dict:
        spans = self._spans(prompt) if callable(self._spans) else self._spans
        if isinstance(spans, dict):
            return dict(spans)
        if isinstance(spans, str):
            spans = (spans,)
        return {s if isinstance(s, str) else str(s): s for s in spans}

    @property
    def last_layer(self) -> int:
        """The deepest layer read: a forward pass may stop after it."""
        return max(self.by_layer)

    def indicator(self, row: int, n_keys: int) -> Float[Tensor, "key span"]:
        """Batch row ``row``'s spans as a ``[n_keys, n_spans]`` indicator."""
        i = row if len(self.prompts) > 1 else 0
        if (i, n_keys) not in self._indicators:  # built once per prompt and length, not once per layer
            cols = [_column(v, self.prompts[i], n, n_keys) for n, v in self.columns[i].items()]
            self._indicators[(i, n_keys)] = torch.stack(cols, dim=-1) if cols else torch.zeros(n_keys, 0)
        return self._indicators[(i, n_keys)]

    def _query_rows(self, row: int, q: int, k: int) -> slice | None:
        """The pattern rows to read in a pass of ``q`` queries over ``k`` keys (None: none)."""
        if self.rows == "all":
            return slice(0, q)
        answer = self.prompts[row if len(self.prompts) > 1 else 0].answer
        start, end = max(answer.start - (k - q), 0), min(answer.end - (k - q), q)
        return slice(start, end) if start < end else None

    def _heads_index(self, layer: int, n_heads: int) -> list[int] | slice:
        hs = self.by_layer[layer]
        return slice(None) if hs == list(range(n_heads)) else hs  # every head: a view, not a copy

    def _reduce(self, pattern: Tensor, hook, layer: int) -> None:
        b, n_heads, q, k = pattern.shape
        hs = self._heads_index(layer, n_heads)
        if self.top_keys:
            self._keep_tops(pattern, layer, hs, q, k)
        if len(self.prompts) == 1:  # one prompt for every row (the variants of a sweep): one matmul
            rows = self._query_rows(0, q, k)
            if rows is not None:
                self.masses[layer] = mass_on(pattern[:, hs, rows].float(), self.indicator(0, k)).cpu()
                require_finite(self.masses[layer], f"the recorded attention masses of layer {layer}")
            return
        out = []
        for r in range(b):
            rows = self._query_rows(r, q, k)
            if rows is None:
                return
            out.append(mass_on(pattern[r, hs, rows].float(), self.indicator(r, k)).cpu())
            require_finite(out[-1], f"the recorded attention masses of layer {layer} (batch row {r})")
        self.masses[layer] = out  # one [head, span] per row: prompts may have different spans

    def _keep_tops(self, pattern: Tensor, layer: int, hs, q: int, k: int) -> None:
        """Each recorded row's most-attended key (absolute position), per chosen head."""
        tops = []
        for r in range(pattern.shape[0]):
            rows = self._query_rows(r if len(self.prompts) > 1 else 0, q, k)
            if rows is None:
                return
            tops.append(pattern[r, hs, rows].argmax(-1).cpu())
        self.tops[layer] = tops

    def row_top_keys(self, row: int) -> Tensor:
        """Batch row ``row``'s most-attended key per head and recorded query row, ``[head,
        query row]`` (heads in selection order); needs ``top_keys=True``."""
        if not self.top_keys:
            raise DataError("this recording keeps no top keys: make it with top_keys=True.")
        return self._in_selection_order(self.tops, row, "no top keys were recorded")

    def first_row(self) -> int:
        """The first query row read (absolute position): the earliest answer row, or 0."""
        return 0 if self.rows == "all" else min(p.answer.start for p in self.prompts)

    def _keep(self, x: Tensor, hook, point: str, layer: int) -> None:
        self.activations[(point, layer)] = x[0].detach().float().cpu()

    def hooks(self) -> list[HookSpec]:
        """The hook specs that fill this recording."""
        first = self.first_row()  # the pattern-free path computes only these rows' patterns
        out: list[HookSpec] = [(attn_hook(layer, "pattern"),
                                RowHook(lambda x, hook, layer=layer: self._reduce(x, hook, layer), first))
                               for layer in self.by_layer] if self.names or self.top_keys else []
        out += [(attn_hook(layer, point), lambda x, hook, point=point, layer=layer: self._keep(x, hook, point, layer))
                for point in self.activation_points for layer in self.by_layer]
        return out

    def row(self, row: int) -> Float[Tensor, "head span"]:
        """Batch row ``row``'s masses ``[head, span]``, heads in selection order."""
        return self._in_selection_order(self.masses, row, "nothing was recorded")

    def _in_selection_order(self, store: dict, row: int, what: str) -> Tensor:
        """Batch row ``row`` of a per-layer store (``[batch][heads of the layer, ...]``), one
        entry per chosen head in selection order."""
        missing = [layer for layer in self.by_layer if layer not in store]
        if missing:
            raise DataError(f"{what} for layers {missing}: run a forward pass of the prompt (its answer rows) inside "
                            "the recording.")
        index = {layer: {h: i for i, h in enumerate(hs)} for layer, hs in self.by_layer.items()}
        return torch.stack([store[layer][row][index[layer][h]] for layer, h in self.heads])

    def tensor(self) -> Float[Tensor, "batch head span"]:
        """Masses ``[batch, head, span]`` (every row with the same spans)."""
        first = self.masses[next(iter(self.by_layer))] if self.masses else None
        return torch.stack([self.row(r) for r in range(len(first) if first is not None else 1)])

    def table(self, row: int = 0) -> pd.DataFrame:
        """Batch row ``row`` as a DataFrame: index ``(layer, head)``, one column per span."""
        return pd.DataFrame(self.row(row).numpy(), columns=self.names,
                            index=pd.MultiIndex.from_tuples(self.heads, names=["layer", "head"]))

    def masked_sum(self, masks: Tensor, name: str) -> Tensor:
        """Per batch row: the mass on span ``name`` summed over the heads of ``masks``
        (``[batch, n_layers, n_heads]``; the recorded heads must cover them), layer by layer."""
        col = self.names.index(name)
        total = 0
        for layer, hs in self.by_layer.items():
            total = total + (self.masses[layer][..., col] * masks[:, layer, hs].float()).sum(-1)
        return total


@contextmanager
def record(model, heads="all", spans=("gold", "sink"), *, ranking=None, prompt=None, prompts=None,
           rows: str = "answer", activations: Sequence[str] = (), top_keys: bool = False):
    """Context manager: a :class:`Recording` whose hooks are active while the block runs."""
    rec = Recording(model, heads, spans, ranking=ranking, prompt=prompt, prompts=prompts, rows=rows,
                    activations=activations, top_keys=top_keys)
    with model.hooks(fwd_hooks=rec.hooks()):
        yield rec

