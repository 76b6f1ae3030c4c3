"""Lost-in-the-Middle key-value retrieval: find one key's value in a JSON object of UUIDs.

Each record is a :class:`Document` with ``title=key`` and ``text=value``; the example's
``meta["layout"] = "kv"`` makes :func:`focuslens.data.render` write the paper's prompt::

    Extract the value corresponding to the specified key in the JSON object below.

    JSON data:
    {"k1": "v1",
     "k2": "v2"}

    Key: "k2"
    Corresponding value:

The gold document is the queried record; ``candidates`` are all the values, so candidate
accuracy asks whether the model picks the right value among those it was shown.

>>> ex = make_kv_examples(1, n_pairs=3, gold_position="last", seed=0)[0]
>>> ex.gold_index, ex.gold.title == ex.question, ex.answers == (ex.gold.text,)
(2, True, True)
"""

from __future__ import annotations

import random
import re
import uuid
from pathlib import Path

from focuslens.data.examples import Document, QAExample
from focuslens.data.lost_in_the_middle import numbered_records
from focuslens.data.synthetic import count, resolve_position
from focuslens.errors import DataError

__all__ = ["KV_INSTRUCTION", "load_kv_file", "make_kv_examples"]

#: The instruction of Lost-in-the-Middle's ``kv_retrieval.prompt``.
KV_INSTRUCTION = "Extract the value corresponding to the specified key in the JSON object below."


#: what JSON must escape: the kv layout writes keys and values between quotes as they are
_NEEDS_ESCAPE = re.compile(r'["\\\x00-\x1f]')


def _check_unescaped(records: list[tuple[str, str]], where: str) -> None:
    """Refuse a key or value the kv layout cannot write as JSON without escaping."""
    for k, v in records:
        for name, text in (("key", k), ("value", v)):
            bad = _NEEDS_ESCAPE.search(text)
            if bad:
                raise DataError(
                    f"{where}: field 'ordered_kv_records': the {name} {text!r}"
                    f"{'' if name == 'key' else f' (of key {k!r})'} contains "
                    f"{bad[0]!r}, which the prompt's JSON object would show unescaped."
                )


def _kv_example(
    records: list[tuple[str, str]], key: str, value: str, *, qid: str, meta: dict, where: str
) -> QAExample:
    """The example asking for ``key`` among ``records`` (checked: unique keys, key present)."""
    keys = [k for k, _ in records]
    if len(set(keys)) != len(keys):
        dup = next(k for i, k in enumerate(keys) if k in keys[:i])
        raise DataError(f"{where}: field 'ordered_kv_records' repeats the key {dup!r}.")
    if key not in keys:
        raise DataError(f"{where}: field 'key' {key!r} is not a key of 'ordered_kv_records'.")
    _check_unescaped(records, where)
    gold = keys.index(key)
    if records[gold][1] != value:
        raise DataError(
            f"{where}: field 'value' {value!r} differs from the record's value {records[gold][1]!r}."
        )
    try:
        return QAExample(
            instruction=KV_INSTRUCTION,
            documents=tuple(Document(title=k, text=v) for k, v in records),
            gold_index=gold,
            question=key,
            answers=(value,),
            candidates=tuple(v for _, v in records),
            qid=qid,
            meta={**meta, "layout": "kv"},
        )
    except DataError as e:
        raise DataError(f"{where}: {e}") from None


def _records(line: dict, where: str) -> list[tuple[str, str]]:
    if "ordered_kv_records" not in line:
        raise DataError(f"{where}: missing field 'ordered_kv_records'.")
    raw = line["ordered_kv_records"]
    if not isinstance(raw, list) or not all(
        isinstance(r, list | tuple) and len(r) == 2 and all(isinstance(x, str) for x in r)
        for r in raw
    ):
        raise DataError(f"{where}: field 'ordered_kv_records' must be a list of [key, value] strings.")
    return [(k, v) for k, v in raw]


def load_kv_file(
    path: str | Path, *, gold_position: int | None = None, limit: int | None = None
) -> list[QAExample]:
    """Load a Lost-in-the-Middle ``kv_retrieval_data`` file (``.jsonl`` or ``.jsonl.gz``).

    Each line ``{"ordered_kv_records": [[k, v], ...], "key": k, "value": v}`` becomes one
    example with the records in file order (``gold_position`` moves the queried record,
    keeping the others' order), ``qid=f"kv-{line}"`` and ``meta={"source", "line", "layout"}``.
    """
    examples = []
    for n, line in numbered_records(path):
        if limit is not None and len(examples) >= limit:
            break
        where = f"{path}, line {n}"
        records = _records(line, where)
        for name in ("key", "value"):
            if name not in line:
                raise DataError(f"{where}: missing field {name!r}.")
            if not isinstance(line[name], str):
                raise DataError(f"{where}: field {name!r} must be a string.")
        meta = {"source": str(path), "line": n}
        ex = _kv_example(records, line["key"], line["value"], qid=f"kv-{n}", meta=meta, where=where)
        if gold_position is not None:
            try:
                ex = ex.with_gold_at(gold_position)
            except DataError as e:
                raise DataError(f"{where}: {e}") from None
        examples.append(ex)
    return examples


def _random_uuid(rng: random.Random) -> str:
    """A UUID4-formatted string drawn from ``rng`` (``uuid.uuid4()`` cannot be seeded)."""
    return str(uuid.UUID(int=rng.getrandbits(128), version=4))


def make_kv_examples(
    n_examples: int,
    *,
    n_pairs: int = 75,
    gold_position: int | str = "random",
    seed: int = 0,
) -> list[QAExample]:
    """Generate seeded key-value retrieval examples like the paper's (random UUID pairs).

    Args:
        n_examples: how many examples.
        n_pairs: records per JSON object.
        gold_position: index of the queried record, or ``"random"``, ``"first"``,
            ``"middle"``, ``"last"``.
        seed: the generator seed (the same seed gives the same examples).
    """
    count("n_examples", n_examples)
    count("n_pairs", n_pairs)
    rng = random.Random(seed)
    examples = []
    for i in range(n_examples):
        records = [(_random_uuid(rng), _random_uuid(rng)) for _ in range(n_pairs)]
        pos = resolve_position(gold_position, n_pairs, rng)
        key, value = records[pos]
        meta = {"source": "kv-synthetic", "seed": seed, "gold_position": pos}
        examples.append(
            _kv_example(records, key, value, qid=f"kv-{seed}-{i}", meta=meta, where="make_kv_examples")
        )
    return examples
