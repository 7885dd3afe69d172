"""Answer extraction / exact-match scoring, and the built-in prompt set."""

from __future__ import annotations

import importlib.util
import json
from collections import Counter
from importlib import resources
from pathlib import Path

import pytest

from bayeskd.evaluate.answers import answer_type, canonical_number, extract_answer, is_correct, normalize_text
from bayeskd.prompts import load_builtin_prompts

REPO = Path(__file__).resolve().parents[3]
GENERATOR = REPO / "scripts" / "make_prompts.py"


# ------------------------------------------------------------------------------------ numbers
@pytest.mark.parametrize(
    "raw, canon",
    [
        ("42", "42"),
        (" 42 ", "42"),
        ("1,000", "1000"),
        ("12,345,678", "12345678"),
        ("42.0", "42"),
        ("2.50", "2.5"),
        ("-3", "-3"),
        ("-0", "0"),
        ("0.0", "0"),
        ("\u22127", "-7"),
    ],
)
def test_canonical_number(raw, canon):
    assert canonical_number(raw) == canon


@pytest.mark.parametrize("raw", ["", "Paris", "4 2", "1,00", "42abc", "1.2.3", "forty-two"])
def test_canonical_number_rejects(raw):
    assert canonical_number(raw) is None


def test_answer_type():
    assert answer_type("42") == "number"
    assert answer_type("1,000") == "number"
    assert answer_type("Paris") == "word"


@pytest.mark.parametrize(
    "text, answer",
    [
        ("42", "42"),
        ("42.", "42"),
        ("The answer is 42.", "42"),
        ("The answer is: **42**", "42"),
        ("Answer: 42", "42"),
        ("It's 40 + 2 = 42", "42"),
        ("17 + 25 = 42", "42"),
        ("Sure! 17 + 25 equals 42.", "42"),
        ("The answer to 17 + 25 is 42.", "42"),
        ("42.0", "42"),
        ("There are 1,000 meters in a kilometer.", "1000"),
        ("1000", "1,000"),
        ("There are 300 centimeters in 3 meters.", "300"),
        ("3 meters is equal to 300 centimeters.", "300"),
        ("Tom has 7 apples.", "7"),
        ("Tom had 3 apples and bought 4 more, so he has 7 apples.", "7"),
        ("Tom has 3 apples and buys 4 more, so the total is 7.", "7"),
        ("Tom has seven apples.", "7"),
        ("forty-two", "42"),
        ("It is -5 degrees.", "-5"),
        ("0\u00b0C", "0"),
        ("300cm", "300"),
        ("The answer is 42. Next question: what is 3 + 4? The answer is 7.", "42"),
        ("Here are the steps:\n1. Add 40 and 2.\n2. The answer is 42.", "42"),
        ("  \n42\n\nExplanation: 17 + 25 = 42", "42"),
    ],
)
def test_numeric_correct(text, answer):
    assert is_correct(text, answer)
    assert extract_answer(text, "number") == canonical_number(answer)


@pytest.mark.parametrize(
    "text, answer",
    [
        ("41", "42"),
        ("The answer is 41.", "42"),
        ("It's 40 + 2 = 41", "42"),
        ("17 + 25 = 43. I think it might be 42.", "42"),  # only one number counts
        ("41 or 42", "42"),  # hedging is not rewarded
        ("420", "42"),
        ("4.2", "42"),
        ("4 2", "42"),
        ("I don't know.", "42"),
        ("", "42"),
        ("There are 300 centimeters in 3 meters.", "3"),  # restating the question
        ("1,000", "100"),
    ],
)
def test_numeric_incorrect(text, answer):
    assert not is_correct(text, answer)


def test_extract_number_kinds():
    assert extract_answer("What? 17 + 25 = 42!", "arithmetic") == "42"
    assert extract_answer("Lucy has 25 marbles.", "word_problem") == "25"
    assert extract_answer("There are 4,000 meters in 4 kilometers.", "unit_conversion") == "4000"
    assert extract_answer("no numbers here", "arithmetic") is None
    assert extract_answer("", None) is None
    # auto (None / "fact"): a number if there is one, else the normalised sentence
    assert extract_answer("A spider has 8 legs.", "fact") == "8"
    assert extract_answer("Paris!", None) == "paris"


