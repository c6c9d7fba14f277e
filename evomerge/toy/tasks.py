"""Deterministic synthetic string tasks for the toy suite.

Every example is ``{"prompt": "rev:abc>", "answer": "cba"}``: a three-letter task prefix, a
colon, the input, ``>``; the model is trained to emit the answer followed by a newline (the
stop string). Only characters of :data:`evomerge.toy.tokenizer.CHARS` occur.

>>> make_example("reverse", random.Random(0))["prompt"][:4]
'rev:'
>>> splits = make_splits("sort", {"train": 5, "test": 2}, seed=0)
>>> len(splits["train"]), len(splits["test"])
(5, 2)
"""

from __future__ import annotations

import hashlib
import random
import string
from collections.abc import Callable, Mapping

LETTERS = string.ascii_lowercase
DIGITS = string.digits


def _letters(rng: random.Random, lo: int = 3, hi: int = 8) -> str:
    return "".join(rng.choice(LETTERS) for _ in range(rng.randint(lo, hi)))


def _digits(rng: random.Random, lo: int = 3, hi: int = 8) -> str:
    return "".join(rng.choice(DIGITS) for _ in range(rng.randint(lo, hi)))


def _copy(rng: random.Random) -> tuple[str, str]:
    s = _letters(rng)
    return s, s


def _reverse(rng: random.Random) -> tuple[str, str]:
    s = _letters(rng)
    return s, s[::-1]


def _sort(rng: random.Random) -> tuple[str, str]:
    s = _digits(rng)
    return s, "".join(sorted(s))


def _swap(rng: random.Random) -> tuple[str, str]:
    """Swap adjacent pairs: ``abcde`` -> ``badce``."""
    s = _letters(rng, 4, 8)
    out = [s[i + 1] + s[i] for i in range(0, len(s) - 1, 2)]
    return s, "".join(out) + (s[-1] if len(s) % 2 else "")


def _shift(rng: random.Random) -> tuple[str, str]:
    """Each letter to the next one, ``z`` to ``a``."""
    s = _letters(rng)
    return s, "".join(LETTERS[(LETTERS.index(c) + 1) % 26] for c in s)


def _rot13(rng: random.Random) -> tuple[str, str]:
    """Each letter 13 places on (``a`` -> ``n``)."""
    s = _letters(rng)
    return s, "".join(LETTERS[(LETTERS.index(c) + 13) % 26] for c in s)


def _mirror(rng: random.Random) -> tuple[str, str]:
    """Each letter to its mirror in the alphabet (``a`` <-> ``z``, ``b`` <-> ``y``)."""
    s = _letters(rng)
    return s, "".join(LETTERS[25 - LETTERS.index(c)] for c in s)


def _add(rng: random.Random) -> tuple[str, str]:
    a, b = rng.randint(0, 999), rng.randint(0, 999)
    return f"{a}+{b}", str(a + b)


# name -> (prompt prefix, generator of (input, answer))
TASKS: dict[str, tuple[str, Callable[[random.Random], tuple[str, str]]]] = {
    "copy": ("cpy", _copy),
    "reverse": ("rev", _reverse),
    "sort": ("srt", _sort),
    "swap": ("swp", _swap),
    "shift": ("sft", _shift),
    "rot13": ("r13", _rot13),
    "mirror": ("mir", _mirror),
    "add": ("add", _add),
}


def make_example(task: str, rng: random.Random) -> dict[str, str]:
    """One ``{"prompt", "answer"}`` example of ``task`` drawn with ``rng``."""
    if task not in TASKS:
        raise ValueError(f"unknown toy task {task!r}; known tasks: {', '.join(TASKS)}")
    prefix, gen = TASKS[task]
    text, answer = gen(rng)
    return {"prompt": f"{prefix}:{text}>", "answer": answer}


def task_input(prompt: str) -> str:
    """The input part of a prompt: ``"rev:abc>"`` -> ``"abc"``."""
    return prompt[prompt.index(":") + 1 : -1]


def task_seed(task: str, seed: int) -> int:
    """A seed for ``task`` that does not depend on Python's randomised ``hash``."""
    digest = hashlib.sha256(f"{task}/{seed}".encode()).digest()
    return int.from_bytes(digest[:8], "little")


def make_splits(
    task: str, sizes: Mapping[str, int], *, seed: int = 0
) -> dict[str, list[dict[str, str]]]:
    """Disjoint splits (no prompt occurs in two splits, nor twice in one), drawn in order.

    ``sizes`` maps split name to number of examples, e.g. ``{"train": 2000, "test": 200}``.
    """
    rng = random.Random(task_seed(task, seed))
    seen: set[str] = set()
    out: dict[str, list[dict[str, str]]] = {}
    for split, n in sizes.items():
        rows: list[dict[str, str]] = []
        tries = 0
        while len(rows) < n:
            tries += 1
            if tries > 50 * n + 1000:
                raise ValueError(f"task {task!r} cannot give {n} distinct {split} examples")
            ex = make_example(task, rng)
            if ex["prompt"] not in seen:
                seen.add(ex["prompt"])
                rows.append(ex)
        out[split] = rows
    return out
