"""The pattern-free attention path (focuslens.model.attention) equals the bridge's eager path.

Every measurement and intervention is run twice — on the default path (SDPA for every row,
eager rows only where a RowHook reads, HeadEdits on their heads by blocks) and inside
``eager_attention`` (the bridge's own eager forward) — on every tiny architecture (llama,
qwen2, mistral × MHA, GQA, MQA) in float64, where the two agree to 1e-6 (the eager path's
softmax is float32 even in a float64 model: that rounding is the difference), and on SmolLM2 in
float32 (measured differences ~1e-6 of the logits' scale; bound 1e-4). Guards check that the
default path really skips the T×T pattern (the hooks see the answer rows only) and that a
plain hook still gets the full pattern.
"""

from __future__ import annotations

import pytest
import torch
from conftest import TINY_CONFIGS, get_tiny

import focuslens as fl
import focuslens.model.attention as attention
from focuslens.directions.cache import collect_attention_inputs
from focuslens.model.attention import eager_attention, path_of
from focuslens.measure.record import Recording
from focuslens.model.hooks import RowHook
from focuslens.model.prefix import PrefixCache
from focuslens.model.testing import tiny_model

F64 = 1e-6  # float64 models; the bridge's eager softmax runs in float32 even then (measured ≤ 2e-7)


@pytest.fixture(scope="module", params=TINY_CONFIGS, ids=[f"{a}-kv{k}" for a, k in TINY_CONFIGS])
def tiny64(request):
    arch, kv = request.param
    model = tiny_model(arch, n_heads=4, n_kv_heads=kv, seed=0)
    return model.to(torch.float64)


def _prompt(model, n_documents=4, seed=0):
    return fl.render(fl.make_synthetic_qa(1, n_documents=n_documents, seed=seed)[0], model.tokenizer)


def _both(model, run):
    """``run()`` on the pattern-free path and on the eager path."""
    with torch.no_grad():
        fast = run()
        with eager_attention(model):
            eager = run()
    return fast, eager


def _maxdiff(a, b) -> float:
    return float((torch.as_tensor(a) - torch.as_tensor(b)).abs().max())


def test_every_tiny_layer_takes_the_pattern_free_path(tiny):
    assert set(path_of(tiny).values()) == {"pattern-free"}
    with eager_attention(tiny):
        assert set(path_of(tiny).values()) == {"eager: eager_attention()"}


def test_logits_equal_the_eager_path(tiny64):
    tokens = _prompt(tiny64).input_ids[None]
    fast, eager = _both(tiny64, lambda: tiny64(tokens))
    assert _maxdiff(fast, eager) < F64


def test_left_padding_equals_the_eager_path_on_every_real_position(tiny64):
    a, b = _prompt(tiny64, seed=0).input_ids, _prompt(tiny64, seed=1).input_ids
    n = max(len(a), len(b))
    pad = tiny64.tokenizer.pad_token_id
    tokens = torch.full((2, n), pad)
    mask = torch.zeros(2, n, dtype=torch.long)
    for row, ids in enumerate((a, b)):
        tokens[row, n - len(ids):], mask[row, n - len(ids):] = ids, 1
    fast, eager = _both(tiny64, lambda: tiny64(tokens, attention_mask=mask))
    real = mask.bool()
    assert _maxdiff(fast[real], eager[real]) < F64
    assert torch.isfinite(fast[real]).all()


def test_span_masses_equal_and_the_hooks_see_only_the_answer_rows(tiny64):
    prompt = _prompt(tiny64)
    seen = []
    rec = Recording(tiny64, "all", ("gold", "sink", "question"), prompt=prompt)
    hooks = rec.hooks() + [(h, RowHook(lambda x, hook: seen.append(tuple(x.shape)),
                                                       prompt.answer.start)) for h, _ in rec.hooks()[:1]]

    def run():
        with tiny64.hooks(fwd_hooks=hooks):
            tiny64(prompt.input_ids[None])
        return rec.tensor().clone()

    fast, eager = _both(tiny64, run)
    assert _maxdiff(fast, eager) < F64
    T, R = prompt.n_tokens, prompt.n_tokens - prompt.answer.start
    assert seen == [(1, 4, R, T), (1, 4, T, T)]  # pattern-free: the answer rows only; eager: T × T


def test_a_plain_pattern_hook_gets_the_full_pattern_and_its_edit_counts(tiny):
    tokens = _prompt(tiny).input_ids[None]
    shapes = []

    def to_first_key(p, hook):
        shapes.append(tuple(p.shape))
        out = torch.zeros_like(p)
        out[..., 0] = 1
        return out

    with torch.no_grad():
        plain = tiny(tokens)
        edited = tiny.run_with_hooks(tokens, fwd_hooks=[("blocks.0.attn.hook_pattern", to_first_key)])
    T = tokens.shape[1]
    assert shapes == [(1, 4, T, T)]
    assert _maxdiff(plain, edited) > 1e-3


