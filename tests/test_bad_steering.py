"""Bad steering inputs found by the fault probe: each raises a DataError naming the field.

Rows past the prompt's end, a span mask with the wrong batch size, reversed spans, and
pre-rendered prompts longer than the model's context. The rule for rows: explicit rows
must select at least one position of ``prompt`` (when given) and of every forward pass
that starts at position 0; cached passes of generated tokens may lie past the prompt.
"""

from __future__ import annotations

import re

import pytest
import torch
from conftest import get_tiny
from transformers import AutoConfig, AutoModelForCausalLM

from focuslens import load_model
from focuslens.data import Span, make_synthetic_qa, render
from focuslens.directions.artifact import FocusDirections
from focuslens.directions.train import train_directions
from focuslens.errors import DataError
from focuslens.measure.scoring import prepare_prompts, score_heads
from focuslens.model.spans import resolve_rows
from focuslens.model.testing import tiny_tokenizer
from focuslens.steer.focus import focus, focus_sweep
from focuslens.steer.split_softmax import split_softmax, split_softmax_hooks, split_softmax_sweep

HEADS = [(0, 0), (1, 1)]


@pytest.fixture(scope="module")
def model():
    return get_tiny("llama", 2)


@pytest.fixture(scope="module")
def prompt(model):
    return render(make_synthetic_qa(1, n_documents=4, seed=0)[0], model.tokenizer)


@pytest.fixture(scope="module")
def dirs(model):
    shape = (model.cfg.n_layers, model.cfg.n_heads, model.cfg.d_head)
    torch.manual_seed(0)
    return FocusDirections(torch.randn(shape), torch.randn(shape), HEADS, {})


def _run_split(model, prompt, **kw):
    with split_softmax(model, HEADS, kw.pop("span", prompt.gold), 0.1, **kw):
        return model(prompt.input_ids[None])


def _run_focus(model, dirs, prompt, **kw):
    with focus(model, dirs, alpha=5.0, heads=HEADS, strict=False, **kw):
        return model(prompt.input_ids[None])


# ------------------------------------------------------------------ rows past the end
@torch.no_grad()
@pytest.mark.parametrize("rows", [[1000], 1000, Span(1000, 1005)], ids=["list", "start", "span"])
def test_rows_past_the_end_of_a_full_pass_raise(model, dirs, prompt, rows):
    n = prompt.n_tokens
    with pytest.raises(DataError, match=rf"rows=.*none of the {n} positions"):
        _run_split(model, prompt, rows=rows)
    with pytest.raises(DataError, match=rf"rows=.*none of the {n} positions"):
        _run_focus(model, dirs, prompt, rows=rows)
    assert all(len(hp.fwd_hooks) == 0 for hp in model.hook_dict.values())  # removed on the error


@pytest.mark.parametrize("rows", [[1000], 1000, Span(1000, 1005)], ids=["list", "start", "span"])
def test_rows_past_the_prompt_are_refused_up_front(model, dirs, prompt, rows):
    n = prompt.n_tokens
    for rows_ in (rows, [n]):
        with pytest.raises(DataError, match=rf"rows=.*the {n} positions .* prompt"):
            resolve_rows(rows_, prompt)
        with pytest.raises(DataError, match="rows="):
            split_softmax_hooks(model, HEADS, prompt.gold, 0.1, rows=rows_, prompt=prompt)
        with pytest.raises(DataError, match="rows="), focus(model, dirs, alpha=1.0, heads=HEADS, rows=rows_,
                                                           prompt=prompt, strict=False):
            pass
    assert resolve_rows([n - 1, n + 5], prompt).tolist() == [n - 1, n + 5]  # one position in the prompt is enough


def _generate(model, tokens, n):
    out = model.generate(tokens, max_new_tokens=n, do_sample=False, stop_at_eos=False, use_past_kv_cache=True,
                         return_type="tokens", verbose=False)
    return out[0, tokens.shape[1]:].tolist()


