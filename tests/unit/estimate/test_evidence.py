"""Evidence mapping across tokenizers: two real byte-level BPE tokenizers (`build_tiny`), one for
the teacher's token strings and another for the student, and references computed by hand."""

import math

import numpy as np
import pytest
from transformers import AutoTokenizer

from bayeskd.estimate.evidence import EvidenceMapper
from bayeskd.models import build_tiny


@pytest.fixture(scope="module")
def teacher_tok(tmp_path_factory):
    texts = ["the cat sat on the mat", "a cow and a cat", "hello world"] * 30
    return AutoTokenizer.from_pretrained(build_tiny(tmp_path_factory.mktemp("teacher-tok"), texts, vocab_size=280))


@pytest.fixture(scope="module")
def student_tok(tmp_path_factory):
    texts = ["the cat sat on the mat", "hello there world"] * 30
    return AutoTokenizer.from_pretrained(build_tiny(tmp_path_factory.mktemp("student-tok"), texts, vocab_size=330))


def pieces(tok, s: str) -> list[str]:
    return [tok.decode([i]) for i in tok.encode(s, add_special_tokens=False)]


def spans_of(tok, text: str) -> list[tuple[int, int]]:
    return list(tok(text, add_special_tokens=False, return_offsets_mapping=True)["offset_mapping"])


def teacher_tokens(strings: list[str], tops: list[dict[str, float]]) -> list[dict]:
    """The API's view: each generated token's string, its logprob and its alternatives as strings."""
    return [{"token": s, "logprob": math.log(top[s]), "top": [[a, math.log(p)] for a, p in top.items()]}
            for s, top in zip(strings, tops)]  # fmt: skip


def as_dicts(ids, probs) -> list[dict[int, float]]:
    return [{int(i): float(p) for i, p in zip(r_ids, r_p) if i >= 0} for r_ids, r_p in zip(ids, probs)]


def first(tok, s: str) -> int:
    return tok.encode(s, add_special_tokens=False)[0]


def test_the_tokenizers_differ_where_the_references_need_them(teacher_tok, student_tok):
    assert pieces(teacher_tok, "hello world") == ["hell", "o", " wor", "ld"]
    assert pieces(student_tok, "hello world") == ["hello", " world"]
    assert pieces(teacher_tok, "the cow") == ["the", " c", "ow"]
    assert pieces(student_tok, "the cow") == ["the", " ", "c", "o", "w"]


def test_straddling_student_tokens_follow_the_chain_rule_across_teacher_tokens(teacher_tok, student_tok):
    """Student "hello" spans teacher "hell" + "o": p("hello") = p("hell") p("o" | "hell")."""
    s = student_tok
    text = "hello world"
    tokens = teacher_tokens(
        ["hell", "o", " wor", "ld"],
        [{"hell": 0.6, "he": 0.3, "<|im_end|>": 0.05}, {"o": 0.7, "s": 0.2}, {" wor": 0.5, " there": 0.4},
         {"ld": 0.9, "m": 0.05}],
    )  # fmt: skip
    mapper = EvidenceMapper(s)
    got = as_dicts(*mapper.evidence(text, tokens, spans_of(s, text)))
    ref0: dict[int, float] = {}
    for string, p in [("hello", 0.6 * 0.7), ("hells", 0.6 * 0.2), ("he", 0.3)]:
        ref0[first(s, string)] = ref0.get(first(s, string), 0.0) + p
    ref0[s.eos_token_id] = ref0.get(s.eos_token_id, 0.0) + 0.05  # the end of the turn maps by name
    ref1 = {first(s, " world"): 0.5 * 0.9, first(s, " worm"): 0.5 * 0.05, first(s, " there"): 0.4}
    assert got[0] == pytest.approx(ref0) and got[1] == pytest.approx(ref1)
    assert sum(got[0].values()) <= 1 and sum(got[1].values()) <= 1
    summary = mapper.summary()
    assert summary["straddles"] == 2 and summary["positions_with_evidence"] == 2

    # Black-box scoring must not read the next position's answer (it holds the scored token's text):
    # the straddled realised token's mass is dropped, the rest stays.
    scored = as_dicts(*EvidenceMapper(s).evidence(text, tokens, spans_of(s, text), sampled=False))
    assert scored[0] == pytest.approx({first(s, "he"): 0.3, s.eos_token_id: 0.05})
    assert scored[1] == pytest.approx({first(s, " there"): 0.4})