@pytest.mark.parametrize("rows", ["all", "answer", "stacked"])
def test_split_softmax_equals_the_eager_path(tiny64, rows, monkeypatch):
    """rows='all': the two-SDPA reweighting; 'answer' and two stacked edits: blocks of rows."""
    monkeypatch.setattr(attention, "BLOCK_ROWS", 7)  # several blocks, a partial last one
    prompt = _prompt(tiny64)
    heads = [(0, 1), (1, 3), (1, 0)]
    ivs = [fl.SplitSoftmax(heads, tau=0.2, rows="answer" if rows == "answer" else "all")]
    if rows == "stacked":
        ivs.append(fl.SplitSoftmax([(1, 3), (1, 2)], span="question", tau=0.5))

    def run():
        with tiny64.hooks(fwd_hooks=[h for iv in ivs for h in iv.hooks(tiny64, prompt)]):
            return tiny64(prompt.input_ids[None])

    fast, eager = _both(tiny64, run)
    plain = tiny64(prompt.input_ids[None]).detach()
    assert _maxdiff(fast, eager) < F64
    assert _maxdiff(fast, plain) > 1e-4  # the edit acts


def test_split_softmax_sweep_with_probes_equals_the_eager_path(tiny64):
    examples = fl.make_synthetic_qa(2, n_documents=4, seed=3)
    scores = fl.score_heads(tiny64, examples, n_bootstrap=0, quiet=True)
    run = lambda: fl.steer.split_softmax_sweep(tiny64, examples, scores, ks=(2,), taus=(0.1, 0.5), quiet=True)  # noqa: E731
    fast, eager = _both(tiny64, run)
    for column in ("gold_logit", "gold_mass", "sink_mass"):
        assert _maxdiff(fast[column].to_numpy(), eager[column].to_numpy()) < F64, column


def test_focus_equals_the_eager_path(tiny64):
    prompt = _prompt(tiny64)
    L, H, d = tiny64.cfg.n_layers, tiny64.cfg.n_heads, tiny64.cfg.d_head
    g = torch.Generator().manual_seed(0)
    dirs = fl.FocusDirections(torch.randn(L, H, d, generator=g), torch.zeros(L, H, d), [(0, 1), (1, 2)],
                              {"model": fl.model.model_id(tiny64)})
    for rows in ("all", "answer"):
        def run():
            with fl.focus(tiny64, dirs, alpha=2.0, heads=2, rows=rows, prompt=prompt):
                return tiny64(prompt.input_ids[None])

        fast, eager = _both(tiny64, run)
        assert _maxdiff(fast, eager) < F64, rows


@pytest.mark.filterwarnings("ignore:pairs .* have LD_clean")
def test_patching_effects_equal_the_eager_path(tiny64):
    pairs = fl.causal.make_counterfactual_pairs(tiny64, fl.make_synthetic_qa(2, n_documents=4, seed=5))
    fast = fl.causal.patch_heads(tiny64, pairs, heads="all", quiet=True)
    with eager_attention(tiny64):
        eager = fl.causal.patch_heads(tiny64, pairs, heads="all", quiet=True)
    # effects are stored in float32 and normalised by LD_clean − LD_corrupt (measured ≤ 2e-5)
    assert _maxdiff(fast.scores["exact"], eager.scores["exact"]) < 1e-4


def test_training_cache_equals_the_eager_path(tiny64):
    prompts = [_prompt(tiny64, seed=s) for s in (0, 1)]
    fast, eager = _both(tiny64, lambda: collect_attention_inputs(tiny64, prompts, quiet=True))
    for name in ("q", "k", "pattern"):
        assert _maxdiff(getattr(fast, name), getattr(eager, name)) < F64, name


def test_kv_cached_generation_equals_the_eager_path(tiny64):
    prompt = _prompt(tiny64)
    tokens = prompt.input_ids[None]
    iv = fl.SplitSoftmax([(0, 1), (1, 2)], tau=0.3)

    def run():
        with iv.on(tiny64, prompt):
            logits, cache = tiny64(tokens, return_type="logits_and_cache")
            nxt = logits[:, -1:].argmax(-1)
            return torch.cat([logits[:, -1], tiny64(nxt, past_key_values=cache)[:, -1]])

    fast, eager = _both(tiny64, run)
    assert _maxdiff(fast, eager) < F64


def test_prefix_cache_runs_equal_the_eager_path():
    model = get_tiny("llama", 2)
    prompt = _prompt(model)
    rec = Recording(model, "all", ("gold",), prompt=prompt)

    def run():
        pc = PrefixCache(model, prompt.input_ids, split=prompt.answer.start)
        return pc.run(hooks=rec.hooks(), batch=1), rec.tensor().clone()

    (fast, fast_mass), (eager, eager_mass) = _both(model, run)
    assert _maxdiff(fast, eager) < 1e-5 and _maxdiff(fast_mass, eager_mass) < 1e-5


@pytest.mark.slow
def test_smollm2_pattern_free_path_equals_the_eager_path(smollm2):
    assert set(path_of(smollm2).values()) == {"pattern-free"}
    ex = fl.make_synthetic_qa(2, n_documents=10, seed=4)
    prompt = fl.render(ex[0], smollm2.tokenizer)
    tokens = prompt.input_ids[None]
    fast, eager = _both(smollm2, lambda: smollm2(tokens))
    scale = float(eager.abs().max())
    assert _maxdiff(fast, eager) < 1e-5 * scale
    masses = _both(smollm2, lambda: fl.measure.scoring.prompt_span_masses(smollm2, prompt).to_numpy())
    assert _maxdiff(*masses) < 1e-5
    iv = fl.SplitSoftmax([(20, 6), (5, 6), (14, 0)], tau=0.1)

    def steered():
        with iv.on(smollm2, prompt):
            return smollm2(tokens)[:, -1]

    fast, eager = _both(smollm2, steered)
    assert _maxdiff(fast, eager) < 1e-5 * scale