@torch.no_grad()
def test_cached_generation_may_steer_rows_past_the_prompt(model, dirs, prompt):
    """Cached steps see only positions past the prompt: no error there, and they steer."""
    tokens, n = prompt.input_ids[None], prompt.n_tokens
    plain = _generate(model, tokens, 6)
    with split_softmax(model, None, prompt.documents[0], 0.05, rows=Span(n - 1, n + 6)):
        split = _generate(model, tokens, 6)
    with focus(model, dirs, alpha=20.0, heads=None, rows=n - 1, strict=False):
        focused = _generate(model, tokens, 6)
    assert split != plain and focused != plain


# ------------------------------------------------------------------ span masks and reversed spans
@torch.no_grad()
def test_span_mask_for_another_batch_size_names_its_shape(model, prompt):
    n = prompt.n_tokens
    mask = torch.zeros(3, n, dtype=torch.bool)
    mask[:, prompt.gold.start:prompt.gold.end] = True
    with pytest.raises(DataError, match=re.escape(f"span mask of shape (3, {n}) for a batch of 1: expected ({n},) "
                                                  f"or (1, {n})")):
        _run_split(model, prompt, span=mask)
    with pytest.raises(DataError, match=re.escape("span mask of shape (1, 2, 3): expected (n_keys,)")):
        split_softmax_hooks(model, HEADS, torch.ones(1, 2, 3, dtype=torch.bool), 0.1)
    two = torch.stack([mask[0], mask[0]])
    out = model(prompt.input_ids[None].expand(2, -1))
    with split_softmax(model, HEADS, two, 0.1):  # one mask row per batch row is fine
        assert not torch.allclose(model(prompt.input_ids[None].expand(2, -1)), out)


def test_reversed_spans_are_refused_when_made():
    with pytest.raises(DataError, match=re.escape("Span(9, 3) ends before it starts")):
        Span(9, 3)
    assert len(Span(3, 3)) == 0  # empty is a valid Span (refused where a span must select something)


# ------------------------------------------------------------------ prompts longer than n_ctx
@pytest.fixture(scope="module")
def short_context():
    """A tiny llama with a 64-token context, and two pre-rendered prompts longer than it."""
    tok = tiny_tokenizer()
    cfg = AutoConfig.for_model("llama", vocab_size=len(tok), hidden_size=64, intermediate_size=128,
                               num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                               max_position_embeddings=64, rope_theta=10000.0, bos_token_id=tok.bos_token_id,
                               eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    torch.manual_seed(0)
    m = load_model(AutoModelForCausalLM.from_config(cfg).eval(), tokenizer=tok, device="cpu", dtype=torch.float32)
    short = make_synthetic_qa(1, n_documents=1, seed=0)
    long = [render(ex, tok) for ex in make_synthetic_qa(2, n_documents=8, seed=3)]
    assert m.cfg.n_ctx == 64 and long[0].n_tokens > 64
    return m, short, long


def _entry_points(m, examples, long):
    shape = (m.cfg.n_layers, m.cfg.n_heads, m.cfg.d_head)
    dirs = FocusDirections(torch.zeros(shape), torch.zeros(shape), [(0, 0)], {})
    return {
        "prepare_prompts": lambda: prepare_prompts(m, examples, quiet=True),
        "score_heads": lambda: score_heads(m, examples, n_bootstrap=0, quiet=True),
        "train_directions": lambda: train_directions(m, examples, long, epochs=1, quiet=True),
        "focus_sweep": lambda: focus_sweep(m, dirs, examples, ks=(1,), alphas=(0.5,), quiet=True),
        "focus_sweep_generate": lambda: focus_sweep(m, dirs, examples, ks=(1,), alphas=(0.5,), max_new_tokens=2,
                                                    quiet=True),
        "split_softmax_sweep": lambda: split_softmax_sweep(m, examples, [(0, 0)], ks=(1,), taus=(0.5,), n_random=0,
                                                           quiet=True),
    }


@pytest.mark.parametrize("entry", ["prepare_prompts", "score_heads", "train_directions", "focus_sweep",
                                   "focus_sweep_generate", "split_softmax_sweep"])
def test_prompts_longer_than_the_context_are_refused_by_every_entry_point(short_context, entry):
    m, short, long = short_context
    examples = [*short, long[0]]  # index 1: the long one
    message = re.escape(f"examples[1]: the prompt has {long[0].n_tokens} tokens, more than the model's context "
                        "of n_ctx=64")
    with pytest.raises(DataError, match=message):
        _entry_points(m, examples, long)[entry]()
