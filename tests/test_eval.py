"""Metrics, batched next-token logits, greedy generation and the evaluation loops."""

from __future__ import annotations

import math
import warnings

import pytest
import torch
from conftest import get_tiny

from focuslens import evaluate_next_token, make_synthetic_qa, render
from focuslens.data import Document, QAExample
from focuslens.data.examples import LITM_INSTRUCTION, normalize_answer
from focuslens.data.render import (
    answer_lead,
    candidate_token_ids,
    first_token_id,
    scored_tokens,
    split_visible,
)
from focuslens.measure.distraction import distraction, distraction_summary
from focuslens.measure.evaluate import evaluate_variants, greedy_generate
from focuslens.measure.forward import (
    accuracy_by,
    best_subspan_em,
    next_token_logits,
    position_label,
    warn_unscorable,
)
from focuslens.model.intervention import Intervention

EVAL_COLUMNS = [
    "qid", "n_documents", "gold_index", "position", "correct", "candidate_correct", "gold_logit", "margin", "prediction"
]


# ---------------------------------------------------------------- metrics
@pytest.mark.parametrize(
    "text, expected",
    [
        ("The Eiffel Tower", "eiffel tower"),
        ("  An apple a day!  ", "apple day"),
        ("Theater, the theatre.", "theater theatre"),  # only whole-word articles go
        ("U.S.A.", "usa"),
        ("Wilhelm Conrad Röntgen", "wilhelm conrad röntgen"),
        ("rock-and-roll", "rockandroll"),
    ],
)
def test_normalize_answer(text, expected):
    assert normalize_answer(text) == expected


@pytest.mark.parametrize(
    "prediction, answers, score",
    [
        ("It is in Paris, France.", ["paris"], 1.0),
        ("the Louvre museum", ["The Louvre"], 1.0),
        ("PARIS!", ["Paris"], 1.0),
        ("London", ["Paris", "London"], 1.0),
        ("It is in Lyon.", ["Paris"], 0.0),
        ("Par is", ["Paris"], 0.0),
        ("Wilhelm Röntgen", ["Wilhelm Conrad Röntgen"], 0.0),  # the answer must be a substring
    ],
)
def test_best_subspan_em(prediction, answers, score):
    assert best_subspan_em(prediction, answers) == score


def test_position_label():
    labels = [position_label(i, 5) for i in range(5)]
    assert labels == ["first", "other", "middle", "other", "last"]
    assert position_label(0, 1) == "first" and position_label(None, 3) == "none"
    assert position_label(9, 20) == "middle"


def test_first_token_id(tiny_tok):
    assert tiny_tok.convert_ids_to_tokens(first_token_id(tiny_tok, "Paris")) == "Paris"
    assert tiny_tok.convert_ids_to_tokens(first_token_id(tiny_tok, "New Paris")) == "<unk>"


def test_accuracy_by():
    import pandas as pd

    df = pd.DataFrame({"n": [1, 1, 5, 5, 5], "correct": [True, False, True, True, False]})
    assert accuracy_by(df, "n") == {1: 0.5, 5: pytest.approx(2 / 3)}


# ---------------------------------------------------------------- forward passes
def _prompts(model, n: int = 5, seed: int = 0):
    """Prompts of different lengths (1..n documents), so batches need padding."""
    examples = [make_synthetic_qa(1, n_documents=k, seed=seed + k)[0] for k in range(n, 0, -1)]
    return [render(ex, model.tokenizer) for ex in examples]


@torch.no_grad()
@pytest.mark.parametrize("batch_size", [1, 3])
def test_next_token_logits_match_plain_forwards(tiny_gqa, batch_size):
    prompts = _prompts(tiny_gqa)
    assert len({p.n_tokens for p in prompts}) == len(prompts)
    got = next_token_logits(tiny_gqa, prompts, batch_size=batch_size, quiet=True)
    assert got.shape == (len(prompts), tiny_gqa.cfg.d_vocab)
    for i, p in enumerate(prompts):
        expected = tiny_gqa(p.input_ids[None])[0, -1]
        assert (got[i] - expected).abs().max().item() <= 1e-4, i


