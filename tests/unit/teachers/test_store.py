import json

import pytest

from bayeskd.teachers.config import PriceConfig
from bayeskd.teachers.store import Ledger, ResponseStore


def rec(key, **extra):
    return {"key": key, "teacher": "t", "call": f"call-{key}", "usage": {"prompt_tokens": 3, "completion_tokens": 5}, **extra}


def test_append_get_and_skip_duplicates(tmp_path):
    with ResponseStore(tmp_path, flush_every=2) as store:
        assert store.append(rec("a", text="x"))
        assert store.append(rec("b", text="y"))
        assert not store.append(rec("a", text="other"))
        assert store.get("a")["text"] == "x"
    store = ResponseStore(tmp_path)
    assert len(store) == 2 and "b" in store and "c" not in store
    assert [r["key"] for r in store.records()] == ["a", "b"]


@pytest.mark.parametrize("tail", [b'{"key": "c", "tex', b'{"key": "c"} garbage\n', b"\xff\xfe\n"])
def test_torn_last_line_is_repaired(tmp_path, tail):
    with ResponseStore(tmp_path) as store:
        store.append(rec("a"))
        store.append(rec("b"))
    shard = next(tmp_path.glob("records-*.jsonl"))
    with open(shard, "ab") as f:
        f.write(tail)
    store = ResponseStore(tmp_path)
    assert store.repaired == 1
    assert sorted(store.index) == ["a", "b"]
    store.append(rec("c"))
    store.close()
    lines = shard.read_bytes().splitlines()
    assert [json.loads(line)["key"] for line in lines] == ["a", "b", "c"]


def test_shards_roll_over_and_reload(tmp_path):
    with ResponseStore(tmp_path, shard_records=3) as store:
        for i in range(7):
            store.append(rec(str(i)))
    assert len(list(tmp_path.glob("records-*.jsonl"))) == 3
    store = ResponseStore(tmp_path, shard_records=3)
    assert [store.get(str(i))["key"] for i in range(7)] == [str(i) for i in range(7)]
    store.append(rec("7"))
    store.close()
    assert len(ResponseStore(tmp_path)) == 8


def test_ledger_counts_a_call_once_and_prices_it():
    ledger = Ledger(price=PriceConfig(prompt_per_1k=1.0, completion_per_1k=2.0))
    ledger.add("t", "call-1", 100, 50)
    ledger.add("t", "call-1", 100, 50)  # the second sample of the same call
    ledger.add("u", "call-2", 10, 0)
    assert ledger.tokens == 160
    assert ledger.cost == pytest.approx(0.1 + 0.1 + 0.01)
    d = ledger.to_dict()
    assert d["calls"] == 2 and d["prompt_tokens"] == {"t": 100, "u": 10}