# -------------------------------------------------------------------------------------- words
@pytest.mark.parametrize(
    "text, answer",
    [
        ("Paris", "Paris"),
        ("paris.", "Paris"),
        ("PARIS!", "Paris"),
        ("The capital of France is Paris.", "Paris"),
        ("Sure! The capital of France is Paris.", "Paris"),
        ("Here's the answer:\nParis", "Paris"),
        ("The answer is Paris.", "Paris"),
        ("- Green", "green"),
        ("Bras\u00edlia", "Brasilia"),
        ("  Jupiter  is the largest planet.\nIt is a gas giant.", "Jupiter"),
        ("The answer is Au.", "Au"),
    ],
)
def test_word_correct(text, answer):
    assert is_correct(text, answer)


@pytest.mark.parametrize(
    "text, answer",
    [
        ("London", "Paris"),
        ("Parisian food is great.", "Paris"),  # whole words only
        ("London. Paris is in France.", "Paris"),  # only the first sentence counts
        ("The capital of France is a city.\nParis", "Paris"),
        ("Sure!", "Paris"),
        ("", "Paris"),
        ("Gold is Au.", "Ag"),
    ],
)
def test_word_incorrect(text, answer):
    assert not is_correct(text, answer)


def test_normalize_text():
    assert normalize_text("  The  Caf\u00e9, \"Paris\"!  ") == "the cafe paris"
    assert normalize_text("...") == ""


def test_is_correct_needs_answer():
    with pytest.raises(ValueError):
        is_correct("42", None)  # type: ignore[arg-type]


# ---------------------------------------------------------------------------- built-in prompts
def test_builtin_prompts_load():
    prompts = load_builtin_prompts()
    assert len(prompts) >= 300
    ids = [p["id"] for p in prompts]
    assert len(set(ids)) == len(ids)
    assert len({p["prompt"] for p in prompts}) == len(prompts)
    for p in prompts:
        assert set(p) == {"id", "prompt", "kind", "answer"}
        assert isinstance(p["prompt"], str) and p["prompt"].strip()
        assert p["answer"] is None or (isinstance(p["answer"], str) and p["answer"])
    answered = [p for p in prompts if p["answer"] is not None]
    assert len(answered) >= 150
    kinds = Counter(p["kind"] for p in prompts)
    assert kinds["general"] >= 100
    assert all(p["answer"] is None for p in prompts if p["kind"] == "general")
    assert {"arithmetic", "word_problem", "unit_conversion", "fact"} <= set(kinds)


def test_builtin_task_prompts_are_well_formed():
    for p in load_builtin_prompts():
        if p["answer"] is None:
            continue
        # every task prompt asks for a short answer, and its own answer scores as correct
        assert p["prompt"].endswith(("Answer with just the number.", "Answer with one word.")), p
        assert is_correct(p["answer"], p["answer"]), p
        assert is_correct(f"The answer is {p['answer']}.", p["answer"]), p
        if p["kind"] in ("arithmetic", "word_problem", "unit_conversion"):
            assert answer_type(p["answer"]) == "number"
            assert extract_answer(p["answer"], p["kind"]) == p["answer"]


def test_builtin_prompts_interleave_kinds():
    head = load_builtin_prompts()[:10]
    kinds = {p["kind"] for p in head}
    assert "general" in kinds
    assert kinds & {"arithmetic", "word_problem", "unit_conversion", "fact"}


def _load_generator():
    spec = importlib.util.spec_from_file_location("_bayeskd_make_prompts", GENERATOR)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_generator_reproduces_shipped_file():
    gen = _load_generator()
    shipped = (resources.files("bayeskd") / "builtin" / "prompts.jsonl").read_text(encoding="utf-8")
    text = gen.render(gen.build_prompts())
    assert text == shipped, "prompts.jsonl is stale: run python scripts/make_prompts.py"
    assert text == gen.render(gen.build_prompts())  # deterministic within a process too
    assert [json.loads(line) for line in text.splitlines()] == load_builtin_prompts()


def test_generator_check_and_write(tmp_path):
    gen = _load_generator()
    out = tmp_path / "prompts.jsonl"
    assert gen.main(["--out", str(out), "--check"]) == 1
    assert gen.main(["--out", str(out)]) == 0
    first = out.read_bytes()
    assert gen.main(["--out", str(out)]) == 0
    assert out.read_bytes() == first
    assert gen.main(["--out", str(out), "--check"]) == 0
