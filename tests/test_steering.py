"""Split-softmax: exact identities, exact span mass, rows summing to 1, generation, sweeps."""

from __future__ import annotations

from contextlib import nullcontext

import pytest
import torch
from conftest import get_tiny

from focuslens import DataError, ModelError, evaluate_next_token, make_synthetic_qa, render
from focuslens.data import Span
from focuslens.model.heads import head_mask, head_masks
from focuslens.steer.split_softmax import (
    split_softmax,
    split_softmax_hooks,
    split_softmax_pattern,
    split_softmax_sweep,
)


def _random_pattern(b=2, h=3, q=4, k=9, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(b, h, q, k, generator=g).mul(2).softmax(-1)


# ---------------------------------------------------------------- the operation
@pytest.mark.parametrize("tau", [0.8, 0.5, 0.1])
def test_span_mass_becomes_pi_to_the_tau_and_rows_sum_to_one(tau):
    p = _random_pattern()
    span = torch.zeros(9, dtype=torch.bool)
    span[2:5] = True
    out = split_softmax_pattern(p, span, tau)
    pi = p[..., span].sum(-1)
    torch.testing.assert_close(out[..., span].sum(-1), pi**tau, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(out.sum(-1), torch.ones_like(pi), atol=1e-6, rtol=0)
    assert (out[..., span].sum(-1) > pi).all()  # tau < 1 boosts
    # relative weights inside and outside the span are kept
    inside, outside = out[..., span], out[..., ~span]
    torch.testing.assert_close(inside / inside.sum(-1, keepdim=True), p[..., span] / pi[..., None], atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(outside / outside.sum(-1, keepdim=True),
                               p[..., ~span] / (1 - pi)[..., None], atol=1e-6, rtol=1e-5)


def test_tau_one_is_exactly_the_identity_and_degenerate_rows_are_kept():
    p = _random_pattern()
    span = torch.zeros(9, dtype=torch.bool)
    span[3] = True
    assert torch.equal(split_softmax_pattern(p, span, 1.0), p)
    q = p.clone()
    q[0, 0, 0] = 0
    q[0, 0, 0, 0] = 1  # no mass on the span: pi = 0
    q[0, 0, 1] = 0
    q[0, 0, 1, 3] = 1  # all mass on the span: pi = 1
    out = split_softmax_pattern(q, span, 0.1)
    assert torch.equal(out[0, 0, :2], q[0, 0, :2])
    assert torch.isfinite(out).all()


def test_per_row_tau_broadcasts():
    p = _random_pattern(b=2)
    span = torch.zeros(2, 9, dtype=torch.bool)
    span[0, :3] = True
    span[1, 4:6] = True
    tau = torch.tensor([0.5, 1.0])[:, None, None]
    out = split_softmax_pattern(p, span, tau)
    assert torch.equal(out[1], p[1])
    torch.testing.assert_close(out[0][..., :3].sum(-1), p[0][..., :3].sum(-1) ** 0.5, atol=1e-6, rtol=1e-5)


# ---------------------------------------------------------------- hooks on a bridge
def _capture_patterns(model):
    seen = {}

    def keep(p, hook):
        seen[hook.name] = p.detach().clone()

    names = [f"blocks.{layer}.attn.hook_pattern" for layer in range(model.cfg.n_layers)]
    return seen, [(n, keep) for n in names]


@torch.no_grad()
def test_hooks_edit_only_the_chosen_heads_and_rows(tiny):
    prompt = render(make_synthetic_qa(1, n_documents=4, seed=1)[0], tiny.tokenizer)
    tokens = prompt.input_ids[None]
    heads = [(1, 0), (1, 3)]
    seen_plain, rec_plain = _capture_patterns(tiny)
    tiny.run_with_hooks(tokens, fwd_hooks=rec_plain)
    seen, rec = _capture_patterns(tiny)
    hooks = split_softmax_hooks(tiny, heads, prompt.gold, 0.3, rows=prompt.answer.start)
    tiny.run_with_hooks(tokens, fwd_hooks=hooks + rec)
    name = "blocks.1.attn.hook_pattern"
    before, after = seen_plain[name][0], seen[name][0]  # [head, q, key]
    gold, rows = prompt.gold.to_slice(), prompt.answer.to_slice()
    for h in range(tiny.cfg.n_heads):
        if h in (0, 3):
            torch.testing.assert_close(after[h, rows, gold].sum(-1), before[h, rows, gold].sum(-1) ** 0.3,
                                       atol=1e-5, rtol=1e-4)
            assert torch.equal(after[h, : prompt.answer.start], before[h, : prompt.answer.start])  # earlier rows
        else:
            assert torch.equal(after[h], before[h])
    torch.testing.assert_close(after.sum(-1), torch.ones(after.shape[:-1]), atol=1e-5, rtol=0)
    # layer 0 precedes every edit: untouched
    assert torch.equal(seen["blocks.0.attn.hook_pattern"], seen_plain["blocks.0.attn.hook_pattern"])


@torch.no_grad()
def test_tau_one_hooks_reproduce_the_logits_exactly(tiny):
    prompt = render(make_synthetic_qa(1, n_documents=4, seed=2)[0], tiny.tokenizer)
    tokens = prompt.input_ids[None]
    with split_softmax(tiny, None, prompt.gold, 1.0):
        steered = tiny(tokens)
    assert torch.equal(steered, tiny(tokens))
    with split_softmax(tiny, None, prompt.gold, 0.2):
        assert (tiny(tokens) - steered).abs().max() > 1e-4  # and tau < 1 does change them
    assert all(len(hp.fwd_hooks) == 0 for hp in tiny.hook_dict.values())  # removed on exit


@torch.no_grad()
def test_hooks_are_removed_on_error():
    model = get_tiny("llama", 2)
    with pytest.raises(RuntimeError):
        with split_softmax(model, [(0, 1)], Span(2, 5), 0.5):
            raise RuntimeError("boom")
    assert all(len(hp.fwd_hooks) == 0 for hp in model.hook_dict.values())


def _generate(model, tokens, n, cached):
    out = model.generate(tokens, max_new_tokens=n, do_sample=False, stop_at_eos=False,
                         use_past_kv_cache=cached, return_type="tokens", verbose=False)
    return out[0, tokens.shape[1] :].tolist()


@torch.no_grad()
def test_cached_and_uncached_generation_agree_with_split_softmax_on(tiny_gqa):
    prompt = render(make_synthetic_qa(1, n_documents=3, seed=0)[0], tiny_gqa.tokenizer)
    tokens = prompt.input_ids[None]
    heads = [(layer, head) for layer in range(2) for head in range(4)]
    # rows from the prompt's end on: only the generated tokens' rows are edited, so a
    # cached step (one query row at an absolute position) must find its position
    with split_softmax(tiny_gqa, heads, prompt.documents[0], 0.05, rows=prompt.n_tokens - 1):
        cached = _generate(tiny_gqa, tokens, 10, True)
        uncached = _generate(tiny_gqa, tokens, 10, False)
    assert cached == uncached
    assert cached != _generate(tiny_gqa, tokens, 10, True)  # the steering does act


@torch.no_grad()
def test_one_variant_per_batch_row_equals_separate_runs():
    model = get_tiny("qwen2", 2)
    prompt = render(make_synthetic_qa(1, n_documents=4, seed=5)[0], model.tokenizer)
    tokens = prompt.input_ids[None]
    masks = head_masks(model, [[(0, 1)], [(1, 2), (0, 0)], []])
    taus = [0.2, 0.5, 0.1]
    batched = model.run_with_hooks(tokens.expand(3, -1), fwd_hooks=split_softmax_hooks(model, masks, prompt.gold, taus))
    for v in range(3):
        with split_softmax(model, masks[v], prompt.gold, taus[v]) if masks[v].any() else nullcontext():
            torch.testing.assert_close(batched[v], model(tokens)[0], atol=1e-5, rtol=1e-5)


def test_bad_arguments_raise_clear_errors():
    model = get_tiny("llama", 2)
    with pytest.raises(DataError, match="tau"):
        split_softmax_hooks(model, [(0, 0)], Span(1, 3), 0.0)
    with pytest.raises(ModelError, match="outside"):
        head_mask(model, [(5, 0)])
    with pytest.raises(DataError, match="variants"):
        split_softmax_hooks(model, head_masks(model, [[(0, 0)], [(1, 1)]]), Span(1, 3), [0.1, 0.2, 0.3])
    with pytest.raises(DataError, match="empty"):
        model.run_with_hooks(torch.tensor([[1, 5, 6, 7]]), fwd_hooks=split_softmax_hooks(model, [(0, 0)], Span(2, 2), 0.5))


# ---------------------------------------------------------------- the sweep
@torch.no_grad()
def test_sweep_variants_and_baseline():
    model = get_tiny("llama", 2)
    examples = make_synthetic_qa(3, n_documents=4, seed=9)
    ranking = [(1, 2), (0, 3), (1, 0), (0, 1)]
    df = split_softmax_sweep(model, examples, ranking, ks=(1, 2), taus=(0.5, 0.1), n_random=2, seed=0, quiet=True)
    per_example = 1 + 2 * 2 * (1 + 2)  # baseline + k x tau x (contextual + 2 random)
    assert len(df) == 3 * per_example
    assert set(df.group) == {"none", "top", "random"}
    base = df[df.group == "none"].sort_values("example")
    plain = evaluate_next_token(model, examples, quiet=True)
    assert base.correct.tolist() == plain.correct.tolist()
    torch.testing.assert_close(torch.tensor(base.margin.to_numpy()), torch.tensor(plain.margin.to_numpy()),
                               atol=1e-4, rtol=1e-4)
    # contextual k=1 steers exactly the first head of the ranking; its gold mass was raised to pi^tau
    ctx = df[(df.group == "top") & (df.k == 1)].groupby("tau").gold_mass.mean()
    assert ctx[0.1] > ctx[0.5] > 0
    assert df[df.group == "random"].draw.nunique() == 2


# the embedded model: tests/test_headline.py pins split-softmax on SmolLM2 (top-20 vs random heads)
