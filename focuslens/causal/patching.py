"""Causal importance of attention heads: activation patching and attribution patching.

**Activation patching** asks which heads *carry* the answer. Run a clean prompt (the gold
document says ``Based in Boston.``) and a corrupted one that differs only in that city
(``Based in Hamburg.``). The metric is the logit difference at the last position,
``LD = logit[clean answer] − logit[corrupted answer]``. Re-run the corrupted prompt with
one head's output ``z`` (``blocks.{l}.attn.hook_z``) at the answer rows replaced by its
clean value (*denoising*), and normalise::

    effect = (LD_patched − LD_corrupt) / (LD_clean − LD_corrupt)   # 0 = corrupted, 1 = clean

A head with a large effect moves the gold document's city into the answer on its own.

**Attribution patching** linearises this: ``effect ≈ Σ_rows (z_clean − z_corrupt) · ∂LD/∂z``
with the gradient taken on the corrupted run, so one forward + backward scores every head.

Ablation, which needs no counterfactual, is :mod:`focuslens.causal.ablation`; both run on the
answer-row engine of :mod:`focuslens.causal.engine`.

Why not ``transformer_lens.patching``? Its generic engine re-runs the whole corrupted prompt
for every patch: 270 heads × a 400-token prompt is 270 full forwards per pair. Every
intervention here happens at the answer rows, the last few tokens of the prompt, so the
keys and values of all earlier positions are identical in every run.
:class:`focuslens.model.prefix.PrefixCache` prefills that prefix once; each patch then re-runs
only the answer rows, and a batch of them at once (batch row *i* patches head *i*). Nothing
is approximated: the tests check this path against TransformerLens'
``generic_activation_patch`` and ``attribution_patch`` on full prompts.

>>> pairs = make_counterfactual_pairs(model, make_synthetic_qa(8))         # doctest: +SKIP
>>> exact = activation_patching(model, pairs, heads=scores.top_k(40))       # doctest: +SKIP
>>> attrib = attribution_patching(model, pairs)                             # doctest: +SKIP
>>> rank_agreement(exact, attrib, k=10)                                     # doctest: +SKIP
{'spearman': ..., 'top_k_overlap': ..., 'n': 40, 'k': 10}
>>> rank_agreement(scores, (patched, "attribution"), k=20)                  # doctest: +SKIP
"""

from __future__ import annotations

import random
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import partial

import torch
from jaxtyping import Float
from torch import Tensor

from focuslens.causal.engine import answer_rows, check_heads, forward_answer_z, run_head_groups
from focuslens.data.examples import Document, QAExample
from focuslens.data.render import Prompt, first_token_id, render
from focuslens.data.synthetic import CITIES
from focuslens.errors import DataError, ModelError
from focuslens.measure.results import HeadResult, head_values, rank_heads
from focuslens.measure.stats import spearman
from focuslens.model.heads import all_heads
from focuslens.model.hooks import attn_hook
from focuslens.model.load import model_id
from focuslens.model.parallel import cat, gather, is_main, share
from focuslens.model.prefix import PrefixCache
from focuslens.progress import tqdm

__all__ = [
    "CounterfactualPair",
    "make_counterfactual_pairs",
    "logit_diff",
    "patch_heads",
    "activation_patching",
    "attribution_patching",
    "PatchingResult",
    "rank_agreement",
]



# ------------------------------------------------------------------ counterfactual pairs
@dataclass(frozen=True)
class CounterfactualPair:
    """A clean prompt and its corrupted twin: same tokens except the gold document's city.

    Attributes:
        clean, corrupt: the rendered prompts (equal length, same answer rows).
        clean_answer, corrupt_answer: first-token ids of the two cities.
        example: the clean example; ``corrupt.example`` is the corrupted one.
        seed: the seed that chose the corrupted city.
    """

    clean: Prompt
    corrupt: Prompt
    clean_answer: int
    corrupt_answer: int
    example: QAExample
    seed: int = 0

    @property
    def changed_positions(self) -> list[int]:
        """Token positions where the two prompts differ (inside the gold document)."""
        return torch.nonzero(self.clean.input_ids != self.corrupt.input_ids).flatten().tolist()


def _tokenizer_and_context(model_or_tokenizer):
    if hasattr(model_or_tokenizer, "cfg") and hasattr(model_or_tokenizer, "tokenizer"):
        return model_or_tokenizer.tokenizer, model_or_tokenizer.cfg.n_ctx
    return model_or_tokenizer, None


