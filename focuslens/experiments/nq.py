"""Focus directions at the paper's data size: NQ with ≥ 1,000 training questions, tested with
enough power to say yes or no (Zhu et al. §4, Table 2).

The design, one phase after the other, each resumable (a killed run continues where it
stopped, :func:`run_nq`):

1. **Data** (:func:`~focuslens.data.splits.nq_splits`): the Lost-in-the-Middle NQ oracle
   file split by question into train, validation and test; 10 documents (the gold passage
   among BM25 hard negatives without the answer); the gold at a random position for train
   and validation, at first / middle / last for test; the same test questions also at 20
   documents.
2. **Cache** the frozen model's queries, keys and answer-row patterns of every training and
   validation prompt on disk (:func:`~focuslens.directions.streamed.cache_to_disk`).
3. **Rank** heads by their contextual score on the *training* cache
   (:func:`~focuslens.directions.train.cache_scores`: no test prompt is read).
4. **Train** the directions on the cache until the validation gold mass stops improving,
   checkpointed after every epoch (:mod:`focuslens.directions.checkpoint`).
5. **Choose** (k, α) on validation by the teacher-forced log-probability of the gold answer
   (:func:`~focuslens.measure.evaluate.gold_logprob_variants`), the primary metric: graded,
   so far more powerful than exact match.
6. **Test** once on the held-out questions at 10 and 20 documents, every prompt unsteered and
   steered (paired): the log-probability over the whole (k, α) grid, and (at 10 documents,
   ``em_documents``: greedy decoding is most of the cost) for the chosen setting and each
   control greedy ``best_subspan_em`` (the paper's metric). Controls: −α;
   random directions with the same per-head norms; the same directions on random heads; the
   magnitude control (α per prompt from the sink mass the steering moves, the paper's
   revision; :class:`~focuslens.steer.focus.MagnitudeControl`); split-softmax on the same
   heads with the label (the ceiling); the gold passage alone.

Every intervention acts at the answer rows and later positions (``rows="answer"``: one
prefill per prompt serves every variant and the generations), not at every position as the
paper's; the summary says so. CIs are bootstraps over **questions**: the three positions of a
question are resampled together (:func:`~focuslens.measure.stats.paired_bootstrap_ci`).
"""

from __future__ import annotations

import hashlib
import json
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import pandas as pd
import torch
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors

from focuslens.data.render import render
from focuslens.data.splits import nq_splits
from focuslens.directions.artifact import FocusDirections
from focuslens.directions.streamed import cache_to_disk
from focuslens.directions.train import cache_scores, train_directions
from focuslens.errors import DataError
from focuslens.experiments.pieces import Pieces
from focuslens.io import has_manifest, locked, read_json, write_atomic, write_json
from focuslens.measure.evaluate import evaluate_generation, generate_variants, gold_logprob_variants
from focuslens.measure.forward import teacher_forced_ids
from focuslens.measure.scoring import prepare_prompts
from focuslens.model.heads import head_masks
from focuslens.model.intervention import Combined
from focuslens.model.load import model_id
from focuslens.model.prefix import PrefillStore
from focuslens.steer.focus import Focus, MagnitudeControl
from focuslens.steer.split_softmax import SplitSoftmax

__all__ = ["NQSettings", "run_nq", "CONTROLS"]

#: the conditions every test prompt runs besides the unsteered model, in the tables' order
CONTROLS = ("focus", "negative_alpha", "random_directions", "random_heads", "magnitude_control", "split_softmax")


