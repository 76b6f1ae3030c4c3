"""One intervention, two speeds: every sweep cell equals the public context manager.

``focus``/``split_softmax`` and their sweeps take the same ``rows=``. With ``"answer"`` a
sweep prefills each prompt once and re-runs only the answer rows; with ``"all"`` it re-runs
the whole prompt per variant. Either way its logits must be what the context manager gives
on the same prompt.
"""

from __future__ import annotations

from contextlib import nullcontext

import pytest
import torch
from conftest import get_tiny

from focuslens import DataError, make_synthetic_qa, render
from focuslens.data.render import Span, with_layout
from focuslens.directions.artifact import FocusDirections
from focuslens.model.heads import head_masks
from focuslens.model.load import model_id
from focuslens.model.spans import ROWS, resolve_rows
from focuslens.steer.focus import focus, focus_sweep, focus_variants
from focuslens.steer.split_softmax import split_softmax, split_softmax_sweep


def _directions(model, scale, ranking, seed=0):
    g = torch.Generator().manual_seed(seed)
    shape = (model.cfg.n_layers, model.cfg.n_heads, model.cfg.d_head)
    return FocusDirections(torch.randn(shape, generator=g) * scale, torch.zeros(shape), ranking,
                           {"model": model_id(model)})


def _last_logits(model, prompt):
    return model(prompt.input_ids[None].to(model.cfg.device))[0, -1].float().cpu()


def _check_focus_sweep(model, dirs, examples, ks, alphas, rows, atol):
    df, logits = focus_sweep(model, dirs, examples, ks=ks, alphas=alphas, rows=rows, return_logits=True, quiet=True)
    grid, masks = focus_variants(model, dirs, ks, alphas)
    changed = 0
    for i, ex in enumerate(examples):
        prompt = render(ex, model.tokenizer)
        plain = _last_logits(model, prompt)
        for v, (_, _, alpha) in enumerate(grid):
            with focus(model, dirs, alpha=alpha, heads=masks[v], rows=rows, prompt=prompt):
                want = _last_logits(model, prompt)
            torch.testing.assert_close(logits[i, v], want, atol=atol, rtol=1e-5)
            changed += int(not torch.allclose(want, plain, atol=1e-3))
    assert changed > 0  # the steering does something: the comparison is not of identical runs
    return df


def _check_split_sweep(model, ranking, examples, ks, taus, rows, atol):
    df, logits = split_softmax_sweep(model, examples, ranking, ks=ks, taus=taus, n_random=0, rows=rows,
                                     return_logits=True, quiet=True)
    cells = df[df.example == 0].sort_values("variant")[["k", "tau"]].to_numpy().tolist()
    changed = 0
    for i, ex in enumerate(examples):
        prompt = render(ex, model.tokenizer)
        plain = _last_logits(model, prompt)
        for v, (k, tau) in enumerate(cells):
            heads = ranking[: int(k)] if k else []
            mask = head_masks(model, [heads])[0]  # an empty group is the unsteered model (the CM refuses it)
            with split_softmax(model, mask, prompt.gold, tau, rows=rows, prompt=prompt) if mask.any() else nullcontext():
                want = _last_logits(model, prompt)
            torch.testing.assert_close(logits[i, v], want, atol=atol, rtol=1e-5)
            changed += int(not torch.allclose(want, plain, atol=1e-3))
    assert changed > 0  # split-softmax does something: the comparison is not of identical runs


@pytest.mark.parametrize("rows", ROWS)
@torch.no_grad()
def test_focus_sweep_cells_equal_the_context_manager_tiny(rows):
    model = get_tiny("llama", 2)
    dirs = _directions(model, 3.0, [(1, 0), (0, 1), (1, 3), (0, 2)])
    examples = make_synthetic_qa(2, n_documents=4, seed=31)
    _check_focus_sweep(model, dirs, examples, (1, 3), (-1.0, 2.0), rows, atol=1e-5)