def make_counterfactual_pairs(
    model_or_tokenizer, examples: Sequence[QAExample], *, seed: int = 0
) -> list[CounterfactualPair]:
    """Pair each synthetic example with a copy whose gold document names another city.

    The replacement city is drawn (seeded) from :data:`focuslens.data.synthetic.CITIES`,
    outside the example's candidates, with as many tokens as the gold city, so the two
    token sequences have the same length and differ only at the city's tokens.

    Raises:
        DataError: if an example is not a synthetic one (gold text ``"Based in {city}."``)
            or no city aligns token by token.
    """
    tok, max_length = _tokenizer_and_context(model_or_tokenizer)
    rng = random.Random(seed)
    pairs = []
    for i, ex in enumerate(examples):
        if ex.gold is None or ex.gold.text != f"Based in {ex.answers[0]}.":
            raise DataError(
                f"examples[{i}] is not a synthetic example: its gold document must read "
                f"'Based in {{city}}.' (got {None if ex.gold is None else ex.gold.text!r}); "
                "build examples with focuslens.make_synthetic_qa."
            )
        clean = render(ex, tok, max_length=max_length)
        clean_answer = first_token_id(tok, ex.answers[0])
        taken = {first_token_id(tok, c) for c in ex.candidates} | {clean_answer}
        n_city_tokens = len(tok(" " + ex.answers[0], add_special_tokens=False)["input_ids"])
        options = [c for c in CITIES if c not in ex.candidates and c != ex.answers[0]]
        rng.shuffle(options)
        for city in options:
            if len(tok(" " + city, add_special_tokens=False)["input_ids"]) != n_city_tokens:
                continue
            corrupt_answer = first_token_id(tok, city)
            if corrupt_answer in taken:
                continue
            docs = list(ex.documents)
            docs[ex.gold_index] = Document(ex.gold.title, f"Based in {city}.")
            corrupt = render(ex.replace(documents=tuple(docs), answers=(city,)), tok, max_length=max_length)
            if corrupt.n_tokens != clean.n_tokens or corrupt.answer != clean.answer:
                continue
            diff = torch.nonzero(clean.input_ids != corrupt.input_ids).flatten()
            if len(diff) == 0 or not all(clean.gold.start <= int(p) < clean.gold.end for p in diff):
                continue
            pairs.append(CounterfactualPair(clean, corrupt, clean_answer, corrupt_answer, ex, seed))
            break
        else:
            raise DataError(
                f"examples[{i}]: no city in focuslens.data.synthetic.CITIES outside the example's "
                f"candidates tokenizes like {ex.answers[0]!r} ({n_city_tokens} tokens) with a distinct "
                "first token; use fewer documents per example or another tokenizer."
            )
    return pairs


def logit_diff(logits: Float[Tensor, "... vocab"], clean_answer: int, corrupt_answer: int) -> Tensor:
    """``logit[clean answer] − logit[corrupted answer]`` over the last dimension."""
    return logits[..., clean_answer] - logits[..., corrupt_answer]


@dataclass
class _PairRun:
    """What every method needs from one pair: the clean z at the answer rows, both LDs,
    and the corrupted prompt's prefix cache."""

    pair: CounterfactualPair
    pc: PrefixCache
    rows: slice
    z_clean: Tensor
    ld_clean: float
    ld_corrupt: float

    @property
    def gap(self) -> float:
        return self.ld_clean - self.ld_corrupt


def _prepare_pair(model, pair: CounterfactualPair) -> _PairRun:
    logits_clean, z_clean = forward_answer_z(model, pair.clean)
    pc = PrefixCache(model, pair.corrupt.input_ids, split=pair.corrupt.answer.start)
    ld = partial(logit_diff, clean_answer=pair.clean_answer, corrupt_answer=pair.corrupt_answer)
    ld_corrupt = float(ld(pc.run()[0].float()))
    rows = answer_rows(pair.corrupt, pc.offset)
    return _PairRun(pair, pc, rows, z_clean, float(ld(logits_clean)), ld_corrupt)


def _normalise(delta: Tensor, gap: float) -> Tensor:
    return delta / gap if abs(gap) > 1e-6 else torch.full_like(delta, float("nan"))


def _warn_small_gaps(gaps: Sequence[float]) -> None:
    bad = [i for i, gap in enumerate(gaps) if gap <= 0]
    if bad:
        warnings.warn(
            f"pairs {bad} have LD_clean ≤ LD_corrupt: the clean document does not move the model "
            "towards its answer, so their normalised effects are meaningless (or NaN); drop them.",
            stacklevel=3,
        )