@torch.no_grad()
def test_next_token_logits_apply_extra_hooks(tiny_tok):
    from conftest import get_tiny

    model = get_tiny("qwen2", 2)
    target = first_token_id(tiny_tok, "Paris")

    def boost(logits, hook):
        logits = logits.clone()
        logits[..., target] += 1e4
        return logits

    prompts = _prompts(model, 3)
    plain = next_token_logits(model, prompts, quiet=True)
    boosted = next_token_logits(model, prompts, hooks=[("unembed.hook_out", boost)], quiet=True)
    assert torch.allclose(boosted[:, target] - plain[:, target], torch.full((3,), 1e4))
    assert (boosted.argmax(-1) == target).all()
    assert len(model.hook_dict["unembed.hook_out"].fwd_hooks) == 0  # removed after the call


# ---------------------------------------------------------------- generation
def _generate(model, tokens, n: int, use_past_kv_cache: bool) -> list[int]:
    out = model.generate(
        tokens, max_new_tokens=n, do_sample=False, stop_at_eos=False,
        use_past_kv_cache=use_past_kv_cache, return_type="tokens", verbose=False,
    )
    return out[0, tokens.shape[1] :].tolist()


@torch.no_grad()
def test_kv_cached_generation_equals_uncached(tiny_gqa):
    prompt = render(make_synthetic_qa(1, n_documents=3, seed=0)[0], tiny_gqa.tokenizer)
    tokens = prompt.input_ids[None]
    cached = _generate(tiny_gqa, tokens, 12, True)
    assert len(cached) == 12 and len(set(cached)) > 3  # a sequence that could go wrong
    assert cached == _generate(tiny_gqa, tokens, 12, False)
    text = greedy_generate(tiny_gqa, prompt, max_new_tokens=12)  # our one decoder vs TL generate
    assert text == tiny_gqa.tokenizer.decode(cached, skip_special_tokens=True)


@torch.no_grad()
def test_uncached_generation_equals_a_manual_greedy_loop():
    from conftest import get_tiny

    model = get_tiny("qwen2", 1)
    tokens = render(make_synthetic_qa(1, n_documents=2, seed=4)[0], model.tokenizer).input_ids[None]
    manual = tokens
    for _ in range(12):
        nxt = model(manual)[0, -1].argmax()
        manual = torch.cat([manual, nxt.view(1, 1)], dim=1)
    assert _generate(model, tokens, 12, False) == manual[0, tokens.shape[1] :].tolist()


@pytest.mark.slow
@torch.no_grad()
def test_smollm2_kv_cached_generation_equals_uncached(smollm2):
    prompt = render(make_synthetic_qa(1, n_documents=5, seed=0)[0], smollm2.tokenizer)
    tokens = prompt.input_ids[None].to(smollm2.cfg.device)
    cached = _generate(smollm2, tokens, 12, True)
    # Uncached greedy decoding picks, at step t, the argmax of a full forward over the prompt
    # and the first t generated tokens; by causality that is the argmax at position n + t - 1
    # of ONE full forward over prompt + generation (12 forwards' worth of checks for 1).
    full = smollm2(torch.cat([tokens, torch.tensor([cached], device=tokens.device)], dim=1))
    uncached = full[0, prompt.n_tokens - 1 : -1].argmax(-1).tolist()
    assert cached == uncached
    # greedy_generate stops after the first EOS.
    eos = smollm2.tokenizer.eos_token_id
    k = cached.index(eos) + 1 if eos in cached else len(cached)
    text = greedy_generate(smollm2, prompt, max_new_tokens=12)
    assert text.strip() and text == smollm2.tokenizer.decode(cached[:k], skip_special_tokens=True)


