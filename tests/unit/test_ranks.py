"""How the ranks of a distributed launch split work and wait for each other (`ranks`), and the
merge of their target-store parts (`targets.merge_stores`)."""

from __future__ import annotations

import threading

import numpy as np
import pytest

from bayeskd.estimate.distributions import SparseDist
from bayeskd.estimate.targets import TargetStore, TargetWriter, merge_stores
from bayeskd.ranks import Launch, RankFailedError, shard


def test_shards_are_contiguous_cover_everything_and_balance_the_weight():
    weights = [5, 1, 1, 1, 1, 1, 5, 3, 2, 7]
    for world in (1, 2, 3, 4, 16):
        bounds = [shard(weights, r, world) for r in range(world)]
        assert bounds[0][0] == 0 and bounds[-1][1] == len(weights)
        assert all(a[1] == b[0] for a, b in zip(bounds, bounds[1:]))
    assert [shard(weights, r, 2) for r in range(2)] == [(0, 7), (7, 10)]  # weights 15 | 12 of 27
    assert shard([], 1, 2) == (0, 0)


def test_one_process_neither_waits_nor_writes(tmp_path):
    launch = Launch()
    assert not launch.distributed and launch.main
    assert launch.broadcast("x", 3) == 3 and launch.gather("y", 4) == [4]
    assert launch.shard([1, 2, 3]) == (0, 3)


def test_broadcast_and_gather_between_two_ranks(tmp_path):
    ranks = [Launch(tmp_path, r, 2, poll_s=0.01) for r in range(2)]
    got = {}
    worker = threading.Thread(target=lambda: got.update(b=ranks[1].broadcast("begin x"), g=ranks[1].gather("parts", "one")))
    worker.start()
    assert ranks[0].broadcast("begin x", {"skip": False}) == {"skip": False}
    assert ranks[0].gather("parts", "zero") == ["zero", "one"]
    worker.join(5)
    assert got == {"b": {"skip": False}, "g": None}
    # A name used again is a new signal, not the old one read twice.
    worker = threading.Thread(target=lambda: got.update(b=ranks[1].broadcast("begin x")))
    worker.start()
    ranks[0].broadcast("begin x", {"skip": True})
    worker.join(5)
    assert got["b"] == {"skip": True}


def test_a_failed_rank_stops_the_ones_waiting_for_it(tmp_path):
    zero, one = Launch(tmp_path, 0, 2, poll_s=0.01), Launch(tmp_path, 1, 2, poll_s=0.01)
    zero.fail("BayeskdError: the teacher refused")
    with pytest.raises(RankFailedError, match="rank 0 of this launch stopped: BayeskdError: the teacher refused"):
        one.broadcast("stage collect")


def _dists(rng, n: int, k: int) -> dict[str, SparseDist]:
    probs = rng.dirichlet(np.ones(k + 1), n)[:, :k]
    ids = rng.integers(0, 100, (n, k)).astype(np.int32)
    return {"posterior": SparseDist(ids, probs, 1 - probs.sum(1))}


def test_merged_parts_are_the_store_one_writer_writes(tmp_path):
    rng = np.random.default_rng(0)
    records = [(i, _dists(rng, n, 4), rng.random(n)) for i, n in enumerate([3, 5, 2, 7, 1, 4])]
    one = TargetWriter(tmp_path / "one", ("posterior",), 4, shard_rows=6)
    for r in records:
        one.add(*r)
    one.close({"corpus": "c"})
    parts = []
    for p, chunk in enumerate([records[:2], records[2:5], records[5:]]):
        w = TargetWriter(tmp_path / f"part{p}", ("posterior",), 4, shard_rows=6)
        for r in chunk:
            w.add(*r)
        w.close({"corpus": "c"})
        parts.append(tmp_path / f"part{p}")
    merged = merge_stores(parts, tmp_path / "merged", {"corpus": "c"}, shard_rows=6)
    expected = TargetStore.open(tmp_path / "one")
    assert merged.meta == expected.meta and merged._index == expected._index
    files = sorted(p.relative_to(tmp_path / "one").as_posix() for p in (tmp_path / "one").rglob("*"))
    assert files == sorted(p.relative_to(tmp_path / "merged").as_posix() for p in (tmp_path / "merged").rglob("*"))
    for f in (tmp_path / "one").rglob("*.npy"):
        np.testing.assert_array_equal(np.load(f), np.load(tmp_path / "merged" / f.relative_to(tmp_path / "one")))
