"""Generated data for the project's own early-exit models: easy tokens and hard but learnable ones.

Easy tasks (copying, repetition, fixed templates) have answers that a shallow stack can predict;
hard tasks (two-digit addition, sorting) need the whole stack. Every prompt ends with "=" and its
answer is what follows; `solve` recomputes the answer from the prompt alone, so the benchmark's
exact-match accuracy needs nothing but the prompt text.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Literal

Kind = Literal["easy", "hard"]
KINDS: tuple[Kind, ...] = ("easy", "hard")

WORDS = (
    "cat",
    "dog",
    "sun",
    "red",
    "fox",
    "owl",
    "sky",
    "box",
    "cup",
    "map",
    "pen",
    "hat",
    "bee",
    "ant",
    "elk",
    "yak",
    "oak",
    "sea",
    "ice",
    "mud",
    "jam",
    "fig",
    "egg",
    "car",
    "bus",
    "van",
)

TEMPLATES = (
    "the cat sat on the mat",
    "the quick brown fox jumps over the lazy dog",
    "an apple a day keeps the doctor away",
    "all that glitters is not gold",
    "to be or not to be that is the question",
    "the early bird catches the worm",
    "a stitch in time saves nine",
    "where there is smoke there is fire",
)

PROMPT_END = "="  # every prompt ends here; the answer follows


@dataclass(frozen=True)
class Example:
    task: str
    kind: Kind
    prompt: str
    answer: str

    @property
    def text(self) -> str:
        return self.prompt + self.answer


def _copy(rng: random.Random) -> tuple[str, str]:
    words = " ".join(rng.choice(WORDS) for _ in range(rng.randint(2, 4)))
    return f"copy {words}=", words


def _repeat(rng: random.Random) -> tuple[str, str]:
    unit = rng.choice(WORDS)
    times = rng.randint(2, 4)
    return f"repeat {unit} {times}=", " ".join([unit] * times)


def _template(rng: random.Random) -> tuple[str, str]:
    words = rng.choice(TEMPLATES).split()
    cut = rng.randint(2, min(3, len(words) - 1))
    return " ".join(words[:cut]) + PROMPT_END, " ".join(words[cut:])


def _add(rng: random.Random) -> tuple[str, str]:
    a, b = rng.randint(10, 99), rng.randint(10, 99)
    return f"{a}+{b}=", str(a + b)


def _sort(rng: random.Random) -> tuple[str, str]:
    digits = [rng.randint(0, 9) for _ in range(rng.randint(3, 5))]
    return "sort " + " ".join(map(str, digits)) + PROMPT_END, " ".join(map(str, sorted(digits)))


TASKS: dict[str, tuple[Kind, Callable[[random.Random], tuple[str, str]]]] = {
    "copy": ("easy", _copy),
    "repeat": ("easy", _repeat),
    "template": ("easy", _template),
    "add": ("hard", _add),
    "sort": ("hard", _sort),
}

EVAL_SEED_OFFSET = 1_000_003  # evaluation prompts come from a stream the training never draws from


def make_example(rng: random.Random, task: str) -> Example:
    kind, generate = TASKS[task]
    prompt, answer = generate(rng)
    return Example(task, kind, prompt, answer)


def _tasks_of(kind: Kind | None) -> list[str]:
    return [name for name, (k, _) in TASKS.items() if kind is None or k == kind]


def training_stream(seed: int) -> Iterator[Example]:
    """An endless, seeded stream mixing every task evenly."""
    rng = random.Random(seed)
    names = _tasks_of(None)
    while True:
        yield make_example(rng, rng.choice(names))


def examples(n: int, kind: Kind | None = None, seed: int = 0) -> list[Example]:
    """`n` examples of one kind (or both), cycling through its tasks so each is represented."""
    rng = random.Random(seed)
    names = _tasks_of(kind)
    return [make_example(rng, names[i % len(names)]) for i in range(n)]


def eval_examples(n_per_kind: int = 32, seed: int = 0) -> list[Example]:
    """Held-out evaluation examples, labelled easy/hard, from a seed the training stream never uses."""
    out: list[Example] = []
    for i, kind in enumerate(KINDS):
        out += examples(n_per_kind, kind, seed + EVAL_SEED_OFFSET + i)
    return out


def workload_prompts(kind: Kind, n: int, seed: int = 0) -> list[str]:
    """Prompts of one kind for a workload (the demo plays easy, then hard, then easy)."""
    return [ex.prompt for ex in examples(n, kind, seed + 2 * EVAL_SEED_OFFSET)]


def solve(prompt: str) -> tuple[str, Kind] | None:
    """The expected answer and kind of a generated prompt, or None if no task produced it."""
    if not prompt.endswith(PROMPT_END):
        return None
    body = prompt[: -len(PROMPT_END)]
    head, _, rest = body.partition(" ")
    if head == "copy" and rest:
        return rest, "easy"
    if head == "repeat":
        unit, _, times = rest.rpartition(" ")
        if unit and times.isdigit():
            return " ".join([unit] * int(times)), "easy"
    if head == "sort":
        parts = rest.split()
        if parts and all(p.isdigit() for p in parts):
            return " ".join(sorted(parts, key=int)), "hard"
    a, plus, b = body.partition("+")
    if plus and a.isdigit() and b.isdigit():
        return str(int(a) + int(b)), "hard"
    for sentence in TEMPLATES:
        if sentence.startswith(body + " "):
            return sentence[len(body) + 1 :], "easy"
    return None


def kind_of(prompt: str) -> Kind | None:
    solved = solve(prompt)
    return solved[1] if solved else None


def normalise_output(output: str) -> str:
    """The answer part of a completion: up to the first newline, without surrounding spaces."""
    return output.split("\n", 1)[0].strip()


def exact_match(prompt: str, output: str) -> bool:
    """Whether a completion answers a generated prompt exactly; False for unknown prompts."""
    solved = solve(prompt)
    return solved is not None and normalise_output(output) == solved[0]