# ---------------------------------------------------------------- evaluation loops
@torch.no_grad()
def test_evaluate_next_token_rows_agree_with_a_hand_computation(tiny_tok):
    from conftest import get_tiny

    model = get_tiny("llama", 2)
    examples = make_synthetic_qa(6, n_documents=4, seed=2)
    # Boost the first example's answer so some rows are correct and most are not.
    target = first_token_id(tiny_tok, examples[0].answers[0])

    def boost(logits, hook):
        logits = logits.clone()
        logits[..., target] += 1e3
        return logits

    df = evaluate_next_token(model, examples, hooks=[("unembed.hook_out", boost)], quiet=True)
    assert list(df.columns) == EVAL_COLUMNS and len(df) == len(examples)
    assert df.correct.iloc[0] and not df.correct.all()
    with model.hooks(fwd_hooks=[("unembed.hook_out", boost)]):
        for ex, row in zip(examples, df.itertuples()):
            logits = model(render(ex, tiny_tok).input_ids[None])[0, -1]
            gold = first_token_id(tiny_tok, ex.answers[0])
            others = {first_token_id(tiny_tok, c) for c in ex.candidates} - {gold}
            best_other = max(logits[o].item() for o in others)
            assert row.qid == ex.qid and row.n_documents == 4 and row.gold_index == ex.gold_index
            assert row.position == position_label(ex.gold_index, 4)
            assert row.correct == (int(logits.argmax()) == gold)
            assert row.prediction == tiny_tok.decode([int(logits.argmax())])
            assert row.gold_logit == pytest.approx(logits[gold].item(), abs=1e-3)
            assert row.margin == pytest.approx(logits[gold].item() - best_other, abs=1e-3)
            assert row.candidate_correct == (row.margin > 0)


def test_evaluate_next_token_only_counts_candidates_in_the_prompt(tiny_tok):
    from conftest import get_tiny

    model = get_tiny("mistral", 1)
    ex = make_synthetic_qa(1, n_documents=5, seed=0)[0]
    others = [c for c in ex.candidates if c != ex.answers[0]]
    boosted = first_token_id(tiny_tok, others[0])

    def boost(logits, hook):
        logits = logits.clone()
        logits[..., boosted] += 1e3
        return logits

    full = evaluate_next_token(model, [ex], hooks=[("unembed.hook_out", boost)], quiet=True).iloc[0]
    assert not full.candidate_correct and full.margin < -100
    # Drop the boosted city's document: it is no longer a competing candidate.
    keep = [d for d in ex.documents if others[0] not in d.text]
    cut = ex.replace(documents=tuple(keep), gold_index=keep.index(ex.gold))
    row = evaluate_next_token(model, [cut], hooks=[("unembed.hook_out", boost)], quiet=True).iloc[0]
    assert row.margin > -100 and not row.correct


def test_distraction_runs_every_setting(tiny_tok):
    from conftest import get_tiny

    model = get_tiny("qwen2", 2)
    examples = make_synthetic_qa(4, n_documents=6, seed=1)
    rows = distraction(model, examples, n_documents=(1, 3, 6), quiet=True)
    runs = rows.groupby(["setting", "n_documents"]).size().to_dict()
    assert runs == {("random", 1): 4, ("random", 3): 4, ("random", 6): 4, ("first", 6): 4, ("middle", 6): 4, ("last", 6): 4}
    assert set(rows[rows.setting == "first"].gold_index) == {0}
    assert set(rows[rows.setting == "middle"].gold_index) == {2}
    assert set(rows[rows.setting == "last"].gold_index) == {5}
    assert set(rows[rows.n_documents == 1].gold_index) == {0}
    summary = distraction_summary(rows)
    assert summary["n_prompts"] == 4
    assert set(summary["accuracy"]) == set(summary["candidate_accuracy"]) == {"1", "3", "6"}
    assert set(summary["by_gold_position_6"]) == {"first", "middle", "last"}
    ones = rows[(rows.setting == "random") & (rows.n_documents == 1)]
    assert summary["accuracy"]["1"] == pytest.approx(ones.correct.mean())
    assert math.isnan(summary["candidate_accuracy"]["1"])  # one document: no candidate to beat, no evidence
    assert ones.candidate_correct.isna().all() and ones.margin.isna().all()


