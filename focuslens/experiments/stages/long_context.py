"""Distraction at long context: accuracy and the contextual heads' gold mass from ~1k to ~8k tokens.

The paper's problem lives at long context; this stage measures it up to the model's full
context (SmolLM2: 8,192 tokens) on three tasks, with the gold first, in the middle or last
(cycled over the prompts of each length):

* ``nq``: NQ-open with 10/20/30/50 documents (the gold passage among BM25 hard negatives,
  :func:`~focuslens.data.lost_in_the_middle.make_nq_distractor_examples`), greedy answers
  scored by best-subspan EM;
* ``kv``: Lost-in-the-Middle key-value retrieval generated locally with 25/50/75/110 keys
  (their 75; their 140 keys take 10k SmolLM2 tokens, past its context), greedy answers after
  an opening ``"`` (without it SmolLM2 restates the key for 30+ tokens);
* ``needle``: a haystack of 10/20/40/80 filler documents with the needle and 4 near-miss
  needles (:mod:`focuslens.data.needle`), scored in one forward pass.

Each prompt is prefilled once up to its answer rows on the pattern-free attention path
(:mod:`focuslens.model.attention`); from that prefill the answer rows run twice: unsteered,
recording every head's attention mass from the answer rows onto each document, the gold one
and the sink (one :class:`~focuslens.measure.record.Recording`), and with split-softmax
(τ = 0.1) on the top-k contextual heads of ``ranking`` at the answer rows (as the headline
sweep: ``rows="answer"``) — does the fix still work at 8k? Results are appended to ``out_dir/long_context/progress.json``
(atomic rewrite) after each prompt, so a killed run resumes where it stopped; the
per-(task, length) slot profiles (mean mass per document slot and layer, the "attention
basin" view) are kept as running sums in ``profiles.safetensors``.
"""

from __future__ import annotations

import copy
import time
from collections.abc import Sequence
from pathlib import Path

import pandas as pd
import torch
from safetensors.torch import load_file, save

from focuslens.data import make_kv_examples, make_nq_distractor_examples, render
from focuslens.data.needle import make_needle_examples
from focuslens.data.render import candidate_token_ids
from focuslens.errors import DataError
from focuslens.experiments.stages.base import StageResult
from focuslens.io import check_unit, has_manifest, json_bytes, read_json, write_unit
from focuslens.measure.evaluate import generate_variants
from focuslens.measure.forward import best_subspan_em, position_label, score_rows
from focuslens.measure.record import Recording
from focuslens.measure.stats import wilson_interval
from focuslens.model.decode import decode_rows, greedy_tokens
from focuslens.model.heads import resolve_heads
from focuslens.model.load import model_id
from focuslens.model.prefix import PrefillStore
from focuslens.progress import tqdm
from focuslens.steer.split_softmax import SplitSoftmax

__all__ = ["LENGTHS", "long_context_examples", "run_long_context", "long_context_summary"]

#: task -> the sizes that span ~1k to ~8k SmolLM2 tokens (documents, keys, haystack documents)
LENGTHS = {"nq": (10, 20, 30, 50), "kv": (25, 50, 75, 110), "needle": (10, 20, 40, 80)}
POSITIONS = ("first", "middle", "last")
_NEW_TOKENS = {"nq": 24, "kv": 40}  # SmolLM2 restates the question first; a UUID is ~30 tokens
KV_ANSWER_PREFIX = '"'  # the assistant turn opens the value's string, so the answer is the value, not a restatement