def test_student_tokens_inside_a_teacher_token_get_its_conditional(teacher_tok, student_tok):
    """Student " " + "c" inside teacher " c": at "c", p(s | " ") = p(s) / Z over the alternatives that begin with " "."""
    s = student_tok
    text = "the cow"
    tokens = teacher_tokens(
        ["the", " c", "ow"],
        [{"the": 0.9, "a": 0.1}, {" c": 0.5, " cat": 0.3, " ": 0.1, "sat": 0.05}, {"ow": 0.8, "at": 0.1}],
    )
    spans = spans_of(s, text)
    assert spans == [(0, 3), (3, 4), (4, 5), (5, 6), (6, 7)]
    mapper = EvidenceMapper(s)
    got = as_dicts(*mapper.evidence(text, tokens, spans))
    z = 0.5 + 0.3 + 0.1 + (1 - 0.95)  # the consistent alternatives plus what the API left unlisted
    assert got[0] == pytest.approx({first(s, "the"): 0.9, first(s, "a"): 0.1})
    at_space: dict[int, float] = {}
    for string, p in [(" c", 0.5), (" cat", 0.3), (" ", 0.1), ("sat", 0.05)]:  # first student token of each
        at_space[first(s, string)] = at_space.get(first(s, string), 0.0) + p
    assert got[1] == pytest.approx(at_space)
    at_c: dict[int, float] = {}
    for string, p in [("c", 0.5 / z), ("cat", 0.3 / z)]:  # " " itself ends where "c" starts: no continuation known
        at_c[first(s, string)] = at_c.get(first(s, string), 0.0) + p
    assert got[2] == pytest.approx(at_c)
    assert got[3] == pytest.approx({first(s, "o"): 0.8, first(s, "at"): 0.1})
    assert got[4] == pytest.approx({first(s, "w"): 0.8 / (0.8 + 0.1)})
    summary = mapper.summary()
    assert summary["positions_inside_teacher_token"] == 2
    shares = summary["share_mass_exact"] + summary["share_mass_prefix"] + summary["share_mass_dropped"]
    assert shares == pytest.approx(1.0) and summary["share_mass_dropped"] > 0 and summary["share_mass_prefix"] > 0


def test_one_token_strings_are_exact_and_several_credit_the_first(teacher_tok, student_tok):
    s = student_tok
    assert len(pieces(s, " cat")) == 1 and len(pieces(s, " cow")) > 1
    text = "the cat"
    tokens = teacher_tokens(["the", " cat"], [{"the": 0.7}, {" cat": 0.6, " cow": 0.25}])
    mapper = EvidenceMapper(s)
    got = as_dicts(*mapper.evidence(text, tokens, spans_of(s, text)))
    assert got[1] == pytest.approx({first(s, " cat"): 0.6, first(s, " cow"): 0.25})
    summary = mapper.summary()
    assert summary["alternatives_exact"] == 2 and summary["alternatives_first_token_credited"] == 1
    assert summary["share_mass_prefix"] == pytest.approx(0.25 / (0.7 + 0.6 + 0.25))


def test_byte_fragments_are_dropped_and_stop_the_alignment(teacher_tok, student_tok):
    s = student_tok
    assert "\ufffd" in pieces(teacher_tok, "é")  # a byte-level tokenizer shows half a character as U+FFFD
    text = "the é cat"
    tokens = teacher_tokens(["the", " ", "\ufffd", "\ufffd", " cat"],
                            [{"the": 0.5, "\ufffd": 0.3}, {" ": 0.9}, {"\ufffd": 0.9}, {"\ufffd": 0.9}, {" cat": 0.9}])  # fmt: skip
    mapper = EvidenceMapper(s)
    got = as_dicts(*mapper.evidence(text, tokens, spans_of(s, text)))
    assert got[0] == pytest.approx({first(s, "the"): 0.5})  # the fragment's 0.3 is dropped, not credited to a byte
    assert all(not g for g in got[2:])  # nothing after the fragment lines up
    summary = mapper.summary()
    assert summary["records_misaligned"] == 1 and summary["alternatives_unmapped"] == 1


def test_special_tokens_map_by_name_at_the_end_of_the_turn(teacher_tok, student_tok):
    s = student_tok
    text = "the"
    tokens = teacher_tokens(["the", "<|im_end|>"], [{"the": 0.9}, {"<|im_end|>": 0.8, " cat": 0.15}])
    spans = spans_of(s, text) + [(len(text), len(text))]  # the student's EOS, appended after the text
    got = as_dicts(*EvidenceMapper(s).evidence(text, tokens, spans))
    assert got[-1] == pytest.approx({s.eos_token_id: 0.8, first(s, " cat"): 0.15})


def test_same_tokenizer_is_the_identity(student_tok):
    s = student_tok
    text = "the cat sat on the mat"
    ids = s.encode(text, add_special_tokens=False)
    vocab = [i for i in range(len(s)) if s.encode(s.decode([i]), add_special_tokens=False) == [i]
             and "\ufffd" not in s.decode([i]) and i not in s.all_special_ids]  # fmt: skip
    rng = np.random.default_rng(0)
    tops, strings, expect = [], [], []
    for y in ids:
        alts = [y, *rng.choice([v for v in vocab if v != y], 4, replace=False)]
        p = rng.dirichlet(np.ones(6))[:5]  # the sixth share is the mass the API did not list
        tops.append({s.decode([int(a)]): float(q) for a, q in zip(alts, p)})
        strings.append(s.decode([y]))
        expect.append({int(a): float(q) for a, q in zip(alts, p)})
    mapper = EvidenceMapper(s)
    got = as_dicts(*mapper.evidence(text, teacher_tokens(strings, tops), spans_of(s, text)))
    assert got == [pytest.approx(e) for e in expect]
    assert mapper.summary()["share_mass_exact"] == pytest.approx(1.0)


