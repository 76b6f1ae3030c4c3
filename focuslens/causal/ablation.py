"""Ablation: which heads the answer needs, without a counterfactual.

Replace a head's output ``z`` at the answer rows with zero or with its dataset mean
(:func:`mean_answer_z`) and measure the drop of the gold-vs-best-other-candidate margin and
of accuracy (:func:`ablate_heads`). Contextual heads are redundant, so single heads matter
little: :func:`ablate_head_groups` ablates the top-k heads of a ranking together, against
random sets of k heads from outside the top k.

>>> ablate_head_groups(model, examples, scores.ranking(), ks=(5, 10, 20), n_random=3)   # doctest: +SKIP
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from functools import partial

import pandas as pd
import torch
from jaxtyping import Float
from torch import Tensor

from focuslens.causal.engine import answer_rows, check_heads, forward_answer_z, run_head_groups
from focuslens.causal.patching import PatchingResult
from focuslens.data.examples import QAExample
from focuslens.data.render import Prompt, candidate_token_ids, render
from focuslens.errors import DataError
from focuslens.model.heads import Head, top_and_random
from focuslens.model.hooks import attn_hook
from focuslens.model.intervention import HeadIntervention
from focuslens.model.load import model_id
from focuslens.model.parallel import is_main
from focuslens.model.prefix import PrefixCache
from focuslens.progress import tqdm

__all__ = ["Ablate", "ablate_heads", "ablate_head_groups", "mean_answer_z", "ABLATIONS"]

ABLATIONS = ("mean", "zero")


@dataclass
class _ExampleRun:
    prompt: Prompt
    pc: PrefixCache
    rows: slice
    gold: int
    others: list[int]
    logits_clean: Tensor
    z: Tensor  # [L, row, H, d] at the answer rows, clean run


def _prepare_example(model, prompt: Prompt) -> _ExampleRun:
    pc = PrefixCache(model, prompt.input_ids, split=prompt.answer.start)
    rows = answer_rows(prompt, pc.offset)
    store: dict[int, Tensor] = {}

    def keep(z, hook, layer):
        store[layer] = z[0, rows].detach().clone()

    logits = pc.run([(attn_hook(layer, "z"), partial(keep, layer=layer)) for layer in range(model.cfg.n_layers)])
    gold, others = candidate_token_ids(model.tokenizer, prompt.example)
    z = torch.stack([store[layer] for layer in range(model.cfg.n_layers)])
    return _ExampleRun(prompt, pc, rows, gold, others, logits[0].float(), z)


def _margin_and_correct(logits: Tensor, run: _ExampleRun) -> tuple[Tensor, Tensor, Tensor]:
    """Gold-minus-best-other-candidate margin, top-1 correctness (bool), candidate
    correctness (1.0 / 0.0); margin and candidate correctness are NaN without candidates."""
    gold = logits[..., run.gold]
    correct = logits.argmax(-1) == run.gold
    if not run.others:
        return torch.full_like(gold, math.nan), correct, torch.full_like(gold, math.nan)
    best_other = logits[..., run.others].max(-1).values
    return gold - best_other, correct, (gold > best_other).float()


def mean_answer_z(model, prompts: Sequence[Prompt]) -> Float[Tensor, "layer head d_head"]:
    """Every head's mean z over the answer rows of ``prompts`` (the mean-ablation value)."""
    zs = [forward_answer_z(model, p)[1] for p in prompts]
    return torch.cat(zs, dim=1).mean(1)


def _ablation_runs(model, examples, mode, mean_z, quiet, desc) -> tuple[Iterator[_ExampleRun], Tensor | None]:
    """Yield prepared examples; the mean ablation value needs every example first, so
    then the prefix caches are all kept in memory (pass ``mean_z`` to stream instead)."""
    if mode not in ABLATIONS:
        raise DataError(f"mode={mode!r}: use one of {ABLATIONS}.")
    if not examples:
        raise DataError("examples is empty: nothing to ablate.")
    prompts = [render(ex, model.tokenizer, max_length=model.cfg.n_ctx) for ex in examples]
    runs: Iterable[_ExampleRun] = (_prepare_example(model, p) for p in prompts)
    if mode == "mean" and mean_z is None:
        runs = [r for r in tqdm(runs, total=len(prompts), desc="prefill", disable=quiet or not is_main(), leave=False)]
        mean_z = torch.cat([r.z for r in runs], dim=1).mean(1)
    return iter(tqdm(runs, total=len(prompts), desc=desc, disable=quiet or not is_main(), leave=False)), mean_z


