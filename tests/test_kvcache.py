"""PrefixCache: the packed-variant path must equal a real batch, hooks included."""

from __future__ import annotations

import pytest
import torch
from conftest import get_tiny

from focuslens import make_synthetic_qa, render
from focuslens.model.prefix import PrefixCache

ARCHS = [("llama", 2), ("qwen2", 1), ("mistral", 4)]


def _prompt_cache(model, seed=0):
    prompt = render(make_synthetic_qa(1, n_documents=4, seed=seed)[0], model.tokenizer)
    return prompt, PrefixCache(model, prompt.input_ids, split=prompt.answer.start)


def _variant_hooks(model, seen):
    """Per-batch-row edits at three kinds of hook points, plus a recorder of the pattern."""
    n = 3
    scale = torch.tensor([0.0, 0.5, 2.0])

    def edit_q(q, hook):  # [batch, pos, head, d]
        return q + scale[:, None, None, None] * 0.3

    def edit_pattern(p, hook):  # [batch, head, q, key]: move mass to key 0, per row
        p = p.clone()
        w = (scale / 4)[:, None, None]
        p[..., 0] = p[..., 0] + w * (1 - p[..., 0])
        p[..., 1:] = p[..., 1:] * (1 - w[..., None])
        return p

    def edit_z(z, hook):
        z = z.clone()
        z[1, :, 0] = 0
        return z

    def record(p, hook):
        seen.append(p.detach().clone())

    return n, [
        ("blocks.0.attn.hook_rot_q", edit_q),
        ("blocks.0.attn.hook_pattern", edit_pattern),
        ("blocks.1.attn.hook_z", edit_z),
        ("blocks.1.attn.hook_pattern", record),
    ]


@torch.no_grad()
@pytest.mark.parametrize("arch,kv", ARCHS, ids=[f"{a}-kv{k}" for a, k in ARCHS])
def test_packed_variants_equal_a_real_batch(arch, kv):
    model = get_tiny(arch, kv)
    prompt, pc = _prompt_cache(model)
    seen_packed, seen_batch = [], []
    n, hooks = _variant_hooks(model, seen_packed)
    packed = pc.run(hooks, batch=n, packed=True, last_only=False)
    _, hooks = _variant_hooks(model, seen_batch)
    batched = pc.run(hooks, batch=n, packed=False, last_only=False)
    assert packed.shape == batched.shape == (n, len(pc.suffix), model.cfg.d_vocab)
    torch.testing.assert_close(packed, batched, atol=1e-4, rtol=1e-4)
    # hooks see the batch layout in both paths: [variant, head, suffix, prefix + suffix]
    assert seen_packed[0].shape == seen_batch[0].shape == (n, model.cfg.n_heads, len(pc.suffix), prompt.n_tokens)
    torch.testing.assert_close(seen_packed[0], seen_batch[0], atol=1e-5, rtol=1e-4)
    # the variants really differ, and variant 0 (no edit but z) equals an unhooked suffix run
    assert (packed[0] - packed[2]).abs().max() > 1e-3
    torch.testing.assert_close(pc.run(last_only=False)[0, -1], pc.run(batch=n)[1], atol=1e-4, rtol=1e-4)


@torch.no_grad()
def test_prefix_cache_equals_a_full_forward():
    model = get_tiny("llama", 2)
    prompt, pc = _prompt_cache(model, seed=3)
    full = model(prompt.input_ids[None])[0, prompt.answer.start :]
    torch.testing.assert_close(pc.run(last_only=False)[0], full, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(pc.run(batch=4)[3], full[-1], atol=1e-4, rtol=1e-4)
    assert pc.run().shape == (1, model.cfg.d_vocab)


def test_sliding_window_smaller_than_the_run_falls_back_to_a_batch():
    model = get_tiny("mistral", 2)
    prompt, pc = _prompt_cache(model)
    config = model.original_model.config
    old = config.sliding_window
    try:
        config.sliding_window = prompt.n_tokens + 1
        assert not pc._can_pack(4)
        assert pc._can_pack(1)
    finally:
        config.sliding_window = old
    assert pc._can_pack(4)


@torch.no_grad()
def test_a_prefill_store_serves_several_sweeps_with_one_prefill_per_prompt():
    from focuslens.directions.artifact import FocusDirections
    from focuslens.model.load import model_id
    from focuslens.model.prefix import PrefillStore
    from focuslens.steer.focus import focus_sweep
    from focuslens.steer.split_softmax import split_softmax_sweep

    model = get_tiny("llama", 2)
    examples = make_synthetic_qa(3, n_documents=4, seed=2)
    ranking = [(1, 0), (0, 2), (1, 3)]
    g = torch.Generator().manual_seed(0)
    dirs = FocusDirections(torch.randn(2, 4, 16, generator=g) * 3, torch.zeros(2, 4, 16), ranking,
                           {"model": model_id(model)})
    split = dict(ks=(1, 2), taus=(0.3,), n_random=1, rows="answer", return_logits=True, quiet=True)
    focus = dict(ks=(2,), alphas=(1.0,), rows="answer", return_logits=True, quiet=True)
    store = PrefillStore()
    shared = [split_softmax_sweep(model, examples, ranking, prefills=store, **split)[1],
              focus_sweep(model, dirs, examples, prefills=store, **focus)[1]]
    alone = [split_softmax_sweep(model, examples, ranking, **split)[1], focus_sweep(model, dirs, examples, **focus)[1]]
    for a, b in zip(shared, alone):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=0)
    assert store.per_prompt() == 1.0 and len(store.prefills) == 3 and store.uses == 6
    store.clear()
    split_softmax_sweep(model, examples, ranking, prefills=store, **split)
    assert store.per_prompt() == 2.0  # cleared caches are computed again, and counted
