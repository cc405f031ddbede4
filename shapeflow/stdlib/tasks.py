"""Tasks: datasets of prompts with verifiable answers, generated in code (nothing downloaded)."""

from __future__ import annotations

import hashlib
import random
from dataclasses import dataclass
from typing import Callable, Iterator, Literal

from pydantic import Field, model_validator

from shapeflow.stdlib.registry import StageParams, stage


@dataclass(frozen=True, slots=True)
class Example:
    id: str
    prompt: str
    answer: str
    meta: dict | None = None  # task-specific data a scorer needs (e.g. a reasoning-gym entry)


@dataclass(frozen=True)
class TaskData:
    """The value of type ``Dataset``: a named, ordered list of examples.

    ``scorer`` (optional) is the task's own scoring function ``(example, response) -> float``;
    the rollout records its value as ``scores["task"]`` for each response.
    """

    name: str
    split: str
    examples: tuple[Example, ...]
    scorer: Callable[[Example, str], float] | None = None

    def __len__(self) -> int:
        return len(self.examples)

    def __iter__(self) -> Iterator[Example]:
        return iter(self.examples)

    def __getitem__(self, i: int) -> Example:
        return self.examples[i]


class ArithmeticParams(StageParams):
    digits: int = Field(2, ge=1, le=9, description="Digits of the first operand (10..99 for 2).")
    second_digits: int | None = Field(
        None, ge=1, le=9, description="Digits of the second operand; none uses `digits`."
    )
    split: Literal["train", "test"] = Field("train", description="train or held-out test problems.")
    test_fraction: float = Field(0.1, gt=0, lt=1, description="Share of all problems held out for test.")
    size: int | None = Field(
        None, ge=1, le=10_000_000,
        description="Number of problems; none takes the whole split when it has at most 100,000, "
        "else 100,000 sampled.",
    )
    seed: int = Field(0, ge=0, description="Seed of the split assignment and of the order.")

    @model_validator(mode="after")
    def _operand_space_fits(self):
        second = self.second_digits or self.digits
        if self.digits + second > 16:
            raise ValueError("digits + second_digits must be at most 16")
        total = len(_operands(self.digits)) * len(_operands(second))
        if total > _ENUMERATE_MAX:  # sampled by rejection: the split must hold far more than `size`
            share = self.test_fraction if self.split == "test" else 1 - self.test_fraction
            limit = self.size if self.size is not None else _DEFAULT_SIZE
            available = int(total * share)
            if limit > available // 2:
                raise ValueError(
                    f"size {limit} is too many to sample from the {self.split} split of "
                    f"about {available} problems; ask for at most {available // 2}"
                )
            if limit > _MAX_DRAWS * share:
                raise ValueError(
                    f"size {limit} would take about {int(limit / share)} draws to sample: the "
                    f"{self.split} split holds a share of only {share:g}; ask for at most "
                    f"{int(_MAX_DRAWS * share)} or raise test_fraction"
                )
        return self


_ENUMERATE_MAX = 2_000_000  # operand spaces up to this size are enumerated; larger ones sampled
_DEFAULT_SIZE = 100_000
_MAX_DRAWS = 50_000_000  # bound on the rejection-sampling draws a valid `size` can need (≈ size / share)


def _in_test_split(a: int, b: int, seed: int, test_fraction: float) -> bool:
    """A fixed, seedable coin per problem: the two splits never share a problem."""
    h = hashlib.blake2b(f"{seed}:{a}+{b}".encode(), digest_size=8).digest()
    return int.from_bytes(h, "big") / 2**64 < test_fraction


def _operands(digits: int) -> range:
    return range(10 ** (digits - 1) if digits > 1 else 0, 10**digits)


@stage("tasks.arithmetic", kind="data", inputs={}, output="Dataset", params=ArithmeticParams, phase="setup")
def arithmetic(*, digits, second_digits, split, test_fraction, size, seed):
    """Addition problems ``"57+8="`` with answer ``"65"``: carries included, verifiable exactly.

    Every pair (a, b) with a of ``digits`` digits and b of ``second_digits`` digits is a
    problem; a seeded hash assigns each to train or test, so the splits never overlap and do
    not change when ``size`` does. Prompts are the bare expression; the answer is the decimal
    sum. Example: digits = 2, second_digits = 1 spans 90 × 10 = 900 problems, about 90 of
    them held out with the default test_fraction.
    """
    second = second_digits or digits
    wanted = split == "test"
    space_a, space_b = _operands(digits), _operands(second)
    total = len(space_a) * len(space_b)
    rng = random.Random(seed)
    limit = size if size is not None else _DEFAULT_SIZE
    if total <= _ENUMERATE_MAX:
        pairs = [(a, b) for a in space_a for b in space_b if _in_test_split(a, b, seed, test_fraction) == wanted]
        rng.shuffle(pairs)
        pairs = pairs[:limit]
    else:  # too many to enumerate: sample distinct pairs of the wanted split
        chosen: dict[tuple[int, int], None] = {}
        while len(chosen) < limit:
            a, b = rng.choice(space_a), rng.choice(space_b)
            if _in_test_split(a, b, seed, test_fraction) == wanted:
                chosen[(a, b)] = None
        pairs = list(chosen)
    examples = tuple(Example(f"{a}+{b}", f"{a}+{b}=", str(a + b)) for a, b in pairs)
    return TaskData(f"arithmetic-{digits}x{second}", split, examples)
