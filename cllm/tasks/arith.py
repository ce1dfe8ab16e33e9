"""The built-in task: GSM8K-style multi-step arithmetic word problems, generated from a seed.

A problem is a running count of one kind of item that changes through 2-3 events (finding more,
giving some away, buying packs). The answer walks through the events one equation per sentence and
ends with GSM8K's `#### <number>` line. The wording around each equation repeats from problem to
problem, so a consistency-trained model can fast-forward it; the equations' results must be computed.

Operands are kept small enough for a tiny model trained for minutes on a CPU to learn: sums and
differences of two-digit numbers and one-digit products (every count stays below 100). Train and
test problems are disjoint by construction: a problem belongs to the split its prompt's hash falls in.
"""

from __future__ import annotations

import hashlib
import random
from dataclasses import dataclass

SPLITS = ("train", "test")
TEST_BUCKETS = 10  # one prompt hash bucket in ten is held out
MAX_COUNT = 99  # every running total stays at or below this: two-digit arithmetic only

PEOPLE = [
    ("Mia", "she", "her"), ("Noah", "he", "his"), ("Emma", "she", "her"), ("Liam", "he", "his"),
    ("Ava", "she", "her"), ("Lucas", "he", "his"), ("Zoe", "she", "her"), ("Omar", "he", "his"),
    ("Lily", "she", "her"), ("Ben", "he", "his"), ("Nora", "she", "her"), ("Sam", "he", "his"),
    ("Ella", "she", "her"), ("Leo", "he", "his"), ("Ruby", "she", "her"), ("Max", "he", "his"),
]
ITEMS = [
    "apples", "marbles", "stickers", "books", "cookies", "pencils", "stamps", "shells",
    "cards", "coins", "flowers", "eggs", "toys", "rocks", "beads", "candies",
]
CONTAINERS = ["bags", "boxes", "packs", "jars", "baskets", "crates"]


@dataclass(frozen=True)
class Problem:
    prompt: str
    answer: str  # the worked solution, ending with "#### <number>"
    result: int


def split_of(prompt: str) -> str:
    """The split a prompt belongs to, from its hash: the same text is never in both."""
    bucket = int.from_bytes(hashlib.sha256(prompt.encode()).digest()[:8], "big") % TEST_BUCKETS
    return "test" if bucket == 0 else "train"


def format_prompt(question: str) -> str:
    return f"Question: {question}\nAnswer:"


# The built-in teacher's chat template: each user turn framed as format_prompt frames a question, each
# assistant turn as its answer; system turns carry no meaning for this task and are left out.
CHAT_TEMPLATE = (
    "{% for m in messages %}"
    "{% if m['role'] == 'user' %}Question: {{ m['content'] }}\nAnswer:"
    "{% elif m['role'] == 'assistant' %} {{ m['content'] }}\n{% endif %}"
    "{% endfor %}"
)


def event_find(rng: random.Random, count: int, who: tuple, friend: str, items: str):
    name, pron, _ = who
    gain = rng.randint(2, min(49, MAX_COUNT - count))
    if rng.random() < 0.5:
        question = f"Then {pron} finds {gain} more {items}."
    else:
        question = f"{friend} gives {name} {gain} {items}."
    new = count + gain
    step = f"{name} gets {gain} more, so {pron} has {count} + {gain} = {new} {items}."
    return question, [step], new


def event_give(rng: random.Random, count: int, who: tuple, friend: str, items: str):
    name, pron, _ = who
    loss = rng.randint(2, min(49, count - 1))
    question = f"{pron.capitalize()} gives {loss} {items} to {friend}."
    new = count - loss
    step = f"{name} gives away {loss}, so {pron} has {count} - {loss} = {new} {items}."
    return question, [step], new


def event_buy(rng: random.Random, count: int, who: tuple, friend: str, items: str):
    name, pron, _ = who
    room = MAX_COUNT - count
    packs = rng.choice([n for n in range(2, 10) if room // n >= 2])
    per_pack = rng.randint(2, min(9, room // packs))
    container = rng.choice(CONTAINERS)
    bought = packs * per_pack
    new = count + bought
    question = f"{pron.capitalize()} buys {packs} {container} with {per_pack} {items} in each."
    steps = [
        f"The {container} hold {packs} * {per_pack} = {bought} {items}.",
        f"So {name} has {count} + {bought} = {new} {items}.",
    ]
    return question, steps, new


def possible_events(count: int) -> list:
    events = []
    if count <= MAX_COUNT - 2:
        events.append(event_find)
    if count >= 3:
        events.append(event_give)
    if count <= MAX_COUNT - 4:
        events.append(event_buy)
    return events


def sample_problem(rng: random.Random) -> Problem:
    """One word problem: a starting count, 2-3 events, the question, and the worked answer."""
    who = rng.choice(PEOPLE)
    friend = rng.choice([p[0] for p in PEOPLE if p != who])
    items = rng.choice(ITEMS)
    count = rng.randint(5, 50)
    sentences = [f"{who[0]} has {count} {items}."]
    steps = []
    for _ in range(rng.randint(2, 3)):
        event = rng.choice(possible_events(count))
        question, event_steps, count = event(rng, count, who, friend, items)
        sentences.append(question)
        steps.extend(event_steps)
    sentences.append(f"How many {items} does {who[0]} have now?")
    answer = " " + " ".join(steps) + f"\n#### {count}"
    return Problem(prompt=format_prompt(" ".join(sentences)), answer=answer, result=count)


def generate(n: int, split: str = "train", seed: int = 0) -> list[Problem]:
    """`n` problems of `split`, the same for the same seed; problems of the other split are skipped."""
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r} for the built-in task: use one of {SPLITS}")
    if n < 0:
        raise ValueError(f"number of problems must be >= 0, got {n}")
    rng = random.Random(f"cllm-arith/{seed}/{split}")
    problems = []
    while len(problems) < n:
        problem = sample_problem(rng)
        if split_of(problem.prompt) == split:
            problems.append(problem)
    return problems
