import pytest

from bayeskd.artifacts import Run, StaleStageError, fingerprint_file
from bayeskd.errors import BayeskdError


def test_stage_lifecycle(tmp_path):
    run = Run(tmp_path)
    out = run.begin("collect", {"n": 1}, {"prompts": "abc"})
    assert out == tmp_path / "collect"
    assert run.manifest("collect")["status"] == "running"
    (out / "corpus.jsonl").write_text("{}\n")
    run.finish("collect", "done", {"records": 1}, {"corpus": fingerprint_file(out / "corpus.jsonl")})
    m = run.manifest("collect")
    assert m["status"] == "done" and m["summary"] == {"records": 1} and "torch" in m["versions"]
    assert run.begin("collect", {"n": 1}, {"prompts": "abc"}) is None  # skipped
    with pytest.raises(StaleStageError, match=r"another config \(n\)"):
        run.begin("collect", {"n": 2}, {"prompts": "abc"})
    with pytest.raises(StaleStageError, match=r"input \(prompts\)"):
        run.begin("collect", {"n": 1}, {"prompts": "xyz"})
    assert run.output("collect", "corpus.jsonl") == out / "corpus.jsonl"
    assert run.begin("collect", {"n": 2}, {"prompts": "abc"}, force=True) == out
    assert run.manifest("collect")["status"] == "running"


def test_output_of_an_unfinished_stage_is_a_clear_error(tmp_path):
    run = Run(tmp_path)
    with pytest.raises(BayeskdError, match="run `bayeskd collect` first"):
        run.output("collect", "corpus.jsonl")
    run.begin("collect", {}, {})
    with pytest.raises(BayeskdError, match="run `bayeskd collect` first"):
        run.output("collect", "corpus.jsonl")


def test_fingerprints_change_with_content(tmp_path):
    f = tmp_path / "a.txt"
    f.write_text("one")
    a = fingerprint_file(f)
    f.write_text("two")
    assert fingerprint_file(f) != a
    d = tmp_path / "d"
    d.mkdir()
    (d / "x").write_text("1")
    b = fingerprint_file(d)
    (d / "y").write_text("2")
    assert fingerprint_file(d) != b