def _patch_pairs(model, pairs, methods, *, batch_size, quiet) -> PatchingResult:
    """Prepare each pair once and run every method on it: ``methods`` maps a name to
    ``(effects_fn, heads)``."""
    if not pairs:
        raise DataError("pairs is empty: build them with make_counterfactual_pairs.")
    L, H = model.cfg.n_layers, model.cfg.n_heads
    mine = share(len(pairs))  # under a launcher: this process's pairs (focuslens.model.parallel)
    per_pair = {name: torch.full((len(mine), L, H), float("nan")) for name in methods}
    lds = []
    for b, i in enumerate(tqdm(mine, desc=" + ".join(methods), disable=quiet or not is_main(), leave=False)):
        run = _prepare_pair(model, pairs[i])
        for name, (fn, heads) in methods.items():
            per_pair[name][b] = fn(run, heads, batch_size=batch_size, shape=(L, H))
        lds.append((run.ld_clean, run.ld_corrupt))  # the KV cache is freed with run
    per_pair = {name: cat(block, len(pairs)) for name, block in per_pair.items()}
    lds = gather(lds)
    _warn_small_gaps([clean - corrupt for clean, corrupt in lds])
    meta = {
        "model": model_id(model),
        "n_pairs": len(pairs),
        "seed": pairs[0].seed,
        "metric": "normalised logit difference (LD_patched − LD_corrupt) / (LD_clean − LD_corrupt)",
        "intervention": "hook_z at the answer rows, clean → corrupted (denoising)",
        "ld_clean": [clean for clean, _ in lds],
        "ld_corrupt": [corrupt for _, corrupt in lds],
        "qids": [p.example.qid for p in pairs],
    }
    return PatchingResult(
        scores={k: v.nanmean(0) for k, v in per_pair.items()}, per_example=per_pair, metadata=meta
    )


def _exact_effects(run: _PairRun, heads, *, batch_size, shape) -> Tensor:
    logits = run_head_groups(run.pc, [[h] for h in heads], run.z_clean, run.rows, batch_size)
    ld = logit_diff(logits, run.pair.clean_answer, run.pair.corrupt_answer)
    out = torch.full(shape, float("nan"))
    out[tuple(torch.tensor(heads).T)] = _normalise(ld.cpu() - run.ld_corrupt, run.gap)
    return out


def _attribution_effects(run: _PairRun, heads, *, batch_size, shape) -> Tensor:
    """∂LD/∂z on the corrupted suffix run, through zero-valued leaves added to z."""
    n_layers = shape[0]
    leaves: dict[int, Tensor] = {}
    z_corrupt: dict[int, Tensor] = {}

    def add_leaf(z, hook, layer):
        z_corrupt[layer] = z.detach()[0, run.rows]
        leaves[layer] = torch.zeros_like(z, requires_grad=True)
        return z + leaves[layer]

    hooks = [(attn_hook(layer, "z"), partial(add_leaf, layer=layer)) for layer in range(n_layers)]
    logits = run.pc.run(hooks, grad=True)[0]
    ld = logit_diff(logits, run.pair.clean_answer, run.pair.corrupt_answer)
    grads = torch.autograd.grad(ld, [leaves[layer] for layer in range(n_layers)])
    delta = run.z_clean - torch.stack([z_corrupt[layer] for layer in range(n_layers)])  # [L, row, H, d]
    grad = torch.stack([g[0, run.rows] for g in grads])
    effects = _normalise((delta * grad).sum((1, 3)).float().cpu(), run.gap)  # [L, H]
    out = torch.full(shape, float("nan"))
    index = tuple(torch.tensor(heads).T)
    out[index] = effects[index]
    return out


_METHODS = {"exact": _exact_effects, "attribution": _attribution_effects}


def patch_heads(
    model,
    pairs: Sequence[CounterfactualPair],
    heads="all",
    *,
    ranking=None,
    methods: Sequence[str] = ("exact", "attribution"),
    batch_size: int = 16,
    quiet: bool = False,
) -> PatchingResult:
    """Exact and/or attribution patching, sharing one clean forward and one prefill per pair.

    ``heads`` (default: all; an int is the top k of ``ranking``, any selection of
    :func:`~focuslens.model.heads.resolve_heads`) are the candidates for ``"exact"``; ``"attribution"`` costs
    the same for every head, so it always scores all of them. See
    :func:`activation_patching` and :func:`attribution_patching`.
    """
    unknown = set(methods) - set(_METHODS)
    if unknown or not methods:
        raise DataError(f"methods={list(methods)}: choose from {list(_METHODS)}.")
    candidates = check_heads(model, heads, ranking)
    chosen = {m: (_METHODS[m], candidates if m == "exact" else all_heads(model)) for m in methods}
    return _patch_pairs(model, pairs, chosen, batch_size=batch_size, quiet=quiet)