@pytest.mark.parametrize("rows", ROWS)
@torch.no_grad()
def test_split_softmax_sweep_cells_equal_the_context_manager_tiny(rows):
    model = get_tiny("qwen2", 1)
    examples = make_synthetic_qa(2, n_documents=4, seed=32)
    _check_split_sweep(model, [(1, 2), (0, 3), (1, 0)], examples, (1, 3), (0.5, 0.1), rows, atol=1e-5)


@torch.no_grad()
def test_the_two_row_settings_differ_and_answer_rows_leave_the_prompt_alone():
    model = get_tiny("llama", 2)
    dirs = _directions(model, 3.0, [(0, 0), (1, 1)])
    prompt = render(make_synthetic_qa(1, n_documents=4, seed=33)[0], model.tokenizer)
    seen = {}
    rec = [("blocks.1.hook_resid_pre", lambda x, hook: seen.__setitem__("r", x.clone()))]
    model.run_with_hooks(prompt.input_ids[None], fwd_hooks=rec)
    plain = seen["r"]
    out = {}
    for rows in ROWS:
        with focus(model, dirs, alpha=2.0, heads=2, rows=rows, prompt=prompt):
            out[rows] = _last_logits(model, prompt)
            model.run_with_hooks(prompt.input_ids[None], fwd_hooks=rec)
        before = slice(0, prompt.answer.start)
        same_before = torch.allclose(seen["r"][0, before], plain[0, before], atol=1e-6)
        assert same_before == (rows == "answer")
    assert not torch.allclose(out["all"], out["answer"], atol=1e-3)


@torch.no_grad()
def test_answer_rows_in_generation_steer_the_generated_tokens_too(tiny_gqa):
    """With a KV cache each step sees one query: its position comes from RoPE, so
    rows='answer' keeps steering generated tokens and cached equals uncached."""
    model = tiny_gqa
    dirs = _directions(model, 4.0, [(0, 1), (1, 2), (1, 0)])
    prompt = render(make_synthetic_qa(1, n_documents=3, seed=34)[0], model.tokenizer)
    with focus(model, dirs, alpha=3.0, heads=3, rows="answer", prompt=prompt):
        cached = model.generate(prompt.input_ids[None], max_new_tokens=6, do_sample=False, use_past_kv_cache=True,
                                return_type="tokens", verbose=False, stop_at_eos=False)
        uncached = model.generate(prompt.input_ids[None], max_new_tokens=6, do_sample=False, use_past_kv_cache=False,
                                  return_type="tokens", verbose=False, stop_at_eos=False)
    assert torch.equal(cached, uncached)


def test_rows_errors_name_the_problem():
    prompt = render(make_synthetic_qa(1, n_documents=3, seed=35)[0], get_tiny("llama", 2).tokenizer)
    assert resolve_rows("all") is None and resolve_rows("answer", prompt) == prompt.answer.start
    with pytest.raises(DataError, match="needs the prompt"):
        resolve_rows("answer")
    with pytest.raises(DataError, match="rows='every'"):
        resolve_rows("every")
    with pytest.raises(DataError, match=">= 0"):
        resolve_rows(Span(-2, 3))
    with pytest.raises(DataError, match="rows='sideways'"):
        focus_sweep(get_tiny("llama", 2), _directions(get_tiny("llama", 2), 1.0, [(0, 0)]),
                    make_synthetic_qa(1, n_documents=3), ks=(1,), alphas=(1.0,), rows="sideways", quiet=True)


# ---------------------------------------------------------------- the embedded model
_RANKING = [(7, 7), (15, 6), (17, 3), (23, 2), (20, 6)]


def _check_smollm2(model, rows, atol):
    dirs = _directions(model, 6.0, _RANKING, seed=1)
    examples = with_layout(make_synthetic_qa(1, n_documents=5, seed=36), "qa_query_aware")
    _check_focus_sweep(model, dirs, examples, (5,), (1.0,), rows, atol=atol)
    _check_split_sweep(model, _RANKING, examples, (5,), (0.1,), rows, atol=atol)