def long_context_examples(task: str, size: int, n: int, *, seed: int = 0, nq_path=None) -> list:
    """``n`` examples of ``task`` at ``size``, the gold first / middle / last in turn."""
    index = {"first": 0, "middle": (size - 1) // 2, "last": size - 1}
    if task == "nq":
        if nq_path is None:
            raise DataError("task 'nq' needs nq_path=<the Lost-in-the-Middle NQ-open oracle file>.")
        examples = make_nq_distractor_examples(nq_path, n_documents=size, gold_positions=tuple(index.values()),
                                               seed=seed, limit=n)
        return [examples[3 * i + i % 3] for i in range(n)]  # n questions, the gold first / middle / last in turn
    out = []
    for i in range(n):
        where = POSITIONS[i % 3]
        if task == "kv":
            out += [ex.replace(answer_prefix=KV_ANSWER_PREFIX)
                    for ex in make_kv_examples(1, n_pairs=size, gold_position=where, seed=seed * 100_003 + i)]
        elif task == "needle":
            out += make_needle_examples(1, n_documents=size, gold_position=where, seed=seed * 100_003 + i)
        else:
            raise DataError(f"task={task!r}: choose one of {tuple(LENGTHS)}.")
    return out


def _spans(prompt) -> dict:
    return {"gold": prompt.gold, "sink": prompt.sink,
            **{f"slot_{i}": d for i, d in enumerate(prompt.documents)}}


def _answer(model, task: str, prompt, store: PrefillStore, hooks: list, fix=None) -> dict:
    """Correctness of one prompt from its prefill in ``store`` (the answer rows and later
    positions re-run): one next-token step for ``needle``, greedy answers otherwise; ``fix``
    steers."""
    ex = prompt.example
    pc = store.get(model, prompt.input_ids, prompt.answer.start)
    if task == "needle":
        logits = pc.run(hooks=hooks + (fix.hooks(model, prompt) if fix else []), batch=1).float().cpu()
        return score_rows(logits, candidate_token_ids(model.tokenizer, ex))[0]
    if fix is not None:
        row = generate_variants(model, [prompt], fix, max_new_tokens=_NEW_TOKENS[task], prefills=store,
                                quiet=True).iloc[0]
        return {"correct": bool(row.correct), "prediction": row.prediction}
    cache = copy.deepcopy(pc.cache)
    new = greedy_tokens(model, hooks, pc.suffix[None], cache, _NEW_TOKENS[task])
    text = decode_rows(model, new)[0]
    return {"correct": bool(best_subspan_em(text, ex.answers)), "prediction": text}


def _measure(model, task: str, ex, fix: SplitSoftmax, heads: list) -> tuple[dict, torch.Tensor]:
    """One prompt, one prefill: unsteered (with the recording) and steered; the row and the
    slot masses ``[layer, head, slot]``."""
    prompt, store = render(ex, model.tokenizer), PrefillStore()
    rec = Recording(model, "all", _spans(prompt), prompt=prompt)
    plain = _answer(model, task, prompt, store, rec.hooks())
    masses = rec.row(0)  # [layer·head, span]: gold, sink, slot_0..
    steered = _answer(model, task, prompt, store, [], fix)
    n_heads = model.cfg.n_heads
    top = torch.tensor([layer * n_heads + head for layer, head in heads])
    row = {"qid": ex.qid, "n_tokens": prompt.n_tokens, "gold_index": ex.gold_index,
           "position": position_label(ex.gold_index, ex.n_documents), "correct": plain["correct"],
           "split_correct": steered["correct"], "prediction": plain.get("prediction"),
           "split_prediction": steered.get("prediction"), "top_gold_mass": float(masses[top, 0].mean()),
           "top_sink_mass": float(masses[top, 1].mean()), "all_gold_mass": float(masses[:, 0].mean())}
    slots = masses[:, 2:].reshape(model.cfg.n_layers, n_heads, -1)  # [layer, head, slot]
    return row, slots


_PROGRESS = "focuslens long-context progress"


class _Progress:
    """The stage's resumable state: rows (JSON) and per-cell slot-mass sums (safetensors),
    saved together as one unit (:func:`focuslens.io.write_unit`)."""

    def __init__(self, folder: Path, settings: dict):
        self.folder, self.settings = folder, settings
        self.json, self.tensors = folder / "progress.json", folder / "profiles.safetensors"
        self.rows: list[dict] = []
        self.sums: dict[str, torch.Tensor] = {}
        if self.json.exists():
            if has_manifest(folder):  # both files from one save (an older run's folder has no manifest)
                check_unit(folder, kind=_PROGRESS)
            saved = read_json(self.json, "the long-context progress file")
            if saved.get("settings") != settings:
                raise DataError(f"{self.json} was written with other settings ({saved.get('settings')}); "
                                f"pass another out_dir or delete it to start over with {settings}.")
            self.rows = saved["rows"]
            self.sums = load_file(self.tensors) if self.tensors.exists() else {}

    def done(self, task: str, size: int, i: int) -> bool:
        return any(r["task"] == task and r["size"] == size and r["i"] == i for r in self.rows)

    def add(self, row: dict, slots: torch.Tensor) -> None:
        key = f"{row['task']}_{row['size']}"
        self.sums[key] = self.sums.get(key, torch.zeros_like(slots)) + slots
        self.rows.append(row)
        write_unit(self.folder, {self.tensors.name: save({k: v.contiguous() for k, v in self.sums.items()}),
                                 self.json.name: json_bytes({"settings": self.settings, "rows": self.rows})},
                   kind=_PROGRESS)  # one unit: a kill never leaves sums that count a prompt the rows do not


def run_long_context(model, ranking, *, out_dir: str | Path, tasks: Sequence[str] = tuple(LENGTHS),
                     lengths: dict | None = None, n_prompts: int = 100, k: int = 20, tau: float = 0.1,
                     seed: int = 0, nq_path=None, quiet: bool = False) -> StageResult:
    """The long-context distraction stage (module docstring); resumes from ``out_dir``, also
    with a larger ``n_prompts`` (prompt i does not depend on n)."""
    lengths = {t: [int(n) for n in (lengths or LENGTHS)[t]] for t in tasks}
    heads = resolve_heads(model, k, ranking)
    # n_prompts is not a setting: prompt i is the same for any n, so a run can be extended
    settings = {"model": model_id(model), "lengths": lengths, "k": k, "tau": tau, "seed": seed,
                "heads": [list(h) for h in heads], "rows": "answer", "new_tokens": _NEW_TOKENS,
                "kv_answer_prefix": KV_ANSWER_PREFIX}
    progress = _Progress(Path(out_dir) / "long_context", settings)
    fix = SplitSoftmax(heads, tau=tau, rows="answer")
    t0, before = time.perf_counter(), len(progress.rows)
    for task in tasks:
        for size in lengths[task]:
            examples = long_context_examples(task, size, n_prompts, seed=seed, nq_path=nq_path)
            for i, ex in enumerate(tqdm(examples, desc=f"{task} {size}", disable=quiet, leave=False)):
                if progress.done(task, size, i):
                    continue
                try:
                    row, slots = _measure(model, task, ex, fix, heads)
                except DataError as err:  # longer than the model's context: counted, not hidden
                    row, slots = {"qid": ex.qid, "skipped": str(err)}, torch.zeros(model.cfg.n_layers, model.cfg.n_heads, size)
                progress.add({"task": task, "size": size, "i": i, **row}, slots)
    elapsed = time.perf_counter() - t0
    rows = pd.DataFrame(progress.rows)
    summary = long_context_summary(rows) | {"model": model_id(model), "k": k, "tau": tau, "heads": settings["heads"],
                                            "seconds_this_run": round(elapsed, 1),
                                            "prompts_this_run": len(progress.rows) - before}
    if not quiet:
        print(long_context_table(summary))
    return StageResult("long_context", summary, tables={"long_context": rows, "long_context_slots": slot_table(rows, progress.sums)},
                       objects={"profiles": {k_: v for k_, v in progress.sums.items()}})


def slot_table(rows: pd.DataFrame, sums: dict) -> pd.DataFrame:
    """Each task's slot profile at its longest length, saved with the stage (so its figure
    redraws from disk): one row per (layer, head, slot), the mass from the answer rows onto
    that document slot summed over the ``n`` prompts of the cell."""
    frames = []
    for task, g in rows.groupby("task"):
        size = int(g["size"].max())
        key = f"{task}_{size}"
        if key not in sums:
            continue
        t = sums[key]
        layer, head, slot = torch.meshgrid(*(torch.arange(n) for n in t.shape), indexing="ij")
        frames.append(pd.DataFrame({"task": task, "size": size, "n": int((g["size"] == size).sum()),
                                    "layer": layer.flatten().numpy(), "head": head.flatten().numpy(),
                                    "slot": slot.flatten().numpy(), "mass_sum": t.flatten().float().numpy()}))
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(
        columns=["task", "size", "n", "layer", "head", "slot", "mass_sum"])


def slot_profiles(table: pd.DataFrame) -> dict:
    """:func:`slot_table` back as ``{"task_size": [layer, head, slot] sums}``."""
    out = {}
    for (task, size), g in table.groupby(["task", "size"]):
        shape = (int(g.layer.max()) + 1, int(g["head"].max()) + 1, int(g.slot.max()) + 1)
        t = torch.zeros(shape)
        t[g.layer.to_numpy(), g["head"].to_numpy(), g.slot.to_numpy()] = torch.tensor(g.mass_sum.to_numpy(dtype="float32", copy=True))
        out[f"{task}_{size}"] = t
    return out


def long_context_summary(rows: pd.DataFrame) -> dict:
    """Per task and size: n, tokens, accuracy unsteered and with split-softmax (Wilson 95 %
    CIs), the top heads' gold mass; and accuracy and gold mass by gold position."""
    out: dict = {}
    ok = rows[rows["skipped"].isna()] if "skipped" in rows.columns else rows
    for (task, size), g in ok.groupby(["task", "size"]):
        n = len(g)
        cell = {"n": n, "mean_tokens": float(g.n_tokens.mean()), "max_tokens": int(g.n_tokens.max()),
                "top_gold_mass": float(g.top_gold_mass.mean()), "top_sink_mass": float(g.top_sink_mass.mean()),
                "skipped": int(((rows.task == task) & (rows["size"] == size)).sum() - n)}
        for col, name in (("correct", "accuracy"), ("split_correct", "split_accuracy")):
            cell[name] = float(g[col].astype(float).mean())
            cell[f"{col}_ci"] = list(wilson_interval(cell[name], n))
        cell["by_position"] = {p: {"n": len(h), "accuracy": float(h.correct.mean()),
                                   "split_accuracy": float(h.split_correct.mean()),
                                   "top_gold_mass": float(h.top_gold_mass.mean())}
                               for p, h in g.groupby("position")}
        out.setdefault(task, {})[str(size)] = cell
    return {"tasks": out}


def long_context_table(summary: dict) -> str:
    lines = ["\nLong-context distraction (Wilson 95% CIs; split-softmax τ on the top-k heads at the answer rows)",
             f"{'task':>7} {'size':>5} {'n':>4} {'tokens':>7} {'accuracy':>20} {'split-softmax':>20} {'gold mass':>9}"]
    for task, cells in summary["tasks"].items():
        for size, c in cells.items():
            a, s = c["correct_ci"], c["split_correct_ci"]
            lines.append(f"{task:>7} {size:>5} {c['n']:>4} {c['mean_tokens']:>7.0f} "
                         f"{c['accuracy']:>6.2f} [{a[0]:.2f}, {a[1]:.2f}]  {c['split_accuracy']:>6.2f} "
                         f"[{s[0]:.2f}, {s[1]:.2f}]  {c['top_gold_mass']:>9.3f}")
    lines.append("\nBy gold position: accuracy -> with split-softmax (top heads' gold mass)")
    for task, cells in summary["tasks"].items():
        for size, c in cells.items():
            parts = [f"{p} {b['accuracy']:.2f} -> {b['split_accuracy']:.2f} ({b['top_gold_mass']:.3f})"
                     for p, b in c["by_position"].items()]
            lines.append(f"{task:>7} {size:>5}  " + ";  ".join(parts))
    return "\n".join(lines)
