"""Bad inputs found by the fault probe: each must be a DataError that names the file and field.

Data files (empty, truncated gzip, Latin-1), KV keys the prompt's JSON cannot hold,
generator and training settings, saved per-head results, FocusDirections artifacts and the
paper's release files.
"""

from __future__ import annotations

import gzip
import json
import re
import math
import os

import pytest
import torch

from focuslens.causal.patching import PatchingResult
from focuslens.data.kv_retrieval import load_kv_file, make_kv_examples
from focuslens.data.lost_in_the_middle import load_qa_file, make_nq_distractor_examples
from focuslens.data.synthetic import make_synthetic_qa
from focuslens.directions.artifact import FocusDirections, import_release
from focuslens.directions.train import train_directions
from focuslens.errors import DataError, ModelError
from focuslens.measure.scoring import HeadScores

QA_LINE = {"question": "who discovered X-rays", "answers": ["Wilhelm Röntgen"],
           "ctxs": [{"title": "Röntgen", "text": "Wilhelm Röntgen discovered X-rays.", "isgold": True},
                    {"title": "Other", "text": "Something else entirely."}]}
KV_LINE = {"ordered_kv_records": [["k1-é", "v1"], ["k2", "v2"]], "key": "k1-é", "value": "v1"}
LOADERS = {
    "load_qa_file": (QA_LINE, load_qa_file),
    "make_nq_distractor_examples": (QA_LINE, lambda p: make_nq_distractor_examples(p, n_documents=1,
                                                                                   gold_positions=(0,))),
    "load_kv_file": (KV_LINE, load_kv_file),
}
L, H, D = 2, 4, 8


def _text(line: dict, n: int = 40) -> str:
    return "".join(json.dumps(dict(line, question=f"q {i}") if "question" in line else line,
                              ensure_ascii=False) + "\n" for i in range(n))


# ---------------------------------------------------------------- data files
@pytest.mark.parametrize("loader", LOADERS)
@pytest.mark.parametrize("name, content", [("empty.jsonl", b""), ("blank.jsonl", b"\n  \n"),
                                           ("empty.jsonl.gz", gzip.compress(b""))])
def test_empty_file_has_no_records(tmp_path, loader, name, content):
    path = tmp_path / name
    path.write_bytes(content)
    with pytest.raises(DataError, match="no records") as e:
        LOADERS[loader][1](path)
    assert str(path) in str(e.value)