@pytest.fixture(scope="module")
def smollm2_fp64(smollm2):  # skips with the fp32 fixture when the wheel is missing
    from focuslens import load_model

    return load_model("smollm2-135m-instruct", dtype=torch.float64)


@pytest.mark.parametrize("rows", ROWS)
@torch.no_grad()
def test_smollm2_sweep_cells_equal_the_context_managers_to_1e5_in_fp64(smollm2_fp64, rows):
    # in float64 the packed / batched variants and the single runs agree to rounding far below 1e-5
    _check_smollm2(smollm2_fp64, rows, atol=1e-5)


@pytest.mark.parametrize("rows", ROWS)
@torch.no_grad()
def test_smollm2_sweep_cells_equal_the_context_managers_fp32(smollm2, rows):
    # fp32, the dtype users run: batched variants differ from single runs by rounding, at most
    # 3.0e-5 in 25 of 49152 logits measured on the pattern-free path (SDPA rounds differently
    # for a batch than for one row; 1.3e-5 on the eager path), so the bound is 5e-5
    _check_smollm2(smollm2, rows, atol=5e-5)


@pytest.mark.parametrize("rows", ROWS)
@torch.no_grad()
def test_generated_sweep_cells_equal_greedy_generation_under_the_context_manager(rows):
    from focuslens.measure.evaluate import greedy_generate

    model = get_tiny("qwen2", 2)
    dirs = _directions(model, 4.0, [(1, 1), (0, 2), (1, 3)])
    examples = [ex.replace(answer_prefix=None) for ex in make_synthetic_qa(2, n_documents=3, seed=37)]
    df = focus_sweep(model, dirs, examples, ks=(2,), alphas=(-2.0, 3.0), rows=rows, max_new_tokens=5, quiet=True)
    grid, masks = focus_variants(model, dirs, (2,), (-2.0, 3.0))
    texts = set()
    for i, ex in enumerate(examples):
        prompt = render(ex, model.tokenizer)
        for v, (_, _, alpha) in enumerate(grid):
            with focus(model, dirs, alpha=alpha, heads=masks[v], rows=rows, prompt=prompt):
                want = greedy_generate(model, prompt, max_new_tokens=5)
            got = df[(df.example == i) & (df.variant == v)].prediction.item()
            assert got == want
            texts.add(want)
    assert len(texts) > 1  # the variants really differ
    assert {"gold_mass", "sink_mass", "correct"} <= set(df.columns)


@pytest.mark.parametrize("first", ["sliding_attention", "full_attention"])
def test_positions_come_from_layer_0s_own_rope_table_past_the_wrap_at_pi(first):
    """Gemma 3 has one RoPE table per layer type and fires the shared rotary hook once per
    table, in an order that varies between processes: the steered rows' positions are read
    from layer 0's own table, correct past the lowest frequency's angle π (296 positions in
    the tiny config's local table) and in a KV-cached step."""
    import copy

    from transformers import AutoModelForCausalLM

    from focuslens.model.load import load_model
    from focuslens.model.rope import position_hooks

    tiny = get_tiny("gemma3", 1)
    config = copy.deepcopy(tiny.original_model.config)
    config.layer_types = [first, *(t for t in config.layer_types[1:])]
    torch.manual_seed(0)
    model = load_model(AutoModelForCausalLM.from_config(config).eval(), tokenizer=tiny.tokenizer)
    state = {}
    ids = torch.randint(10, 100, (1, 400), generator=torch.Generator().manual_seed(1))
    with model.hooks(fwd_hooks=position_hooks(model, state)):
        _, cache = model(ids, return_type="logits_and_cache")
        assert state["positions"].reshape(-1).tolist() == list(range(400))
        model(ids[:, :1], past_key_values=cache)
        assert state["positions"].reshape(-1).tolist() == [400]
    assert all(layer.keys.shape[-2] == 401 for layer in cache.layers)  # every position kept (sliding too)
