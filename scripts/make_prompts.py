"""Generate ``prompts.jsonl``, the built-in prompt set shipped with bayeskd.

Run from the repository root::

    python scripts/make_prompts.py            # rewrite src/bayeskd/builtin/prompts.jsonl
    python scripts/make_prompts.py --check    # exit 1 if the shipped file is stale

Standard library only, and deterministic: every random choice comes from a
``random.Random`` with a fixed seed, so running it twice writes an identical file.

Each line of the output is ``{"id", "prompt", "kind", "answer"}``:

* ``general`` (``gen-NNNN``): hand-written short instructions, ``answer`` null.
* ``arithmetic`` (``arith-NNNN``): addition, subtraction, multiplication of small numbers.
* ``word_problem`` (``word-NNNN``): one-step or two-step everyday arithmetic.
* ``unit_conversion`` (``conv-NNNN``): integer conversions (m/cm, h/min, kg/g, ...).
* ``fact`` (``fact-NNNN``): simple factual questions with a one-word or numeric answer.

Answers are strings (``"42"``, ``"Paris"``); every task prompt ends with an
instruction asking for a short answer. The kinds are interleaved evenly in
the file, so the first N prompts (``collect.limit``) contain all of them.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
from fractions import Fraction
from pathlib import Path

SEED = 20240611
OUTPUT = Path(__file__).resolve().parents[1] / "src" / "bayeskd" / "builtin" / "prompts.jsonl"

NUMBER_SUFFIX = "Answer with just the number."
WORD_SUFFIX = "Answer with one word."

# --------------------------------------------------------------------------------------------
# Hand-written general instructions, grouped by style. Groups are interleaved in the output.
# --------------------------------------------------------------------------------------------
GENERAL: dict[str, list[str]] = {
    "explain": [
        "Explain photosynthesis in two sentences.",
        "Explain what gravity is in two sentences.",
        "Explain why the sky is blue in two sentences.",
        "Explain what a computer virus is in two sentences.",
        "Explain how a rainbow forms in two sentences.",
        "Explain what inflation means in economics in two sentences.",
        "Explain what a black hole is in simple words.",
        "Explain the water cycle in two sentences.",
        "Explain what DNA does in two sentences.",
        "Explain why Earth has seasons in two sentences.",
        "Explain what a budget is to a ten-year-old.",
        "Explain how a vaccine works in two sentences.",
        "Explain what the internet is in one sentence.",
        "Explain what recycling is and why it matters in two sentences.",
        "Explain the difference between weather and climate in two sentences.",
        "Explain what an atom is in two sentences.",
    ],
    "list": [
        "List three fruits that are high in vitamin C.",
        "Name three animals that live in the ocean.",
        "Give three tips for getting better sleep.",
        "List three common uses of a smartphone.",
        "Name three musical instruments that have strings.",
        "List three things to pack for a day at the beach.",
        "Give three reasons to learn a second language.",
        "Name three vegetables that are green.",
        "List three ways to save water at home.",
        "Give three ideas for a rainy-day activity.",
        "List three qualities of a good friend.",
        "Give three examples of renewable energy sources.",
        "List three things you can do to reduce stress.",
        "Name three popular sports played with a ball.",
        "List three safety rules for riding a bicycle.",
    ],
    "define": [
        'Define the word "curious" in one sentence.',
        'What does the word "generous" mean?',
        'Define "ecosystem" in one sentence.',
        'What is the meaning of the word "ancient"?',
        'Define the word "habit" in simple terms.',
        'What does the word "fragile" mean?',
        'Define "democracy" in one sentence.',
        'What does the word "nostalgia" mean?',
        'Give a short definition of the word "algorithm".',
        'Define the word "empathy" in one sentence.',
        'What does "brave" mean? Use it in a sentence.',
        'Define "metaphor" and give one example.',
        'What is the meaning of the word "abundant"?',
    ],
    "creative": [
        "Write a haiku about the ocean.",
        "Write a haiku about autumn leaves.",
        "Write a haiku about a cup of coffee.",
        "Write a two-line poem about the moon.",
        "Write a short rhyme about a cat.",
        "Write one sentence that starts a story about a lost key.",
        "Write a haiku about snow falling at night.",
        "Write a short birthday message for a friend.",
        "Write a one-sentence story about a robot who learns to paint.",
        "Write a four-line poem about spring.",
        "Write a short thank-you note to a teacher.",
        "Write a slogan for a lemonade stand.",
        "Suggest a title for a story about a dragon who is afraid of fire.",
        "Write a short tweet about the first day of spring.",
    ],
    "rewrite": [
        'Rewrite this sentence to sound more polite: "Give me the report now."',
        'Rewrite this sentence in the past tense: "She walks to school every day."',
        'Make this sentence shorter: "In my personal opinion, I think that the movie was really very good."',
        'Rewrite this sentence in a formal tone: "Hey, can you fix this thing?"',
        'Fix the grammar in this sentence: "He don\'t like apples."',
        'Rewrite this sentence so it sounds more exciting: "The dog ran across the park."',
        'Change this sentence to the passive voice: "The chef cooked the meal."',
        'Rewrite this sentence in simple words: "The committee reached a unanimous decision."',
        'Correct the spelling in this sentence: "I recieved a letter yesterday."',
        'Turn this statement into a question: "The museum opens at nine."',
        'Rewrite this sentence in the future tense: "We play football on Saturday."',
        'Make this sentence sound more positive: "The test was not as bad as I feared."',
    ],
    "question": [
        "Why do cats purr?",
        "What causes thunder?",
        "How do bees make honey?",
        "Why do leaves change color in autumn?",
        "What is the main job of the heart?",
        "How does a compass work?",
        "Why is the ocean salty?",
        "What do pandas usually eat?",
        "Why do we need to drink water?",
        "What is the purpose of a seatbelt?",
        "How do birds find their way when they migrate?",
        "What is the difference between a virus and a bacterium?",
        "Why does ice float on water?",
        "What does a thermometer measure?",
        "Why do we have day and night?",
    ],
    "advice": [
        "How can I stay focused while studying?",
        "Give me a tip for remembering people's names.",
        "What should I do if I feel nervous before a presentation?",
        "How can I keep my houseplants healthy?",
        "Suggest a simple healthy breakfast.",
        "How can I make my morning routine faster?",
        "What is a good way to start saving money?",
        "How do I politely decline an invitation?",
        "Give one tip for writing a clear email.",
        "How can I drink more water during the day?",
        "What should I bring to a job interview?",
        "Suggest a quick way to tidy a messy room.",
        "How can I make new friends in a new city?",
        "Give one tip for cooking rice well.",
        "What is a good way to prepare for an exam the night before?",
        "How can I spend less time on my phone?",
    ],
    "code": [
        "Write a Python function that returns the square of a number.",
        "What does the len function do in Python?",
        "How do you reverse a string in Python?",
        "What is a variable in programming?",
        "Write a Python one-liner that prints the numbers from 1 to 5.",
        "What is the difference between a list and a tuple in Python?",
        "Explain what a for loop does in one sentence.",
        "Write a JavaScript function that adds two numbers.",
        "What does HTML stand for?",
        "How do you check if a number is even in Python?",
        "What is a bug in software?",
        "Write a SQL query that selects all rows from a table named users.",
        "What does the return statement do in a function?",
        "How do you create an empty dictionary in Python?",
        "What is recursion, in one sentence?",
        "Write a Python function that checks whether a word is a palindrome.",
    ],
    "summarise": [
        'Summarise this sentence in a few words: "After months of planning, the team finally launched the new website on Monday."',
        'Summarise in one short sentence: "The city council voted to build a new park near the river, which will open next summer."',
        'Give the main idea of this sentence: "Regular exercise, a balanced diet, and enough sleep all help people stay healthy."',
        'Summarise: "The train was delayed for two hours because of heavy snow on the tracks."',
        'Summarise this in five words or fewer: "The little girl found a lost puppy and returned it to its owner."',
        'What is the main point of this sentence: "Although it rained all morning, the outdoor concert went ahead as planned."?',
        'Summarise in one sentence: "Scientists discovered a new species of frog in the rainforest, and it is smaller than a coin."',
        'Summarise: "Many people now work from home, which saves travel time but can feel lonely."',
    ],
    "misc": [
        'Translate "good morning" into Spanish.',
        'Translate "thank you" into French.',
        "Compare cats and dogs as pets in two sentences.",
        "Give an example of a simile.",
        'Give two synonyms for the word "happy".',
        "Suggest a name for a pet goldfish.",
        "Describe the taste of a lemon in one sentence.",
        "Describe a sunset in one sentence.",
        "Suggest a good name for a small bakery.",
        "Give an example of a healthy snack.",
        "Describe a relaxing weekend in two sentences.",
        "Tell me a fun fact about octopuses.",
        "What would you take to a desert island, and why?",
        "Give me a short motivational quote.",
        "Suggest a fun game for a family evening.",
        "Tell me a short joke about computers.",
        "Describe the sound of rain in one sentence.",
        "What are the three primary colors of paint?",
    ],
}

# --------------------------------------------------------------------------------------------
# Simple facts with a literal answer: (question, answer). Numeric answers ask for the number.
# --------------------------------------------------------------------------------------------
CAPITALS = [
    ("France", "Paris"),
    ("Japan", "Tokyo"),
    ("Italy", "Rome"),
    ("Germany", "Berlin"),
    ("Spain", "Madrid"),
    ("Egypt", "Cairo"),
    ("Canada", "Ottawa"),
    ("Russia", "Moscow"),
    ("Greece", "Athens"),
    ("Norway", "Oslo"),
    ("Portugal", "Lisbon"),
    ("Ireland", "Dublin"),
]
FACTS_WORD = [
    ("What color do you get when you mix blue and yellow?", "green"),
    ("What is the largest planet in our solar system?", "Jupiter"),
    ("What is the opposite of hot?", "cold"),
    ("Which planet is known as the Red Planet?", "Mars"),
    ("What is frozen water called?", "ice"),
    ("What color is a ripe banana?", "yellow"),
    ("Which animal is known as the king of the jungle?", "lion"),
]
FACTS_NUMBER = [
    ("How many legs does a spider have?", "8"),
    ("How many sides does a triangle have?", "3"),
    ("How many months are in a year?", "12"),
    ("At how many degrees Celsius does water freeze?", "0"),
    ("How many legs does an insect have?", "6"),
]

# --------------------------------------------------------------------------------------------
# Word problems and conversions.
# --------------------------------------------------------------------------------------------
NAMES = ["Tom", "Anna", "Sam", "Maria", "Leo", "Nina", "Omar", "Lucy", "Ben", "Sara", "Ravi", "Emma"]
ITEMS = ["apples", "pencils", "stickers", "marbles", "cookies", "books", "stamps", "cards", "balloons", "shells"]

# (larger unit plural, smaller unit plural, factor, range of counts of the larger unit)
CONVERSIONS = [
    ("meters", "centimeters", 100, (2, 9)),
    ("kilometers", "meters", 1000, (2, 9)),
    ("hours", "minutes", 60, (2, 12)),
    ("minutes", "seconds", 60, (2, 12)),
    ("kilograms", "grams", 1000, (2, 9)),
    ("liters", "milliliters", 1000, (2, 9)),
    ("days", "hours", 24, (2, 7)),
    ("weeks", "days", 7, (2, 12)),
    ("feet", "inches", 12, (2, 10)),
    ("yards", "feet", 3, (2, 15)),
    ("years", "months", 12, (2, 10)),
    ("dollars", "cents", 100, (2, 9)),
]

N_ARITHMETIC = 66
N_WORD_PROBLEM = 48
N_CONVERSION = 42


def _arithmetic(rng: random.Random, n: int) -> list[tuple[str, str]]:
    out: list[tuple[str, str]] = []
    seen: set[str] = set()
    ops = ["+", "-", "*"]
    while len(out) < n:
        op = ops[len(out) % 3]  # cycle so every prefix mixes the three operations
        if op == "+":
            a, b = rng.randint(2, 99), rng.randint(2, 99)
            q, ans = f"What is {a} + {b}?", a + b
        elif op == "-":
            a = rng.randint(10, 99)
            b = rng.randint(1, a - 1)
            q, ans = f"What is {a} - {b}?", a - b
        else:
            a, b = rng.randint(2, 12), rng.randint(2, 19)
            q = rng.choice([f"What is {a} times {b}?", f"What is {a} multiplied by {b}?"])
            ans = a * b
        if q in seen:
            continue
        seen.add(q)
        out.append((f"{q} {NUMBER_SUFFIX}", str(ans)))
    return out


def _word_problem(rng: random.Random, n: int) -> list[tuple[str, str]]:
    out: list[tuple[str, str]] = []
    seen: set[str] = set()
    while len(out) < n:
        name, item = rng.choice(NAMES), rng.choice(ITEMS)
        t = len(out) % 6
        if t == 0:
            a, b = rng.randint(2, 20), rng.randint(2, 20)
            q, ans = f"{name} has {a} {item} and buys {b} more. How many {item} does {name} have now?", a + b
        elif t == 1:
            a = rng.randint(6, 30)
            b = rng.randint(2, a - 2)
            q, ans = f"{name} has {a} {item} and gives {b} to a friend. How many {item} does {name} have left?", a - b
        elif t == 2:
            a, b = rng.randint(2, 9), rng.randint(2, 12)
            q, ans = f"There are {a} boxes with {b} {item} in each box. How many {item} are there in total?", a * b
        elif t == 3:
            kids, each = rng.randint(2, 6), rng.randint(2, 9)
            q = f"{kids * each} {item} are shared equally among {kids} children. How many {item} does each child get?"
            ans = each
        elif t == 4:
            a, b = rng.randint(5, 25), rng.randint(2, 9)
            q, ans = f"{name} reads {a} pages every day for {b} days. How many pages does {name} read in total?", a * b
        else:
            a = rng.randint(10, 40)
            b, c = rng.randint(1, a - 1), rng.randint(1, 15)
            q = (
                f"A bus has {a} passengers. At the next stop {b} people get off and {c} get on. "
                "How many passengers are on the bus now?"
            )
            ans = a - b + c
        if q in seen:
            continue
        seen.add(q)
        out.append((f"{q} {NUMBER_SUFFIX}", str(ans)))
    return out


def _conversion(rng: random.Random, n: int) -> list[tuple[str, str]]:
    out: list[tuple[str, str]] = []
    seen: set[str] = set()
    while len(out) < n:
        big, small, factor, (lo, hi) = CONVERSIONS[len(out) % len(CONVERSIONS)]
        k = rng.randint(lo, hi)
        if rng.random() < 0.7:
            q, ans = f"How many {small} are in {k} {big}?", k * factor
        else:
            q, ans = f"How many {big} are in {k * factor} {small}?", k
        if q in seen:
            continue
        seen.add(q)
        out.append((f"{q} {NUMBER_SUFFIX}", str(ans)))
    return out


def _facts() -> list[tuple[str, str]]:
    word = [(f"What is the capital of {c}?", a) for c, a in CAPITALS] + FACTS_WORD
    words = [(f"{q} {WORD_SUFFIX}", a) for q, a in word]
    numbers = [(f"{q} {NUMBER_SUFFIX}", a) for q, a in FACTS_NUMBER]
    return _interleave([words, numbers])


def _interleave(groups: list[list]) -> list:
    """Merge lists so each is spread evenly over the result (stable, deterministic).

    Item i of a list of length n is placed at fraction (i + 1/2) / n; ties go to the
    earlier list.
    """
    keyed = [
        (Fraction(2 * i + 1, 2 * len(g)), gi, i, item) for gi, g in enumerate(groups) for i, item in enumerate(g)
    ]
    keyed.sort(key=lambda t: t[:3])
    return [t[3] for t in keyed]


def build_prompts(seed: int = SEED) -> list[dict]:
    """The built-in prompt set, in file order: a list of {"id", "prompt", "kind", "answer"}."""
    general = _interleave(list(GENERAL.values()))
    kinds: list[tuple[str, str, list[tuple[str, str | None]]]] = [
        ("general", "gen", [(p, None) for p in general]),
        ("arithmetic", "arith", _arithmetic(random.Random(seed), N_ARITHMETIC)),
        ("word_problem", "word", _word_problem(random.Random(seed + 1), N_WORD_PROBLEM)),
        ("unit_conversion", "conv", _conversion(random.Random(seed + 2), N_CONVERSION)),
        ("fact", "fact", _facts()),
    ]
    groups = [
        [
            {"id": f"{prefix}-{i:04d}", "prompt": prompt, "kind": kind, "answer": answer}
            for i, (prompt, answer) in enumerate(items, start=1)
        ]
        for kind, prefix, items in kinds
    ]
    records = _interleave(groups)
    prompts = [r["prompt"] for r in records]
    if len(set(prompts)) != len(prompts):
        dupes = sorted({p for p in prompts if prompts.count(p) > 1})
        raise ValueError(f"duplicate prompts: {dupes}")
    return records


def render(records: list[dict]) -> str:
    """JSONL text: one object a line, keys in a fixed order, UTF-8, trailing newline."""
    return "".join(
        json.dumps({k: r[k] for k in ("id", "prompt", "kind", "answer")}, ensure_ascii=False) + "\n" for r in records
    )


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=OUTPUT, help=f"output file (default: {OUTPUT})")
    ap.add_argument("--check", action="store_true", help="do not write; exit 1 if --out differs from the generated text")
    args = ap.parse_args(argv)
    text = render(build_prompts())
    if args.check:
        current = args.out.read_text(encoding="utf-8") if args.out.exists() else None
        if current != text:
            print(f"{args.out} is out of date; rerun {Path(__file__).name}", file=sys.stderr)
            return 1
        print(f"{args.out} is up to date")
        return 0
    args.out.parent.mkdir(parents=True, exist_ok=True)
    with open(args.out, "w", encoding="utf-8", newline="\n") as f:
        f.write(text)
    print(f"wrote {text.count(chr(10))} prompts to {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