@pytest.mark.slow
def test_smollm2_is_distracted(smollm2):
    examples = make_synthetic_qa(12, n_documents=20, seed=0)
    rows = distraction(smollm2, examples, n_documents=(1, 20), positions=(), quiet=True)
    accuracy = accuracy_by(rows, "n_documents")
    assert len(rows) == 24
    assert accuracy[1] >= 0.8, accuracy
    assert accuracy[20] <= 0.5, accuracy


@pytest.mark.parametrize("arch,kv", [("llama", 2), ("qwen2", 1), ("mistral", 4)])
def test_shared_prefix_path_equals_full_forwards(arch, kv):
    """On CPU, next_token_logits reuses the KV cache of prefixes shared between prompts
    (variants of one example with the gold elsewhere); it must equal plain forwards."""
    from focuslens.data import make_synthetic_qa, render
    from focuslens.measure.forward import next_token_logits
    from focuslens.model.testing import tiny_model

    model = tiny_model(arch, n_kv_heads=kv, seed=5)
    examples = make_synthetic_qa(3, n_documents=8, seed=3)
    prompts = [render(e.with_n_documents(8, pos), model.tokenizer) for e in examples for pos in (0, 3, 7)]
    prompts += [render(e.gold_only(), model.tokenizer) for e in examples]
    shared = next_token_logits(model, prompts, batch_size=1, quiet=True)
    with torch.no_grad():
        full = torch.stack([model(p.input_ids[None])[0, -1] for p in prompts])
    torch.testing.assert_close(shared, full, atol=1e-5, rtol=1e-5)


# ---------------------------------------------------------------- hand-written examples
def _founded(*years, candidates=None) -> QAExample:
    """A hand-written year question: one document per year, the first company's is gold;
    the candidates are the years unless given."""
    names = ["Varnex Motors", "Kolber Foods", "Trenix Labs"][: len(years)]
    docs = tuple(Document(n, f"{n} was founded in {y}.") for n, y in zip(names, years))
    return QAExample(instruction=LITM_INSTRUCTION, documents=docs, gold_index=0,
                     question="In which year was Varnex Motors founded?", answers=(years[0],),
                     answer_prefix="Varnex Motors was founded in",
                     candidates=years if candidates is None else candidates, qid="founded")


