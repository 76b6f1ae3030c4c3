"""Focus directions: exact identities, inert key vectors, faithful cached training, artifacts."""

from __future__ import annotations

import json
from contextlib import nullcontext

import pandas as pd
import pytest
import torch
from conftest import get_tiny

from focuslens import DataError, ModelError, evaluate_next_token, make_synthetic_qa, render
from focuslens.directions.artifact import FocusDirections, import_release
from focuslens.directions.cache import collect_attention_inputs
from focuslens.model.attention import eager_attention
from focuslens.directions.train import span_attention, train_directions
from focuslens.measure.scoring import prepare_prompts
from focuslens.model.heads import head_masks
from focuslens.steer.focus import MagnitudeControl, best_setting, focus, focus_hooks, focus_sweep


def _random_directions(model, scale=1.0, seed=0, ranking=None):
    g = torch.Generator().manual_seed(seed)
    shape = (model.cfg.n_layers, model.cfg.n_heads, model.cfg.d_head)
    from focuslens.model.load import model_id

    return FocusDirections(torch.randn(shape, generator=g) * scale, torch.randn(shape, generator=g) * scale,
                           ranking or [], {"model": model_id(model)})


def _tokens(model, seed=0, n_documents=4):
    return render(make_synthetic_qa(1, n_documents=n_documents, seed=seed)[0], model.tokenizer).input_ids[None]


# ---------------------------------------------------------------- identities and the key no-op
@torch.no_grad()
def test_alpha_zero_reproduces_the_logits_exactly(tiny):
    dirs = _random_directions(tiny, scale=3.0)
    tokens = _tokens(tiny)
    with focus(tiny, dirs, alpha=0.0, heads=None):
        queries_only = tiny(tokens)  # hooks on hook_rot_q only: the pattern-free path
    assert torch.equal(queries_only, tiny(tokens))
    with focus(tiny, dirs, alpha=0.0, heads=None, keys=True):
        steered = tiny(tokens)  # a hook on hook_attn_scores: every layer runs eagerly
    with eager_attention(tiny):
        assert torch.equal(steered, tiny(tokens))
    with focus(tiny, dirs, alpha=1.0, heads=None):
        assert (tiny(tokens) - steered).abs().max() > 1e-3  # a non-zero alpha acts
    assert all(len(hp.fwd_hooks) == 0 for hp in tiny.hook_dict.values())


@torch.no_grad()
def test_a_key_vector_added_at_every_position_changes_nothing():
    model = get_tiny("llama", 4)  # MHA: hook_rot_k has one key head per query head
    tokens = _tokens(model, seed=3)
    g = torch.Generator().manual_seed(1)
    dk = torch.randn(model.cfg.n_heads, model.cfg.d_head, generator=g) * 5
    plain = model(tokens)
    every = [(f"blocks.{layer}.attn.hook_rot_k", lambda k, hook: k + dk) for layer in range(2)]
    torch.testing.assert_close(model.run_with_hooks(tokens, fwd_hooks=every), plain, atol=2e-5, rtol=1e-5)

    def on_a_span(k, hook):  # the same vector on some keys only is NOT a no-op
        k = k.clone()
        k[:, 3:9] += dk
        return k

    some = [(f"blocks.{layer}.attn.hook_rot_k", on_a_span) for layer in range(2)]
    assert (model.run_with_hooks(tokens, fwd_hooks=some) - plain).abs().max() > 1e-2


@torch.no_grad()
def test_key_directions_per_query_head_are_inert_under_gqa(tiny_gqa):
    dirs = _random_directions(tiny_gqa, scale=4.0)
    dirs.q.zero_()
    tokens = _tokens(tiny_gqa, seed=4)
    with focus(tiny_gqa, dirs, alpha=1.0, heads=None, keys=True):
        steered = tiny_gqa(tokens)
    torch.testing.assert_close(steered, tiny_gqa(tokens), atol=2e-5, rtol=1e-5)


def test_key_direction_gradient_vanishes_in_the_cached_objective():
    model = get_tiny("qwen2", 2)
    prompts = prepare_prompts(model, make_synthetic_qa(3, n_documents=4, seed=2))
    inputs = collect_attention_inputs(model, prompts, quiet=True)
    dq = torch.randn(2, 4, 16, requires_grad=True)
    dk = torch.randn(2, 4, 16, requires_grad=True)
    span_attention(inputs, dq, dk)["gold"].sum().backward()
    assert dq.grad.abs().max() > 1e-3
    assert dk.grad.abs().max() < 1e-6 * dq.grad.abs().max() + 1e-7