@pytest.mark.parametrize("loader", LOADERS)
def test_truncated_gzip_names_the_file(tmp_path, loader):
    raw = gzip.compress(_text(LOADERS[loader][0]).encode())
    path = tmp_path / "trunc.jsonl.gz"
    path.write_bytes(raw[: len(raw) * 2 // 3])
    with pytest.raises(DataError, match="truncated or corrupt") as e:
        LOADERS[loader][1](path)
    assert str(path) in str(e.value)


@pytest.mark.parametrize("loader", LOADERS)
def test_latin1_file_names_the_file_and_line(tmp_path, loader):
    line = LOADERS[loader][0]
    path = tmp_path / "latin1.jsonl"
    path.write_bytes((json.dumps(line, ensure_ascii=True) + "\n" + _text(line, 1)).encode("latin-1"))
    with pytest.raises(DataError, match="not UTF-8") as e:
        LOADERS[loader][1](path)
    assert f"{path}, line 2" in str(e.value)


@pytest.mark.parametrize("key, bad", [('ab"c', '"'), ("a\\b", "\\"), ("a\nb", "\n")])
def test_kv_key_that_json_must_escape_is_refused(tmp_path, key, bad):
    path = tmp_path / "kv.jsonl"
    path.write_text(json.dumps({"ordered_kv_records": [[key, "v1"], ["k2", "v2"]], "key": key, "value": "v1"}) + "\n")
    with pytest.raises(DataError, match="ordered_kv_records") as e:
        load_kv_file(path)
    assert f"{path}, line 1" in str(e.value) and repr(key) in str(e.value) and repr(bad) in str(e.value)


def test_kv_value_that_json_must_escape_is_refused(tmp_path):
    path = tmp_path / "kv.jsonl"
    path.write_text(json.dumps({"ordered_kv_records": [["k1", 'v"1'], ["k2", "v2"]], "key": "k2", "value": "v2"}) + "\n")
    with pytest.raises(DataError, match=r"value 'v\"1' \(of key 'k1'\)"):
        load_kv_file(path)


@pytest.mark.parametrize("make, kwargs, field", [
    (make_synthetic_qa, {"n_examples": 2.5}, "n_examples"),
    (make_synthetic_qa, {"n_examples": True}, "n_examples"),
    (make_synthetic_qa, {"n_examples": 0}, "n_examples"),
    (make_synthetic_qa, {"n_examples": 1, "n_documents": 2.0}, "n_documents"),
    (make_synthetic_qa, {"n_examples": 1, "gold_position": 1.5}, "gold_position"),
    (make_kv_examples, {"n_examples": 1.5}, "n_examples"),
    (make_kv_examples, {"n_examples": 1, "n_pairs": 0}, "n_pairs"),
])
def test_generator_counts_must_be_integers(make, kwargs, field):
    n = kwargs.pop("n_examples")
    with pytest.raises(DataError, match=field):
        make(n, **kwargs)


# ---------------------------------------------------------------- training settings
@pytest.mark.parametrize("field, value", [("epochs", 0), ("batch_size", 0), ("patience", 0),
                                          ("lr", 0.0), ("lr", math.nan), ("weight_decay", -1.0),
                                          ("init_std", math.inf)])
def test_train_directions_refuses_bad_settings(field, value):
    # checked before the model is touched, so no model is needed
    with pytest.raises(DataError, match=f"{field}="):
        train_directions(None, [], **{field: value}, quiet=True)


# ---------------------------------------------------------------- saved per-head results
def _scores_file(tmp_path, edit):
    g = torch.Generator().manual_seed(0)
    hs = HeadScores(mean={m: torch.rand(L, H, generator=g) for m in ("gold", "sink")},
                    ci_low={m: torch.rand(L, H, generator=g) for m in ("gold", "sink")},
                    ci_high={m: torch.rand(L, H, generator=g) for m in ("gold", "sink")})
    path = hs.save(tmp_path / "scores.json")
    blob = json.loads(path.read_text())
    edit(blob)
    path.write_text(json.dumps(blob))
    return path


@pytest.mark.parametrize("field", ["mean", "ci_low", "ci_high"])
def test_head_scores_ragged_lists(tmp_path, field):
    path = _scores_file(tmp_path, lambda b: b[field].__setitem__("sink", [[0.1] * H, [0.1] * (H - 1)]))
    with pytest.raises(DataError, match=f"field '{field}', metric 'sink'") as e:
        HeadScores.load(path)
    assert str(path) in str(e.value)


@pytest.mark.parametrize("field", ["ci_low", "ci_high"])
def test_head_scores_companion_shape(tmp_path, field):
    path = _scores_file(tmp_path, lambda b: b[field].__setitem__("sink", [[0.1] * (H + 3)] * L))
    with pytest.raises(DataError, match=rf"field '{field}', metric 'sink' has shape \(2, 7\)") as e:
        HeadScores.load(path)
    assert str(path) in str(e.value)


def test_head_scores_field_not_an_object(tmp_path):
    path = _scores_file(tmp_path, lambda b: b.__setitem__("ci_low", [1, 2]))
    with pytest.raises(DataError, match=f"{path}: field 'ci_low' must be an object"):
        HeadScores.load(path)


def test_patching_per_example_keeps_its_example_axis(tmp_path):
    per = {"exact": torch.rand(3, L, H)}
    result = PatchingResult({"exact": per["exact"].mean(0)}, per, {})
    path = result.save(tmp_path / "patch.json")
    assert PatchingResult.load(path).per_example["exact"].shape == (3, L, H)
    blob = json.loads(path.read_text())
    blob["per_example"]["exact"] = [[[0.1] * (H + 1)] * L] * 3
    path.write_text(json.dumps(blob))
    with pytest.raises(DataError, match=r"field 'per_example', method 'exact' has shape \(3, 2, 5\)"):
        PatchingResult.load(path)


# ---------------------------------------------------------------- FocusDirections
def _dirs(ranking=()):
    g = torch.Generator().manual_seed(0)
    return FocusDirections(torch.randn(L, H, D, generator=g), torch.randn(L, H, D, generator=g), list(ranking),
                           {"model": "tiny"})


@pytest.mark.parametrize("entry", [(99, 0), (0, H), (-1, 0)])
def test_ranking_outside_the_shape(entry):
    with pytest.raises(ModelError, match=rf"ranking entry 1 \({entry[0]}, {entry[1]}\) is outside"):
        _dirs([(0, 0), entry])


def test_ranking_entry_not_a_pair():
    with pytest.raises(DataError, match=r"ranking\[0\]: \(0, 0, 1\) is not a \(layer, head\) pair"):
        _dirs([(0, 0, 1)])


def test_norms_do_not_hide_nan():
    d = _dirs([(0, 0)])
    d.q[0, 0, 0] = math.nan  # after construction, which refuses non-finite directions
    summary = d.norm_summary(top_k=1)
    assert math.isnan(summary["q_norm"]["median"]) and math.isnan(summary["q_norm"]["max"])
    assert math.isnan(summary["q_norm"]["median_top1"])


def _saved(tmp_path, edit_json=None, edit_tensors=None):
    """Saved directions, edited by hand; without the manifest (a folder made by hand or by an
    older focuslens), so that the loader's own checks of each file are what is tested."""
    path = _dirs([(0, 0), (1, 1)]).save(tmp_path / "dirs")
    (path / "manifest.json").unlink()
    meta = path / "focus_directions.json"
    if edit_json:
        blob = json.loads(meta.read_text())
        out = edit_json(blob)
        meta.write_text(out if isinstance(out, str) else json.dumps(blob))
    if edit_tensors:
        st = path / "focus_directions.safetensors"
        st.write_bytes(edit_tensors(st.read_bytes()))
    return path


@pytest.mark.parametrize("name,edit", [("focus_directions.json", lambda raw: raw.replace(b'"format"', b'"Format"')),
                                       ("focus_directions.safetensors", lambda raw: raw[:-4] + b"\x00\x00\xc0\x7f"),
                                       ("focus_directions.safetensors", lambda raw: raw[:100])])
def test_load_names_the_file_that_differs_from_the_manifest(tmp_path, name, edit):
    path = _dirs([(0, 0), (1, 1)]).save(tmp_path / "dirs")
    FocusDirections.load(path)
    (path / name).write_bytes(edit((path / name).read_bytes()))  # same size (a NaN's bytes) or cut
    with pytest.raises(DataError, match=rf"dirs/{re.escape(name)}: .*manifest.json says"):
        FocusDirections.load(path)


def test_load_ranking_outside_the_shape(tmp_path):
    path = _saved(tmp_path, lambda b: b["ranking"].insert(0, [99, 0]))
    with pytest.raises(ModelError, match=r"focus_directions.json: ranking entry 0 \(99, 0\)"):
        FocusDirections.load(path)


def test_load_truncated_json(tmp_path):
    path = _saved(tmp_path, lambda b: json.dumps(b)[:40])
    with pytest.raises(DataError, match="focus_directions.json: cannot read"):
        FocusDirections.load(path)


@pytest.mark.parametrize("key", ["shape", "ranking", "metadata"])
def test_load_missing_key(tmp_path, key):
    path = _saved(tmp_path, lambda b: (b.pop(key), None)[1])
    with pytest.raises(DataError, match=f"focus_directions.json: key '{key}' is missing"):
        FocusDirections.load(path)


def test_load_truncated_safetensors_without_sha256(tmp_path):
    path = _saved(tmp_path, lambda b: (b.pop("sha256"), None)[1], lambda raw: raw[:100])
    with pytest.raises(DataError, match="focus_directions.safetensors: not a readable safetensors file"):
        FocusDirections.load(path)


# ---------------------------------------------------------------- the paper's release
def _release(tmp_path, q0: bytes):
    root = tmp_path / "org_tiny-model"
    root.mkdir()
    for layer in range(L):
        for kind in "qk":
            torch.save(torch.randn(H, D), root / f"head_{kind}_directions_{layer}.pth")
    (root / "head_q_directions_0.pth").write_bytes(q0)
    return root


def test_release_random_bytes(tmp_path):
    root = _release(tmp_path, os.urandom(512))
    with pytest.raises(DataError, match="head_q_directions_0.pth: not a readable torch tensor file"):
        import_release(root)


def test_release_lfs_pointer(tmp_path):
    root = _release(tmp_path, b"version https://git-lfs.github.com/spec/v1\noid sha256:4d7a21\nsize 13592\n")
    with pytest.raises(DataError, match="head_q_directions_0.pth is a Git LFS pointer") as e:
        import_release(root)
    assert "git lfs pull" in str(e.value)


def test_a_prompt_rendered_with_another_tokenizer_is_refused_by_name():
    from focuslens import make_synthetic_qa, render, score_heads
    from focuslens.model.testing import tiny_model, tiny_tokenizer
    model = tiny_model("llama")
    example = make_synthetic_qa(1, n_documents=3, seed=0)[0]
    other = tiny_tokenizer(extra_words=[f"w{i}" for i in range(300)])  # more words: other ids, a larger vocabulary
    with pytest.raises(DataError, match=r"examples\[0\] was rendered with another tokenizer than the model's"):
        score_heads(model, [render(example, other)], quiet=True)
    same = render(example, tiny_tokenizer())  # the same tokenizer, loaded again: accepted
    assert same.tokenizer == render(example, model.tokenizer).tokenizer


def test_a_model_without_rotary_queries_is_refused_at_load_naming_the_capability():
    from transformers import GPT2Config, GPT2LMHeadModel

    from focuslens.model.load import load_model
    from focuslens.model.testing import tiny_tokenizer
    gpt2 = GPT2LMHeadModel(GPT2Config(n_layer=2, n_head=2, n_embd=32, vocab_size=200, bos_token_id=0, eos_token_id=0))
    with pytest.raises(ModelError, match=r"GPT2LMHeadModel has no rotary position embedding \(no hook_rot_q\)"):
        load_model(gpt2, tokenizer=tiny_tokenizer())


@pytest.mark.parametrize("device,says", [("gpu", "is not a torch device"), ("xla", "not 'xla'")])
def test_an_unknown_device_is_refused_at_load(device, says):
    from focuslens.model.load import load_model
    with pytest.raises(ModelError, match=rf"device='{device}'.*{says}"):
        load_model("smollm2-135m-instruct", device=device)