def _no_warnings(fn, *args, **kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        return fn(*args, **kwargs)


def test_smollm2_year_scores_the_first_digit_after_a_teacher_forced_space(smol_tokenizer):
    tok = smol_tokenizer
    ids, k, lead = split_visible(tok, " 1987")
    assert tok.convert_ids_to_tokens(ids) == ["Ġ", "1", "9", "8", "7"] and (k, lead) == (1, " ")
    assert tok.decode([first_token_id(tok, "1987")]) == "1"  # not the bare space 'Ġ'
    ex = _founded("1987")
    prompt, prefix_only = render(ex, tok), render(ex, tok, response=ex.answer_prefix)
    assert prompt.text == prefix_only.text + " " and prompt.n_tokens == prefix_only.n_tokens + 1
    assert prompt.input_ids[:-1].tolist() == prefix_only.input_ids.tolist()
    assert tok.convert_ids_to_tokens(prompt.input_ids[-2:].tolist()) == ["Ġin", "Ġ"]
    # the lead is an answer row, right after the answer prefix
    assert prompt.answer.start == prefix_only.answer.start and prompt.answer.end == prompt.n_tokens
    assert prompt.span_text(prompt.answer) == ex.answer_prefix + " "
    # the prompt is the canonical tokenization of the answered text, cut right before '1'
    answered = tok(prefix_only.text + " 1987", add_special_tokens=False)["input_ids"]
    assert answered[: prompt.n_tokens] == prompt.input_ids.tolist()
    assert answered[prompt.n_tokens] == candidate_token_ids(tok, ex)[0] == first_token_id(tok, "1987")


@torch.no_grad()
def test_smollm2_gold_only_year_prompt_is_scored_at_the_digit(smollm2):
    tok = smollm2.tokenizer
    ex = _founded("1987")
    row = evaluate_next_token(smollm2, [ex], quiet=True).iloc[0]
    prompt = render(ex, tok)
    logits = smollm2(prompt.input_ids[None].to(smollm2.cfg.device))[0, -1].float().cpu()
    gold = first_token_id(tok, "1987")
    assert row.correct == (int(logits.argmax()) == gold) and row.prediction == tok.decode([int(logits.argmax())])
    assert row.gold_logit == pytest.approx(logits[gold].item(), abs=1e-3)
    assert row.correct and row.prediction == "1"  # the document says 1987: the model writes '1' after the space
    # at the answer prefix itself the model's top-1 is the bare space, the token the old scoring took as gold
    before = smollm2(render(ex, tok, response=ex.answer_prefix).input_ids[None].to(smollm2.cfg.device))[0, -1]
    assert tok.decode([int(before.argmax())]) == " "
    assert math.isnan(row.candidate_correct) and math.isnan(row.margin)  # no other year in the prompt


def test_smollm2_multi_token_name_has_no_lead(smol_tokenizer):
    tok = smol_tokenizer
    name = "Wilhelm Conrad Röntgen"
    assert len(tok(" " + name, add_special_tokens=False)["input_ids"]) > 3
    docs = (Document("X-rays", f"X-rays were discovered by {name}."),
            Document("Radium", "Radium was discovered by Marie Curie."))
    ex = QAExample(instruction=LITM_INSTRUCTION, documents=docs, gold_index=0, question="Who discovered X-rays?",
                   answers=(name,), answer_prefix="X-rays were discovered by", candidates=(name, "Marie Curie"))
    assert answer_lead(tok, ex) == "" and render(ex, tok).text.endswith(ex.answer_prefix)
    gold, others = _no_warnings(candidate_token_ids, tok, ex)
    assert tok.decode([gold]) == " Wilhelm" and [tok.decode([o]) for o in others] == [" Marie"]
    wien = ex.replace(documents=docs + (Document("Wien", "Wilhelm Wien studied radiation."),),
                      candidates=(name, "Marie Curie", "Wilhelm Wien"))
    with pytest.warns(UserWarning, match="'Wilhelm Conrad Röntgen' and 'Wilhelm Wien' \\(' Wilhelm'\\)"):
        warn_unscorable(tok, [wien])
    assert candidate_token_ids(tok, wien) == (gold, others)  # Wilhelm Wien cannot compete with Wilhelm


def test_smollm2_candidates_are_compared_at_the_scored_position(smol_tokenizer):
    tok = smol_tokenizer
    # gold "1987" is scored at '1' after a forced space: "Paris" (['ĠParis']) parts from it
    # before that position and is no competitor there; "2001" needs '2' there.
    base = _founded("1987", "2001")
    ex = base.replace(documents=base.documents + (Document("Lyon", "Paris."),), candidates=("1987", "2001", "Paris"))
    gold, rivals = scored_tokens(tok, ex)
    assert tok.decode([gold]) == "1" and {c: tok.decode([t]) for c, t in rivals.items()} == {"1987": "1", "2001": "2"}
    # gold "Paris" is scored at 'ĠParis' after "in": a year needs the bare space there
    city = ex.replace(answers=("Paris",), candidates=("Paris", "2001"))
    gold, rivals = scored_tokens(tok, city)
    assert tok.decode([gold]) == " Paris" and tok.decode([rivals["2001"]]) == " "
    # without an answer prefix the answer opens the assistant turn: no leading space
    assert tok.decode([candidate_token_ids(tok, city.replace(answer_prefix=None))[0]]) == "Paris"


def test_shared_first_tokens_warn_and_leave_candidates_out(tiny_tok):
    model = get_tiny("llama", 2)
    ex = _founded("1987", "1992")
    gold, others = candidate_token_ids(tiny_tok, ex)
    assert tiny_tok.decode([gold]) == "1" and others == []  # '1' of 1992 cannot compete with '1' of 1987
    with pytest.warns(UserWarning, match=r"'1987' and '1992' \('1'\)") as caught:
        row = evaluate_next_token(model, [ex, ex.with_gold_at(1)], quiet=True).iloc[0]
    assert len([w for w in caught if "share the scored first token" in str(w.message)]) == 1
    assert math.isnan(row.candidate_correct) and math.isnan(row.margin)
    # a year with another first digit still competes, and no warning is given
    df = _no_warnings(evaluate_next_token, model, [_founded("1987", "2001")], quiet=True)
    assert df.candidate_correct.iloc[0] in (0.0, 1.0) and math.isfinite(df.margin.iloc[0])


def test_missing_answer_prefix_warns_once_per_call(tiny_tok):
    model = get_tiny("qwen2", 2)
    examples = make_synthetic_qa(3, n_documents=3, seed=4, answer_prefix=False)
    for run in (lambda: evaluate_next_token(model, examples, quiet=True),
                lambda: evaluate_variants(model, examples, _Unchanged(), quiet=True)):
        with pytest.warns(UserWarning, match="answer_prefix") as caught:
            run()
        messages = [str(w.message) for w in caught if "answer_prefix" in str(w.message)]
        assert len(messages) == 1 and "3 of 3 examples" in messages[0] and "newline" in messages[0]
    _no_warnings(evaluate_next_token, model, make_synthetic_qa(3, n_documents=3, seed=4), quiet=True)


class _Unchanged(Intervention):
    """Two variants that change nothing, at the answer rows (one shared prefill)."""

    rows = "answer"

    def n_variants(self, model):
        return 2

    def hooks(self, model, prompt=None, variants=None):
        return []


@torch.no_grad()
def test_no_candidates_give_nan_and_means_skip_it(tiny_tok):
    model = get_tiny("mistral", 1)
    lonely = _founded("1987", "2001", candidates=())
    rival = _founded("1987", "2001")
    df = evaluate_next_token(model, [lonely, rival], quiet=True)
    assert math.isnan(df.candidate_correct[0]) and math.isnan(df.margin[0]) and not math.isnan(df.gold_logit[0])
    assert df.candidate_correct[1] in (0.0, 1.0) and math.isfinite(df.margin[1])
    assert (df.candidate_correct[1] == 1.0) == (df.margin[1] > 0)
    var = evaluate_variants(model, [lonely, rival], _Unchanged(), quiet=True)
    assert var[var.example == 0].candidate_correct.isna().all() and var[var.example == 0].margin.isna().all()
    torch.testing.assert_close(torch.tensor(var[var.example == 1].margin.to_numpy()),
                               torch.tensor([df.margin[1]] * 2, dtype=torch.float64), atol=1e-4, rtol=1e-4)
    df["group"] = ["a", "a"]
    assert accuracy_by(df, "group", "candidate_correct") == {"a": df.candidate_correct[1]}  # the NaN is skipped


def test_smollm2_synthetic_answers_have_no_lead(smol_tokenizer):
    for ex in make_synthetic_qa(10, n_documents=5, seed=0):
        assert answer_lead(smol_tokenizer, ex) == ""
        prompt = render(ex, smol_tokenizer)
        assert prompt.text.endswith(ex.answer_prefix)
        answered = smol_tokenizer(prompt.text + " " + ex.answers[0], add_special_tokens=False)["input_ids"]
        assert answered[: prompt.n_tokens] == prompt.input_ids.tolist()
        assert answered[prompt.n_tokens] == first_token_id(smol_tokenizer, ex.answers[0])