# ---------------------------------------------------------------- the cached objective is faithful
@pytest.mark.parametrize("arch,kv", [("llama", 2), ("qwen2", 1), ("mistral", 4)])
def test_cached_masses_equal_the_bridge_patterns_with_steering(arch, kv):
    model = get_tiny(arch, kv)
    prompts = prepare_prompts(model, make_synthetic_qa(3, n_documents=4, seed=6))
    dirs = _random_directions(model, scale=2.0, seed=arch.__len__())
    inputs = collect_attention_inputs(model, prompts, quiet=True)
    cached = span_attention(inputs, dirs.q, dirs.k, alpha=0.7, spans=("gold", "sink"))
    # the paper trains each layer on the unmodified model's inputs: steer one layer at a time
    for layer in range(2):
        for i, p in enumerate(prompts):
            seen = {}

            def keep(pattern, hook, p=p):
                rows = pattern[0][:, p.answer.to_slice()]
                seen.update({s: rows[..., span.to_slice()].sum(-1).mean(-1) for s, span in (("gold", p.gold), ("sink", p.sink))})

            hooks = focus_hooks(model, dirs, 0.7, [(layer, h) for h in range(4)], keys=True)
            with torch.no_grad():
                model.run_with_hooks(p.input_ids[None], fwd_hooks=hooks + [(f"blocks.{layer}.attn.hook_pattern", keep)])
            for s in ("gold", "sink"):
                torch.testing.assert_close(cached[s][i, layer], seen[s], atol=1e-5, rtol=1e-4)
    assert (cached["gold"] - span_attention(inputs, spans=("gold",))["gold"]).abs().max() > 1e-3  # steering acts


def test_cached_gradient_equals_the_gradient_through_the_bridge():
    model = get_tiny("llama", 2)
    p = prepare_prompts(model, make_synthetic_qa(1, n_documents=4, seed=8))[0]
    inputs = collect_attention_inputs(model, [p], quiet=True)
    dq = (torch.randn(2, 4, 16) * 0.5).requires_grad_(True)
    span_attention(inputs, dq)["gold"].sum().backward()
    cached_grad = dq.grad.clone()

    dq2 = dq.detach().clone().requires_grad_(True)
    total = []

    def add(q, hook):
        return q + dq2[int(hook.name.split(".")[1])]

    def mass(pattern, hook):
        total.append(pattern[0][:, p.answer.to_slice(), p.gold.to_slice()].sum(-1).mean(-1).sum())

    # each layer's objective is computed on the unmodified model's inputs (layer 1 must not
    # see layer 0's steering), so steer one layer at a time
    for layer in range(2):
        total.clear()
        hooks = [(f"blocks.{layer}.attn.hook_rot_q", add), (f"blocks.{layer}.attn.hook_pattern", mass)]
        model.run_with_hooks(p.input_ids[None], fwd_hooks=hooks)
        (grad,) = torch.autograd.grad(total[0], dq2)
        torch.testing.assert_close(cached_grad[layer], grad[layer], atol=1e-5, rtol=1e-4)
        assert grad[1 - layer].abs().max() == 0


def test_training_raises_gold_mass_on_held_out_prompts():
    model = get_tiny("llama", 2)
    examples = make_synthetic_qa(16, n_documents=5, seed=11)
    dirs = train_directions(model, examples[:8], examples[8:11], epochs=10, lr=0.3, quiet=True, seed=0)
    test = collect_attention_inputs(model, prepare_prompts(model, examples[11:]), quiet=True)
    before = span_attention(test)["gold"].mean()
    after = span_attention(test, dirs.q)["gold"].mean()
    assert after > before * 1.3, (before, after)  # random tiny model: near-uniform attention
    meta = dirs.metadata
    assert meta["data"]["n_train"] == 8 and meta["settings"]["lr"] == 0.3
    assert 1 <= meta["epochs_run"] <= 10 and len(meta["history"]) == meta["epochs_run"]
    assert torch.tensor(meta["val_gold_mass_after"]).mean() > torch.tensor(meta["val_gold_mass_before"]).mean()
    assert dirs.q.norm(dim=-1).median() > 5 * dirs.k.norm(dim=-1).median()  # only queries learn