def _ablation_source(mode: str, mean_z: Tensor | None, run: _ExampleRun) -> Tensor:
    n_rows = run.z.shape[1]
    if mode == "zero":
        return torch.zeros_like(run.z)
    return mean_z[:, None].to(run.z).expand(-1, n_rows, -1, -1)


def ablate_heads(
    model, examples: Sequence[QAExample], heads="all", *, ranking=None,
    mode: str = "mean", mean_z: Tensor | None = None, batch_size: int = 16, quiet: bool = False,
) -> PatchingResult:
    """Ablate one head at a time at the answer rows of (distracted) prompts.

    Methods in the result (higher = the head matters more):

    * ``"{mode}_ablation"``: drop of the gold-vs-best-other-candidate logit margin
      (clean margin − ablated margin), mean over examples;
    * ``"{mode}_ablation_accuracy"``: drop of top-1 accuracy.

    ``mode="mean"`` replaces z with the head's mean z over the answer rows of ``examples``
    (or ``mean_z`` [layer, head, d_head] if given, e.g. from :func:`mean_answer_z` on a
    reference set); ``mode="zero"`` with zeros. Without ``mean_z``, every example's prefix
    KV cache is kept until the mean is known (about 18 MB per 400-token SmolLM2 prompt);
    pass ``mean_z`` to stream one example at a time.
    """
    heads = check_heads(model, heads, ranking)
    L, H = model.cfg.n_layers, model.cfg.n_heads
    margin = torch.full((len(examples), L, H), float("nan"))
    accuracy = margin.clone()
    runs, mean_z = _ablation_runs(model, examples, mode, mean_z, quiet, f"{mode}-ablate heads")
    index = tuple(torch.tensor(heads).T)
    for i, run in enumerate(runs):
        source = _ablation_source(mode, mean_z, run)
        logits = run_head_groups(run.pc, [[h] for h in heads], source, run.rows, batch_size)
        run.pc = None
        m_clean, c_clean, _ = _margin_and_correct(run.logits_clean, run)
        m, c, _ = _margin_and_correct(logits.cpu(), run)
        margin[i][index] = m_clean - m
        accuracy[i][index] = c_clean.float() - c.float()
    name = f"{mode}_ablation"
    per = {name: margin, f"{name}_accuracy": accuracy}
    meta = {
        "model": model_id(model),
        "n_pairs": len(examples),
        "seed": int(examples[0].meta.get("seed", 0)),
        "metric": "drop of the gold − best-other-candidate margin (and of top-1 accuracy)",
        "intervention": f"{mode} ablation of hook_z at the answer rows",
        "qids": [ex.qid for ex in examples],
    }
    return PatchingResult(scores={k: v.nanmean(0) for k, v in per.items()}, per_example=per, metadata=meta)