def activation_patching(
    model, pairs: Sequence[CounterfactualPair], heads="all", *, ranking=None,
    batch_size: int = 16, quiet: bool = False,
) -> PatchingResult:
    """Exact denoising patch of each head's z at the answer rows (method ``"exact"``).

    Per pair: one clean forward records every head's z at the answer rows; the corrupted
    prompt's prefix is prefilled once; then the answer rows are re-run in batches of
    ``batch_size`` with batch row *i* patching ``heads[i]``. ``heads`` defaults to all heads
    (NaN elsewhere). Scores are the mean normalised effect over pairs; per-pair values are
    in ``result.per_example["exact"]``.
    """
    return patch_heads(model, pairs, heads, ranking=ranking, methods=("exact",), batch_size=batch_size, quiet=quiet)


def attribution_patching(
    model, pairs: Sequence[CounterfactualPair], *, quiet: bool = False
) -> PatchingResult:
    """First-order estimate of :func:`activation_patching` for every head (method
    ``"attribution"``): ``Σ_rows (z_clean − z_corrupt)·∂LD/∂z`` on the corrupted run,
    normalised the same way.

    One clean forward, one prefill and one answer-row forward + backward per pair. The
    numbers are TransformerLens' ``attribution_patch`` node scores summed over the answer
    rows, without its backward pass through the whole prompt.
    """
    return patch_heads(model, pairs, methods=("attribution",), quiet=quiet)


# ------------------------------------------------------------------ results
@dataclass(repr=False)
class PatchingResult(HeadResult):
    """Per-head causal effects: a ``[n_layers, n_heads]`` tensor per method (NaN where a
    head was not tried) plus per-example values and metadata (ranking, top-k, DataFrame,
    save/load: :class:`~focuslens.measure.results.HeadResult`).

    Attributes:
        scores: method -> mean over pairs/examples (``"exact"``, ``"attribution"``,
            ``"mean_ablation"``, ...). Higher means more important.
        per_example: method -> ``[n_examples, n_layers, n_heads]``.
        metadata: model, n_pairs, seed, metric, intervention, LDs, qids.
    """

    VALUES, TENSORS, KIND = "scores", ("scores", "per_example"), "method"
    FORMAT = "focuslens.PatchingResult/1"

    scores: dict[str, Float[Tensor, "layer head"]]
    per_example: dict[str, Float[Tensor, "example layer head"]] = field(default_factory=dict)
    metadata: dict = field(default_factory=dict)

    @property
    def methods(self) -> list[str]:
        return self.names

    def merge(self, other: PatchingResult) -> PatchingResult:
        """One result holding the methods of both (same model and shape)."""
        if self.shape != other.shape or self.metadata.get("model") != other.metadata.get("model"):
            raise ModelError(
                f"cannot merge results of {self.metadata.get('model')!r} {self.shape} and "
                f"{other.metadata.get('model')!r} {other.shape}."
            )
        return PatchingResult(
            {**self.scores, **other.scores},
            {**self.per_example, **other.per_example},
            {**other.metadata, **self.metadata},
        )


# ------------------------------------------------------------------ agreement
def rank_agreement(scores_a, scores_b, k: int = 20, *, absolute: bool = False) -> dict:
    """Spearman correlation and top-k overlap of two per-head maps, over the heads where
    both are finite. ``top_k_overlap`` = |top-k(a) ∩ top-k(b)| / k, each top k taken with
    :func:`~focuslens.measure.results.rank_heads` among those shared heads.

    Each side is anything :func:`~focuslens.measure.results.head_values` reads: a ``[layer, head]``
    tensor, a HeadScores (``"gold"``), a PatchingResult (its first method) or
    ``(result, name)``, so ``rank_agreement(scores, (patched, "attribution"))`` works.
    ``absolute``: compare magnitudes (a strongly negative effect counts as important).
    """
    a = head_values(scores_a, field="scores_a").detach().float().cpu()
    b = head_values(scores_b, field="scores_b").detach().float().cpu()
    if a.shape != b.shape:
        raise DataError(f"score maps differ in shape: scores_a {tuple(a.shape)} vs scores_b {tuple(b.shape)}.")
    if absolute:
        a, b = a.abs(), b.abs()
    keep = a.isfinite() & b.isfinite()
    n = int(keep.sum())
    if n < 2:
        return {"spearman": float("nan"), "top_k_overlap": float("nan"), "n": n, "k": k}
    rho = spearman(a[keep].numpy(), b[keep].numpy())
    k_eff = min(k, n)
    nan = torch.tensor(float("nan"))
    top_a = set(rank_heads(a.where(keep, nan))[:k_eff])
    top_b = set(rank_heads(b.where(keep, nan))[:k_eff])
    return {"spearman": rho, "top_k_overlap": len(top_a & top_b) / k_eff, "n": n, "k": k_eff}