# ---------------------------------------------------------------- applying
@torch.no_grad()
def test_cached_and_uncached_generation_agree_with_focus_on(tiny_gqa):
    dirs = _random_directions(tiny_gqa, scale=3.0, seed=2, ranking=[(1, 0), (0, 2), (1, 3)])
    tokens = _tokens(tiny_gqa, seed=0, n_documents=3)
    gen = lambda cached: tiny_gqa.generate(tokens, max_new_tokens=10, do_sample=False, stop_at_eos=False,  # noqa: E731
                                           use_past_kv_cache=cached, return_type="tokens", verbose=False)[0].tolist()
    with focus(tiny_gqa, dirs, alpha=2.0, heads=3, keys=True):
        cached, uncached = gen(True), gen(False)
    assert cached == uncached
    assert cached != gen(True)


@torch.no_grad()
def test_key_bias_is_the_steered_logit_shift():
    model = get_tiny("qwen2", 2)
    dirs = _random_directions(model, scale=2.0, seed=5)
    prompt = render(make_synthetic_qa(1, n_documents=3, seed=1)[0], model.tokenizer)
    heads = [(1, 1), (1, 2), (0, 3)]
    table = dirs.key_bias(model, prompt, alpha=0.5, heads=heads)
    assert table.shape == (3, prompt.n_tokens) and list(table.index) == heads  # labelled by head
    assert list(table.index.names) == ["layer", "head"] and table.attrs["alpha"] == 0.5
    bias = torch.tensor(table.to_numpy())
    scores = {}

    def keep(s, hook):
        scores.setdefault(hook.name, []).append(s[0].clone())

    names = [f"blocks.{layer}.attn.hook_attn_scores" for layer in range(2)]
    model.run_with_hooks(prompt.input_ids[None], fwd_hooks=[(n, keep) for n in names])
    # steer layer 0 only for heads of layer 0 (layer 1's keys would change otherwise)
    hooks = focus_hooks(model, dirs, 0.5, [(0, 3)]) + [(n, keep) for n in names]
    model.run_with_hooks(prompt.input_ids[None], fwd_hooks=hooks)
    plain, steered = scores[names[0]]
    row = prompt.n_tokens - 1
    torch.testing.assert_close(steered[3, row] - plain[3, row], bias[2], atol=1e-4, rtol=1e-4)