def test_mapped_probabilities_never_exceed_one(teacher_tok, student_tok):
    """The teacher's own tokenization of real text, random alternatives from its vocabulary."""
    rng = np.random.default_rng(1)
    t_vocab = [teacher_tok.decode([i]) for i in range(len(teacher_tok))]
    mapper = EvidenceMapper(student_tok)
    texts = ["hello world, the cat sat", "a cow and the mat", "the cat sat on the cow"]
    for text in texts * 20:
        strings = pieces(teacher_tok, text)
        tops = []
        for string in strings:
            alts = [string, *rng.choice(t_vocab, 8)]
            p = rng.dirichlet(np.full(10, 0.3))[:9]
            top: dict[str, float] = {}
            for a, q in zip(alts, p):
                top[a] = top.get(a, 0.0) + q
            tops.append(top)
        ids, probs = mapper.evidence(text, teacher_tokens(strings, tops), spans_of(student_tok, text))
        assert (probs >= 0).all() and (probs.sum(1) <= 1 + 1e-9).all()
        assert ((ids >= 0) == (probs > 0)).all()
    s = mapper.summary()
    assert s["positions_with_evidence"] > 0 and s["straddles"] > 0 and s["positions_inside_teacher_token"] > 0


def test_a_continuation_counts_its_first_student_token_only_once_settled(student_tok):
    """probe: the teacher's continuation after a prefix, in the student's tokens."""
    s = student_tok
    m = EvidenceMapper(s)
    assert m.word_start("the cat sat", 5) == 3 and m.word_start("the cat sat", 3) == 3 and m.word_start("the", 0) == 0
    assert m.first_after("the", " cat sat", complete=False) == first(s, " cat")  # the word " cat" ended: settled
    assert pieces(s, " ca") != [" cat"]
    assert m.first_after("the", " ca", complete=False) == -1  # cut inside the word: " cat"? " car"? not counted
    assert m.first_after("the", " ca", complete=True) == first(s, " ca")  # the turn ended there: what it is
    assert m.first_after("the c", "at sat", complete=False) == -1  # the student reads " cat": no token starts at "a"


def test_the_end_of_turn_token_after_the_text_is_no_straddle(student_tok):
    """The chat template's end-of-turn token spans characters after the text: it is still the EOS position."""
    s = student_tok
    text = "the"
    tokens = teacher_tokens(["the", "<|im_end|>"], [{"the": 0.9}, {"<|im_end|>": 0.8, " cat": 0.15}])
    got = as_dicts(*EvidenceMapper(s).evidence(text, tokens, [(0, 3), (3, 3 + len("<|im_end|>"))]))
    assert got[1] == pytest.approx({s.eos_token_id: 0.8, first(s, " cat"): 0.15})


def test_a_string_listed_twice_counts_once_at_its_larger_value(student_tok):
    """Two teacher tokens that decode alike: their sum could exceed what the student's token has."""
    s = student_tok
    text = "the"
    tokens = [{"token": "the", "logprob": math.log(0.5), "top": [["the", math.log(0.5)], [" cat", math.log(0.2)],
                                                                   [" cat", math.log(0.1)]]}]  # fmt: skip
    got = as_dicts(*EvidenceMapper(s).evidence(text, tokens, spans_of(s, text)))
    assert got[0] == pytest.approx({first(s, "the"): 0.5, first(s, " cat"): 0.2})


def test_a_server_that_renders_the_end_of_turn_as_empty_keeps_its_evidence(student_tok):
    """llama.cpp shows special tokens as "": in a response that ended its turn, "" is the EOS; the
    final end-of-turn token is not in the list, so the EOS position after the text has no evidence."""
    s = student_tok
    text = "the cat"
    tokens = teacher_tokens(["the", " cat"], [{"the": 0.9, "": 0.05}, {" cat": 0.6, "": 0.3, " sat": 0.05}])
    spans = spans_of(s, text) + [(len(text), len(text))]
    got = as_dicts(*EvidenceMapper(s).evidence(text, tokens, spans, ended=True))
    assert got[0][s.eos_token_id] == pytest.approx(0.05) and got[1][s.eos_token_id] == pytest.approx(0.3)
    assert got[-1] == {}  # the final end of turn: not listed by such a server
    cut = as_dicts(*EvidenceMapper(s).evidence(text, tokens, spans, ended=False))  # cut by max_tokens: "" unknown
    assert all(s.eos_token_id not in g for g in cut)
    # A server that does list the final token, as "": the EOS position gets its alternatives.
    listed = tokens + teacher_tokens([""], [{"": 0.7, " on": 0.2}])
    got = as_dicts(*EvidenceMapper(s).evidence(text, listed, spans, ended=True))
    assert got[-1] == pytest.approx({s.eos_token_id: 0.7, first(s, " on"): 0.2})