def ablate_head_groups(
    model, examples: Sequence[QAExample], ranking: Sequence[Head] | dict[str, Sequence[Head]], *,
    ks: Sequence[int] = (5, 10, 20), n_random: int = 5, mode: str = "mean",
    mean_z: Tensor | None = None, seed: int = 0, batch_size: int = 16, quiet: bool = False,
) -> pd.DataFrame:
    """Ablate the top-k heads of ``ranking`` together, and ``n_random`` random sets of k
    heads (drawn, seeded, from the heads outside the top k), for each k in ``ks``.

    ``ranking`` may be a dict name -> ranking: every group of every ranking then runs on one
    prefill per example and one ``mean_z`` (the random draws of each ranking are seeded as
    if it ran alone). Returns one row per group: ``ranking`` (with a dict), ``group``
    ("none", "top" or "random"), ``k``, ``draw``, ``mode``, mean ``margin``,
    ``margin_drop`` (vs no ablation), ``correct`` and ``candidate_correct`` (means over the
    examples, the columns of :func:`~focuslens.measure.evaluate.evaluate_next_token`) and the
    ablated ``heads``. ``ranking``: any ranking source (:func:`~focuslens.model.heads.ranking_of`)
    or a dict of them.
    """
    named = ranking if isinstance(ranking, dict) else {None: ranking}
    # one block per ranking, each led by the unablated run: the same batches as a run of
    # that ranking alone, so the numbers match it exactly
    blocks = [[(name, "none", 0, 0, [])] + [(name, *g) for g in top_and_random(model, r, ks, n_random, seed)]
              for name, r in named.items()]
    groups = [g for block in blocks for g in block]
    margin, correct, cand = [], [], []
    runs, mean_z = _ablation_runs(model, examples, mode, mean_z, quiet, f"{mode}-ablate groups")
    for run in runs:
        source = _ablation_source(mode, mean_z, run)
        logits = torch.cat([run_head_groups(run.pc, [g[4] for g in block], source, run.rows, batch_size)
                            for block in blocks])
        run.pc = None
        m, c, cc = _margin_and_correct(logits.cpu(), run)
        margin.append(m), correct.append(c.float()), cand.append(cc.float())
    margin, correct, cand = (torch.stack(x).nanmean(0) for x in (margin, correct, cand))  # NaN: no candidates
    rows = [
        {
            **({"ranking": name} if isinstance(ranking, dict) else {}),
            "group": g, "k": k, "draw": d, "mode": mode,
            "margin": float(margin[j]), "margin_drop": float(margin[0] - margin[j]),
            "correct": float(correct[j]), "candidate_correct": float(cand[j]),
            "heads": [list(h) for h in heads],
        }
        for j, (name, g, k, d, heads) in enumerate(groups)
        if g != "none" or j == 0  # one unablated row
    ]
    out = pd.DataFrame(rows).assign(n_examples=len(examples), seed=seed)
    if isinstance(ranking, dict):
        out.loc[0, "ranking"] = None
    return out


@dataclass
class Ablate(HeadIntervention):
    """Head ablation as an intervention value: each chosen head's output ``z`` becomes
    ``scale·z + (1 − scale)·mean_z`` at ``rows`` (``scale=0``: zero ablation, or mean
    ablation with ``mean_z`` ``[layer, head, d_head]`` from :func:`mean_answer_z`;
    ``scale=1``: the identity). Usable like every intervention: ``with iv.on(model, prompt):``,
    ``evaluate_next_token(..., intervention=iv)`` and the variant engine (one scale per
    variant). With ``rows="answer"``, a pass over the whole prompt edits its answer rows and
    every later position; a pass that starts later (a prefix-cache suffix, a generated
    token) lies wholly after the prompt's answer start and is edited whole.
    """

    heads: object = 20
    ranking: object = None
    scale: object = 0.0
    mean_z: Tensor | None = None
    rows: object = "all"  # the one default of every intervention; the ablation engine's rows are "answer"

    STRENGTH = "scale"

    def variant_hooks(self, model, prompt, masks: Tensor, strength: Tensor) -> list:
        if self.rows not in ("all", "answer"):
            raise DataError(f"rows={self.rows!r}: an ablation acts at rows='all' or rows='answer'.")
        if self.rows == "answer" and prompt is None:
            raise DataError("rows='answer' needs the prompt whose answer rows it means: pass prompt=.")
        hooks = []
        for layer in masks.any(0).any(-1).nonzero().flatten().tolist():
            keep = torch.where(masks[:, layer], strength[:, None], torch.ones(()))  # [variant, head]

            def edit(z, hook, keep=keep, layer=layer):  # z: [batch, pos, head, d_head]
                k = keep.to(z)[:, None, :, None]
                if self.rows == "answer" and z.shape[1] == prompt.n_tokens:  # a pass from position 0
                    on = (torch.arange(z.shape[1], device=z.device) >= prompt.answer.start)[None, :, None, None]
                    k = torch.where(on, k, torch.ones((), dtype=z.dtype, device=z.device))
                mean = self.mean_z[layer].to(z) if self.mean_z is not None else torch.zeros((), dtype=z.dtype,
                                                                                              device=z.device)
                return k * z + (1 - k) * mean

            hooks.append((attn_hook(layer, "z"), edit))
        return hooks