@torch.no_grad()
def test_one_alpha_per_batch_row_equals_separate_runs():
    model = get_tiny("mistral", 2)
    dirs = _random_directions(model, scale=2.0, seed=3)
    tokens = _tokens(model)
    masks = head_masks(model, [[(0, 1)], [(1, 2), (0, 0)], []])
    alphas = [0.5, -1.0, 3.0]
    batched = model.run_with_hooks(tokens.expand(3, -1), fwd_hooks=focus_hooks(model, dirs, alphas, masks))
    for v in range(3):
        with focus(model, dirs, alpha=alphas[v], heads=masks[v]) if masks[v].any() else nullcontext():
            torch.testing.assert_close(batched[v], model(tokens)[0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(batched[2], model(tokens)[0], atol=1e-5, rtol=1e-5)  # no heads: no change


@torch.no_grad()
def test_focus_sweep_baseline_and_selection():
    model = get_tiny("llama", 2)
    dirs = _random_directions(model, scale=1.0, seed=1, ranking=[(1, 0), (0, 1), (1, 3), (0, 0)])
    examples = make_synthetic_qa(3, n_documents=4, seed=12)
    df = focus_sweep(model, dirs, examples, ks=(1, 4, None), alphas=(-0.5, 1.0), quiet=True)
    assert len(df) == 3 * 3 * 3  # examples x ks x (alpha 0 + 2 alphas)
    plain = evaluate_next_token(model, examples, quiet=True)
    for k in (1, 4, 8):
        base = df[(df.k == k) & (df.alpha == 0)].sort_values("example")
        torch.testing.assert_close(torch.tensor(base.margin.to_numpy()), torch.tensor(plain.margin.to_numpy()),
                                   atol=1e-4, rtol=1e-4)
    best = best_setting(df)
    assert set(best) == {"k", "alpha", "accuracy"}
    assert best["accuracy"] == df.groupby(["k", "alpha"]).correct.mean().max()


def test_magnitude_control_matches_the_target_moved_sink_mass():
    rows = []
    for example, scale in enumerate([1.0, 2.0, 4.0]):  # a prompt moved 1x, 2x, 4x as far per alpha
        for alpha in (0.0, 0.25, 0.5, 1.0):
            rows.append({"example": example, "qid": f"q{example}", "k": 5, "alpha": alpha,
                         "sink_mass": 0.6 - min(0.6, 0.2 * alpha * scale), "correct": alpha == 0.5, "margin": 0.0})
    sweep = pd.DataFrame(rows)
    mc = MagnitudeControl.fit(sweep, k=5, alpha=0.5)
    assert mc.target == pytest.approx(0.2)  # the median prompt moved 0.2 at alpha 0.5
    chosen = mc.apply_to_sweep(sweep).set_index("example").alpha
    assert chosen.tolist() == [1.0, 0.5, 0.25]  # weak prompts get a larger alpha, strong ones a smaller
    with pytest.raises(DataError, match="alpha=0.75"):
        MagnitudeControl.fit(sweep, k=5, alpha=0.75)
    with pytest.raises(DataError, match="k=3"):
        MagnitudeControl.fit(sweep, k=3, alpha=0.5)


def test_magnitude_control_on_a_prompt():
    model = get_tiny("llama", 2)
    dirs = _random_directions(model, scale=3.0, seed=4, ranking=[(1, 0), (1, 1), (0, 2)])
    prompt = render(make_synthetic_qa(1, n_documents=3, seed=2)[0], model.tokenizer)
    grid = (0.0, 0.5, 1.0, 2.0)
    sweep = focus_sweep(model, dirs, [prompt], ks=(3,), alphas=grid, rows="answer", quiet=True)
    moved = sweep.set_index("alpha").sink_mass
    moved = {a: float(moved[0.0] - moved[a]) for a in grid}
    assert len(set(moved.values())) == len(grid)  # every alpha moves a different amount
    for high in sorted(moved.values()):  # each bound admits exactly the alphas that stay below it
        mc = MagnitudeControl(k=3, target=high, alpha=1.0, grid=grid, high=high)
        assert mc.alpha_for(model, dirs, prompt, rows="answer") == max(a for a in grid if moved[a] <= high)
    below = MagnitudeControl(k=3, target=0.0, alpha=1.0, grid=grid, high=min(moved.values()) - 1.0)
    assert below.alpha_for(model, dirs, prompt, rows="answer") == 0.0  # every alpha overshoots: no steering


# ---------------------------------------------------------------- artifacts
def test_save_load_round_trip_and_mismatch_errors(tmp_path):
    model = get_tiny("llama", 2)
    dirs = _random_directions(model, seed=7, ranking=[(1, 2), (0, 0)])
    dirs.metadata["settings"] = {"lr": 1e-3}
    path = dirs.save(tmp_path / "dirs")
    assert {p.name for p in path.iterdir()} == {"focus_directions.safetensors", "focus_directions.json", "manifest.json"}
    loaded = FocusDirections.load(path, model=model)
    assert torch.equal(loaded.q, dirs.q) and torch.equal(loaded.k, dirs.k)
    assert loaded.ranking() == [(1, 2), (0, 0)] and loaded.metadata == dirs.metadata
    with pytest.raises(ModelError, match=r"directions were trained for .*llama.*, not for the loaded .*qwen2"):
        FocusDirections.load(path, model=get_tiny("qwen2", 2))  # same shape, other model: identity
    other = get_tiny("qwen2", 2)
    assert FocusDirections.load(path, model=other, strict=False).shape == (2, 4, 16)
    small = FocusDirections(dirs.q[:1], dirs.k[:1], [], {"model": "x"})
    with pytest.raises(ModelError, match=r"\(1, 4, 16\)"):
        small.check_model(model)
    with pytest.raises(DataError, match="missing"):
        FocusDirections.load(tmp_path / "nowhere")


def _write_release(root, n_layers=3, n_heads=5, d_head=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(n_layers, n_heads, d_head, generator=g) * 20
    k = torch.randn(n_layers, n_heads, d_head, generator=g) * 0.1
    sub = root / "direction_relevant"
    sub.mkdir(parents=True)
    for layer in range(n_layers):
        torch.save(torch.nn.Parameter(q[layer]), sub / f"head_q_directions_{layer}.pth")
        torch.save(torch.nn.Parameter(k[layer]), sub / f"head_k_directions_{layer}.pth")
    ranking = [[layer, head] for layer in reversed(range(n_layers)) for head in range(n_heads)]
    (root / "relevant_heads.json").write_text(json.dumps(ranking))
    return q, k, ranking


def test_importer_round_trips_any_shape(tmp_path):
    root = tmp_path / "org_Some-Model"
    q, k, ranking = _write_release(root, n_layers=3, n_heads=5, d_head=8)
    dirs = import_release(root)
    assert dirs.shape == (3, 5, 8) and dirs.model == "org/Some-Model"
    assert torch.equal(dirs.q, q) and torch.equal(dirs.k, k)
    assert dirs.ranking() == [tuple(h) for h in ranking]
    back = FocusDirections.load(dirs.save(tmp_path / "saved"))
    assert torch.equal(back.q, q) and back.ranking() == dirs.ranking()
    norms = dirs.norm_summary()
    assert norms["q_norm"]["median"] > 10 * norms["k_norm"]["median"]


def test_importer_explains_broken_releases(tmp_path):
    root = tmp_path / "broken"
    _write_release(root, n_layers=3)
    (root / "direction_relevant" / "head_k_directions_1.pth").unlink()
    with pytest.raises(DataError, match=r"head_k_directions.*\[1\]"):
        import_release(root)
    with pytest.raises(DataError, match="no head_q_directions"):
        (tmp_path / "empty").mkdir()
        import_release(tmp_path / "empty")


@pytest.mark.parametrize(
    "name,shape",
    [("meta-llama_Llama-3.2-3B-Instruct", (28, 24, 128)), ("Qwen_Qwen2.5-7B-Instruct", (28, 28, 128))],
)
def test_importing_the_papers_release(shared_data, name, shape):
    root = shared_data / "focus-direction-release" / name
    dirs = import_release(root)
    assert dirs.shape == shape
    assert dirs.ranking()[:20] == [tuple(h) for h in json.loads((root / "relevant_heads.json").read_text())[:20]]
    s = dirs.norm_summary(top_k=20)
    # the query vectors grew ~250x from their N(0, 0.01) init; the inert key vectors did not
    assert s["q_norm"]["median"] > 15 and s["k_norm"]["median"] < 1.5
    assert s["q_norm"]["median"] > 20 * s["k_norm"]["median"]


# ---------------------------------------------------------------- the embedded model
def test_smollm2_directions_train_and_apply(smollm2):
    examples = make_synthetic_qa(16, n_documents=20, seed=201)
    dirs = train_directions(smollm2, examples[:12], examples[12:], epochs=5, lr=1e-2, quiet=True)
    assert dirs.shape == (30, 9, 64)
    before = torch.tensor(dirs.metadata["val_gold_mass_before"])
    after = torch.tensor(dirs.metadata["val_gold_mass_after"])
    assert after.mean() > 1.3 * before.mean()
    s = dirs.norm_summary()
    assert s["q_norm"]["median"] > 5 * s["k_norm"]["median"]
    tokens = render(examples[0], smollm2.tokenizer).input_ids[None]
    with torch.no_grad():
        plain = smollm2(tokens)[0, -1]
        with focus(smollm2, dirs, alpha=0.0, heads=None):
            assert torch.equal(smollm2(tokens)[0, -1], plain)
        with eager_attention(smollm2):  # a hook on hook_attn_scores makes the layers eager: compare eager to eager
            plain_eager = smollm2(tokens)[0, -1]
            with focus(smollm2, dirs, alpha=0.0, heads=None, keys=True):
                assert torch.equal(smollm2(tokens)[0, -1], plain_eager)
        with focus(smollm2, dirs, alpha=2.0, heads=[(20, 6), (23, 2)]):
            assert (smollm2(tokens)[0, -1] - plain).abs().max() > 1e-2