@dataclass
class NQSettings:
    """Sizes and knobs of the NQ experiment (defaults: the run behind the README)."""

    nq_path: str = ""
    n_train: int = 1000
    n_validation: int = 150
    n_test: int = 300
    n_documents: int = 10
    test_documents: tuple[int, ...] = (10, 20)
    epochs: int = 10
    lr: float = 1e-3
    patience: int = 2
    batch_size: int = 1
    cache_dtype: str = "bfloat16"
    ks: tuple[int, ...] = (5, 10, 20, 50)
    alphas: tuple[float, ...] = (0.25, 0.5, 1.0, 2.0, 4.0)
    tau: float = 0.1
    max_new_tokens: int = 16
    #: document counts whose test prompts also get greedy answers (EM); the others: log-prob only
    em_documents: tuple[int, ...] = (10,)
    n_bootstrap: int = 2000
    piece: int = 8
    seed: int = 0

    def __post_init__(self) -> None:
        if not self.nq_path or not Path(self.nq_path).is_file():
            raise DataError(f"nq_path={self.nq_path!r}: no such file (the Lost-in-the-Middle NQ oracle file).")
        for name in ("n_train", "n_validation", "n_test", "n_documents", "epochs", "patience", "batch_size",
                     "max_new_tokens", "piece"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise DataError(f"{name}={value!r} must be a positive integer.")
        if not set(self.em_documents) <= set(self.test_documents):
            raise DataError(f"em_documents={list(self.em_documents)} must be among test_documents="
                            f"{list(self.test_documents)}.")
        if self.n_documents not in self.test_documents:
            raise DataError(f"test_documents={list(self.test_documents)} must include n_documents={self.n_documents} "
                            "(the setting is chosen there).")
        if not self.ks or not self.alphas or any(a <= 0 for a in self.alphas) or any(k < 1 for k in self.ks):
            raise DataError(f"ks={list(self.ks)} and alphas={list(self.alphas)}: positive values, at least one each.")
        if not 0 < self.tau <= 1:
            raise DataError(f"tau={self.tau!r} must be in (0, 1].")

    def record(self) -> dict:
        return json.loads(json.dumps(asdict(self)))


class _Costs:
    """Seconds per phase, added up over invocations, and each invocation's wall time (kept
    up to date every 30 s by a thread, so a killed invocation's time still counts), in
    ``costs.json`` of the work folder. Every write re-reads the file under the folder's lock,
    so invocations running at the same time (two workers) each keep their own entry."""

    def __init__(self, path: Path):
        self.path, self._added, self._set = path, {}, {}
        self._t0, self._lock, self._stop = time.perf_counter(), threading.Lock(), threading.Event()
        with locked(path.parent):
            saved = self._read()
            saved["invocations"].append(0.0)
            self._index = len(saved["invocations"]) - 1
            write_json(path, saved, indent=1)
        threading.Thread(target=self._tick, daemon=True).start()

    def _read(self) -> dict:
        saved = read_json(self.path, "the NQ run's costs.json") if self.path.is_file() else {}
        return {"phases": saved.get("phases", {}), "invocations": saved.get("invocations", [])}

    def _tick(self) -> None:
        while not self._stop.wait(30):
            self._write()

    def close(self) -> None:
        """The last write; the thread stops."""
        self._stop.set()
        self._write()

    def _write(self) -> dict:
        with self._lock, locked(self.path.parent):
            saved = self._read()
            for phase, seconds in self._added.items():
                saved["phases"][phase] = saved["phases"].get(phase, 0.0) + seconds
            saved["phases"].update(self._set)
            self._added = {}
            saved["invocations"][self._index] = time.perf_counter() - self._t0
            write_json(self.path, saved, indent=1)
            return saved

    def add(self, phase: str, seconds: float) -> None:
        """Add ``seconds`` to a phase (its time in this invocation)."""
        with self._lock:
            self._added[phase] = self._added.get(phase, 0.0) + seconds
        self._write()

    def set(self, phase: str, seconds: float) -> None:
        """A phase's total over every invocation, known from elsewhere (a run of pieces)."""
        with self._lock:
            self._set[phase] = float(seconds)

    def report(self) -> dict:
        """The phases and ``total``: every invocation's wall time (model loading included)."""
        saved = self._write()
        return {**saved["phases"], "invocations": len(saved["invocations"]), "total": float(sum(saved["invocations"]))}


# ------------------------------------------------------------------ phases 2-4: the directions
def _directions(model, s: NQSettings, splits: dict, work: Path, costs: _Costs, quiet: bool):
    """The trained directions (loaded when a finished run saved them), their ranking and
    the training prompts' contextual scores."""
    saved = work / "directions"
    t0 = time.perf_counter()
    train_p = prepare_prompts(model, splits["train"], quiet=quiet)
    val_p = prepare_prompts(model, splits["validation"], quiet=quiet)
    train_in = cache_to_disk(model, train_p, work / "cache" / "train", dtype=s.cache_dtype, quiet=quiet)
    val_in = cache_to_disk(model, val_p, work / "cache" / "validation", dtype=s.cache_dtype, quiet=quiet)
    costs.add("cache", time.perf_counter() - t0)
    t0, saved_scores = time.perf_counter(), work / "cache" / "train" / "scores.safetensors"  # goes with its cache
    if saved_scores.is_file():  # read once: the whole training cache is gigabytes
        scores = load_safetensors(saved_scores.read_bytes())["gold"]
    else:
        scores = cache_scores(train_in)
        write_atomic(saved_scores, save_safetensors({"gold": scores.contiguous()}))
    idx = torch.argsort(scores.flatten(), descending=True, stable=True).tolist()
    ranking = [(i // scores.shape[1], i % scores.shape[1]) for i in idx]
    costs.add("rank", time.perf_counter() - t0)
    if has_manifest(saved):
        return FocusDirections.load(saved, model=model), scores
    t0 = time.perf_counter()
    dirs = train_directions(model, train_p, val_p, inputs=(train_in, val_in), epochs=s.epochs, lr=s.lr,
                            patience=s.patience, batch_size=s.batch_size, seed=s.seed, ranking=ranking,
                            checkpoint=work / "checkpoint", quiet=quiet,
                            data=f"NQ oracle, {s.n_documents} documents, BM25 hard negatives, gold at random "
                                 f"positions; train questions {s.n_train} (seed {s.seed})")
    dirs.save(saved)
    costs.add("train", time.perf_counter() - t0)
    return dirs, scores


def _random_controls(model, dirs: FocusDirections, k: int, seed: int) -> tuple[FocusDirections, list]:
    """Random directions with every head's own ‖d_q‖ (seeded Gaussian, renormalised), and
    ``k`` heads drawn at random outside the top k."""
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(dirs.q.shape, generator=g)
    q = q / q.norm(dim=-1, keepdim=True) * dirs.q.float().norm(dim=-1, keepdim=True)
    rand = FocusDirections(q, torch.zeros_like(q), dirs.ranking(), dirs.metadata | {"source": "random control"})
    rest = dirs.ranking()[k:]
    pick = torch.randperm(len(rest), generator=g)[:k].tolist()
    return rand, [rest[i] for i in sorted(pick)]


# ------------------------------------------------------------------ phases 5-6: the grid and the test
def _grid(model, dirs, ranking, s: NQSettings, extra_alphas=(), ks=None):
    """The (k, α) grid of one sweep (every ``s.ks``, or only ``ks``) as a Focus value and its
    ``[variant, layer, head]`` masks."""
    alphas = sorted({0.0, *map(float, s.alphas), *map(float, extra_alphas)})
    ks = [k for k in (s.ks if ks is None else ks) if k <= len(ranking)]
    grid = [(k, a) for k in ks for a in alphas]
    masks = head_masks(model, [ranking[:k] for k, _ in grid])
    table = pd.DataFrame(grid, columns=["k", "alpha"])
    return Focus(dirs, torch.tensor([a for _, a in grid]), masks, rows="answer"), masks, table


def _logprob_grid(model, dirs, ranking, prompts, s, store, extra_alphas=()) -> pd.DataFrame:
    iv, masks, meta = _grid(model, dirs, ranking, s, extra_alphas)
    df = gold_logprob_variants(model, prompts, iv, probe_heads=masks, prefills=store, quiet=True)
    return df.join(meta, on="variant").assign(condition="grid")


def _validation_piece(model, dirs, ranking, s):
    def fn(prompts, start):
        store = PrefillStore()
        return _logprob_grid(model, dirs, ranking, prompts, s, store).assign(example=lambda d: d.example + start)
    return fn


def _choice(val: pd.DataFrame) -> tuple[int, float]:
    """The (k, α > 0) with the highest mean validation log-probability of the gold answer."""
    table = val[val.alpha > 0].groupby(["k", "alpha"]).gold_logprob.mean()
    k, a = table.idxmax()
    return int(k), float(a)


def _test_piece(model, dirs, ranking, s: NQSettings, chosen, mc: MagnitudeControl, generate: bool = True,
                full_grid: bool = True):
    """Per piece of test prompts, from one prefill per prompt: the log-prob of the grid
    (with −α; every k with ``full_grid``, else only the chosen k's α column, which is all
    the report and the magnitude control read) and of the controls, as the rows of one
    packed run; then (``generate``) the greedy answers of the unsteered model, the chosen
    setting and every control, as the rows of one batched generation (the magnitude
    control's α read from the prompt's own grid)."""
    k, a = chosen
    rand_dirs, rand_heads = _random_controls(model, dirs, k, s.seed)
    top, other = head_masks(model, [ranking[:k]]), head_masks(model, [rand_heads])
    none = torch.zeros_like(top)
    iv, masks, meta = _grid(model, dirs, ranking, s, extra_alphas=(-a,), ks=None if full_grid else (k,))
    G = len(meta)
    # rows: the grid, random directions, random heads, split-softmax, and the random heads unsteered
    # (a row of the model as it is, probing the random heads: their attention before steering)
    logprob = Combined(Focus(dirs, torch.tensor([*iv.alpha.tolist(), 0.0, a, 0.0, 0.0]),
                             torch.cat([masks, none, other, none, none]), rows="answer"),
                       Focus(rand_dirs, a, torch.cat([none.expand(G, -1, -1), top, none, none, none]), rows="answer"),
                       SplitSoftmax(torch.cat([none.expand(G + 2, -1, -1), top, none]), tau=s.tau, rows="answer"))
    probes = torch.cat([masks, top, other, top, other])
    meta = pd.concat([meta.assign(condition="grid"), pd.DataFrame(
        {"k": k, "alpha": [a, a, s.tau, 0.0],
         "condition": ["random_directions", "random_heads", "split_softmax", "random_heads_unsteered"]})],
        ignore_index=True)
    names = ["unsteered", "focus", "negative_alpha", "magnitude_control", "random_heads", "random_directions",
             "split_softmax"]

    def generation(alpha_mc: float) -> Combined:
        return Combined(Focus(dirs, torch.tensor([0.0, a, -a, alpha_mc, a, 0.0, 0.0]),
                              torch.cat([top, top, top, top, other, none, none]), rows="answer"),
                        Focus(rand_dirs, a, torch.cat([none.expand(5, -1, -1), top, none]), rows="answer"),
                        SplitSoftmax(torch.cat([none.expand(6, -1, -1), top]), tau=s.tau, rows="answer"))

    def fn(prompts, start):
        store = PrefillStore()
        table = gold_logprob_variants(model, prompts, logprob, probe_heads=probes, prefills=store, quiet=True)
        table = table.join(meta, on="variant").assign(kind="logprob")
        mc_alpha = _mc_alphas(table[table.condition == "grid"], mc)
        out = [table]
        for i, p in enumerate(prompts if generate else []):
            gen = generate_variants(model, [p], generation(mc_alpha[i]), max_new_tokens=s.max_new_tokens,
                                    prefills=store, quiet=True)
            alphas = [0.0, a, -a, mc_alpha[i], a, a, s.tau]
            out.append(gen.assign(example=i, k=k, kind="generation", condition=[names[v] for v in gen.variant],
                                  alpha=[alphas[v] for v in gen.variant]))
        table = pd.concat(out, ignore_index=True)
        return table.assign(example=table.example + start)

    return fn


def _mc_alphas(grid: pd.DataFrame, mc: MagnitudeControl) -> list[float]:
    """The magnitude control's α for each prompt of a piece, from its grid's sink masses."""
    chosen = mc.apply_to_sweep(grid[grid.alpha >= 0])
    return chosen.sort_values("example").alpha.astype(float).tolist()


def _gold_alone(model, s: NQSettings):
    """Per piece of gold-only prompts (one per test question): log-prob and greedy EM."""
    def fn(examples, start):
        lp = gold_logprob_variants(model, examples, None, quiet=True)
        em = evaluate_generation(model, examples, max_new_tokens=s.max_new_tokens, quiet=True)
        lp = lp.assign(correct=em.correct.to_numpy(), prediction=em.prediction.to_numpy())
        return lp.assign(example=lp.example + start)
    return fn


def _items(examples) -> str:
    """A fingerprint of a list of examples (question, gold position, documents)."""
    key = [(ex.qid, ex.gold_index, ex.n_documents, ex.documents[0].title) for ex in examples]
    return hashlib.sha256(json.dumps(key).encode()).hexdigest()[:16]


def _digest(dirs: FocusDirections) -> str:
    """A fingerprint of the directions and their ranking (results of other directions are others)."""
    h = hashlib.sha256(dirs.q.float().numpy().tobytes())
    h.update(json.dumps(dirs.ranking()).encode())
    return h.hexdigest()[:16]


def check_teacher_forcing(model, splits: dict) -> None:
    """Every validation and test prompt followed by its gold answer tokenizes as the prompt
    and then the answer (:func:`~focuslens.measure.forward.teacher_forced_ids`): checked
    before hours of running, not when the prompt's turn comes."""
    examples = [*splits["validation"], *(ex for exs in splits["test"].values() for ex in exs)]
    for ex in examples:
        teacher_forced_ids(model.tokenizer, render(ex, model.tokenizer, max_length=model.cfg.n_ctx))


def run_nq(model, settings: NQSettings, *, out_dir: str | Path = "figures", work_dir: str | Path = "runs/nq_work",
           quiet: bool = False) -> dict:
    """The whole experiment (module docstring). ``work_dir`` keeps what a resumed run needs
    (the training cache, ≈ 16 MB per prompt in bfloat16; the trainer's checkpoint; each
    finished piece of the validation and test runs); ``out_dir`` receives the directions, the
    tables, the figure and the ``"nq_focus"`` section of ``summary.json``
    (:func:`focuslens.experiments.nq_report.write_nq`). Returns the summary section."""
    from focuslens.experiments.nq_report import nq_summary, write_nq

    s, work = settings, Path(work_dir)
    # each phase checks what it depends on (the cache its prompts, the checkpoint its settings,
    # each run of pieces its settings, items and directions): a changed setting redoes only those
    identity = {"model": model_id(model), "settings": s.record()}
    write_json(work / "run.json", identity, indent=1)
    costs = _Costs(work / "costs.json")
    try:
        splits = nq_splits(s.nq_path, n_train=s.n_train, n_validation=s.n_validation, n_test=s.n_test,
                           n_documents=s.n_documents, test_documents=s.test_documents, seed=s.seed)
        dirs, scores = _directions(model, s, splits, work, costs, quiet)
        ranking = dirs.ranking()
        check_teacher_forcing(model, splits)
        runs = {"validation": identity | {"directions": _digest(dirs), "items": _items(splits["validation"])}}
        val = Pieces(work / "validation", runs["validation"], size=s.piece).run(
            splits["validation"], _validation_piece(model, dirs, ranking, s), desc="NQ validation grid", quiet=quiet)
        chosen = _choice(val)
        mc = MagnitudeControl.fit(val, k=chosen[0], alpha=chosen[1], grid=list(s.alphas))
        tests = {}
        for n_docs in s.test_documents:
            runs[f"test_{n_docs}"] = runs["validation"] | {"chosen": list(chosen), "items": _items(splits["test"][n_docs])}
            piece = Pieces(work / f"test_{n_docs}", runs[f"test_{n_docs}"], size=s.piece)
            # the full grid where the setting was chosen; elsewhere the chosen k only (a third of the rows)
            fn = _test_piece(model, dirs, ranking, s, chosen, mc, generate=n_docs in s.em_documents,
                             full_grid=n_docs == s.n_documents)
            tests[n_docs] = piece.run(splits["test"][n_docs], fn,
                                      desc=f"NQ test, {n_docs} documents", quiet=quiet)
        unique = list({ex.qid: ex.gold_only() for ex in splits["test"][s.n_documents]}.values())
        runs["gold_alone"] = identity | {"items": _items(unique)}
        alone = Pieces(work / "gold_alone", runs["gold_alone"], size=s.piece).run(unique, _gold_alone(model, s),
                                                                                  desc="NQ gold alone", quiet=quiet)
        for name, run in runs.items():  # each piece's own time, over every invocation
            costs.set(name, Pieces(work / name, run, size=s.piece).seconds())
        summary = nq_summary(s, splits, dirs, scores, val, tests, alone, chosen, mc, costs.report())
        if out_dir is not None:
            write_nq(Path(out_dir), summary, dirs, val, tests, alone)
        return summary
    finally:
        costs.close()
