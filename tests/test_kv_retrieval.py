"""Lost-in-the-Middle key-value retrieval: the template, the loader and the generator."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from conftest import SHARED_DATA, require_shared

from focuslens.data import (
    KV_INSTRUCTION,
    Document,
    QAExample,
    load_kv_file,
    make_kv_examples,
    render,
    render_user_text,
)
from focuslens.errors import DataError

KV_FILE = SHARED_DATA / "lost-in-the-middle" / "kv-retrieval-75_keys.jsonl.gz"
UUID4 = re.compile(r"^[0-9a-f]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}$")


def _write(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


TEST_ROW = {
    "ordered_kv_records": [["test key1", "test value1"], ["test key2", "test value2"], ["test key3", "test value3"]],
    "key": "test key2",
    "value": "test value2",
}


def test_kv_template_is_exactly_lost_in_the_middle(tmp_path):
    expected = (
        "Extract the value corresponding to the specified key in the JSON object below.\n\n"
        "JSON data:\n"
        '{"test key1": "test value1",\n'
        ' "test key2": "test value2",\n'
        ' "test key3": "test value3"}\n\n'
        'Key: "test key2"\n'
        "Corresponding value:"
    )
    (ex,) = load_kv_file(_write(tmp_path / "kv.jsonl", [TEST_ROW]))
    assert KV_INSTRUCTION == expected.split("\n")[0]
    assert render_user_text(ex) == expected
    assert ex.gold_index == 1 and ex.question == "test key2" and ex.answers == ("test value2",)
    assert ex.candidates == ("test value1", "test value2", "test value3")
    assert ex.meta["layout"] == "kv" and ex.meta["line"] == 1 and ex.qid == "kv-1"
    # With one record the object opens and closes on the same line.
    single = QAExample(KV_INSTRUCTION, (Document("k", "v"),), 0, "k", ("v",), meta={"layout": "kv"})
    assert '\nJSON data:\n{"k": "v"}\n\nKey: "k"\n' in render_user_text(single)


def test_load_kv_file_gold_position_and_limit(tmp_path):
    path = _write(tmp_path / "kv.jsonl", [TEST_ROW, {**TEST_ROW, "key": "test key3", "value": "test value3"}])
    assert len(load_kv_file(path, limit=1)) == 1
    first, second = load_kv_file(path, gold_position=0)
    assert [d.title for d in first.documents] == ["test key2", "test key1", "test key3"]
    assert first.gold_index == 0 and second.gold == Document("test key3", "test value3")
    with pytest.raises(DataError, match="line 1"):
        load_kv_file(path, gold_position=3)


@pytest.mark.parametrize(
    "change, field",
    [
        (lambda r: r.pop("ordered_kv_records"), "ordered_kv_records"),
        (lambda r: r.pop("key"), "key"),
        (lambda r: r.pop("value"), "value"),
        (lambda r: r.update(key="no such key"), "key"),
        (lambda r: r.update(value="wrong value"), "value"),
        (lambda r: r["ordered_kv_records"].append(["test key1", "other"]), "ordered_kv_records"),
        (lambda r: r["ordered_kv_records"].append(["only a key"]), "ordered_kv_records"),
    ],
)
def test_bad_kv_line_names_file_line_and_field(tmp_path, change, field):
    bad = json.loads(json.dumps(TEST_ROW))
    change(bad)
    path = _write(tmp_path / "bad.jsonl", [TEST_ROW, bad])
    with pytest.raises(DataError) as err:
        load_kv_file(path)
    message = str(err.value)
    assert f"'{field}'" in message and "line 2" in message and "bad.jsonl" in message


def test_make_kv_examples_is_seeded_and_places_the_gold():
    a = make_kv_examples(4, n_pairs=10, seed=3)
    assert a == make_kv_examples(4, n_pairs=10, seed=3)
    assert a != make_kv_examples(4, n_pairs=10, seed=4)
    for ex in a:
        assert ex.n_documents == 10 and ex.gold.title == ex.question and ex.answers == (ex.gold.text,)
        assert ex.candidates == tuple(d.text for d in ex.documents)
        uuids = [d.title for d in ex.documents] + list(ex.candidates)
        assert all(UUID4.match(u) for u in uuids) and len(set(uuids)) == 20
    for where, index in [("first", 0), ("middle", 4), ("last", 9), (7, 7)]:
        assert {e.gold_index for e in make_kv_examples(3, n_pairs=10, gold_position=where)} == {index}
    spread = {e.gold_index for e in make_kv_examples(50, n_pairs=10, seed=0)}
    assert len(spread) > 5
    with pytest.raises(DataError, match="gold_position"):
        make_kv_examples(1, n_pairs=10, gold_position="centre")


def test_real_kv_file():
    examples = load_kv_file(require_shared(KV_FILE))  # a skip without ../shared, a failure in CI
    assert len(examples) == 500
    for ex in examples:
        assert ex.n_documents == 75 and len(ex.candidates) == 75
        assert ex.gold.title == ex.question and ex.answers == (ex.gold.text,)
        assert UUID4.match(ex.question)
    assert len({ex.gold_index for ex in examples}) > 50  # the file spreads the queried key


def test_rendered_kv_gold_span_covers_the_record(smol_tokenizer):
    for where in ("first", "middle", "last"):
        ex = make_kv_examples(1, n_pairs=5, gold_position=where, seed=1)[0]
        prompt = render(ex, smol_tokenizer)
        record = f'"{ex.gold.title}": "{ex.gold.text}"'
        covered = prompt.span_text(prompt.gold)
        # BPE merges the record's quotes with the JSON punctuation around it ('{"', ' "',
        # '",', '"}'), so the token span can reach one delimiter beyond the record, no further.
        assert record in covered and covered.strip("{}, ") == record
        assert prompt.span_text(prompt.question) == f'Key: "{ex.question}"'
        others = [prompt.span_text(s) for i, s in enumerate(prompt.documents) if i != ex.gold_index]
        assert not any(ex.gold.text in t for t in others)
