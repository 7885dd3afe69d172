"""`bayeskd teacher-check` against `bayeskd serve`, clean and with llama.cpp's ways (`serve.quirks`)."""

from __future__ import annotations

import pytest

from bayeskd.cli import main
from bayeskd.teachers.config import ServeConfig
from bayeskd.config import load_config
from bayeskd.teachers.check import check_teacher


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def check(server, capsys, *extra: str) -> tuple[int, dict[str, str], str]:
    """Exit code, property -> its line of the table, and stderr."""
    code = main(["teacher-check", "--positions", "128", "teacher.backend=openai", f"teacher.model={server.teacher.model_ref}",
                 f"teacher.base_url={server.base_url}", "collect.top_logprobs=3", "probe.budget_tokens=1000", *extra])  # fmt: skip
    out = capsys.readouterr()
    rows = {}
    for line in out.out.splitlines():
        cells = [c.strip() for c in line.split("│")]
        if len(cells) > 3 and cells[1] and cells[2] in ("OK", "WARN", "FAIL"):
            rows[cells[1]] = cells[2]
    return code, rows, out.err


def test_our_own_server_passes_every_row(server, capsys):
    code, rows, err = check(server, capsys)
    assert code == 0, err
    assert rows == dict.fromkeys(["n", "seed", "top_logprobs", "end of turn", "prompt rendering", "sampling"], "OK")


def test_a_server_that_ignores_n_is_reported_and_still_usable(tiny_teacher_dir, start_server, capsys):
    with start_server(tiny_teacher_dir, ServeConfig(port=0, quirks=["ignore_n", "topk_plus_sampled"])) as server:
        code, rows, err = check(server, capsys)
    assert code == 0, err
    assert rows["n"] == "WARN" and rows["top_logprobs"] == "OK" and rows["sampling"] == "OK"


def test_server_side_truncation_fails_the_check_until_extra_body_turns_it_off(tiny_teacher_dir, start_server, capsys):
    with start_server(tiny_teacher_dir, ServeConfig(port=0, quirks=["server_top_k"])) as server:
        code, rows, err = check(server, capsys)
        assert code == 2 and rows["sampling"] == "FAIL"
        assert "server-side truncation (top_k-like)" in err and "teacher.extra_body" in err
        code, rows, err = check(server, capsys, "teacher.extra_body={top_k: 0}")
    assert code == 0 and rows["sampling"] == "OK", err


def test_a_chat_template_with_an_extra_system_turn_is_a_rendering_mismatch(tiny_teacher_dir, start_server, capsys):
    with start_server(tiny_teacher_dir, ServeConfig(port=0, quirks=["extra_system_turn", "special_tokens_empty"])) as server:
        code, rows, err = check(server, capsys)
        assert code == 2 and rows["prompt rendering"] == "FAIL" and rows["end of turn"] == "OK"
        assert "teacher.completion_template" in err and "prompt tokens" in err
        code, rows, _ = check(server, capsys, "probe.budget_tokens=null")  # no probe: collect alone is not affected
    assert code == 0 and rows["prompt rendering"] == "WARN"


def test_how_the_end_of_turn_shows_is_reported(eager_eos_teacher_dir, start_server):
    """A teacher that often ends its turn, served as llama.cpp does: the final end-of-turn token
    not listed, special tokens shown as "", an immediate end of turn as an empty answer."""
    quirks = ["special_tokens_empty", "empty_end_of_turn"]
    with start_server(eager_eos_teacher_dir, ServeConfig(port=0, quirks=quirks)) as server:
        cfg = load_config(None, ["teacher.backend=openai", f"teacher.model={server.teacher.model_ref}",
                                 f"teacher.base_url={server.base_url}"])  # fmt: skip
        report = check_teacher(cfg, [{"role": "user", "content": "Name a colour."}], positions=64)
        billed = dict(server.app.state.billed)
    row = next(r for r in report.rows if r.name == "end of turn")
    assert row.status == "ok" and "the end-of-turn token not listed" in row.found
    assert "empty answers" in row.note and 'alternatives ""' in row.note and "no logprob evidence" in row.note
    assert (report.usage.prompt_tokens, report.usage.completion_tokens) == (billed["prompt_tokens"], billed["completion_tokens"])
