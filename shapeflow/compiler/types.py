"""The types the checker knows, and the rules of arithmetic between them.

    Model, Dataset, Rollouts          values made once or once per step
    Signal[seq], Signal[tok]          one value per response / per response token
    Advantage[seq], Advantage[tok]    what a loss consumes
    Loss                              a differentiable scalar
    Number, String, Bool, List, None  constants (folded at compile time)

A stage declares its inputs and output with these names; the level ``*`` in a declaration is
polymorphic ("either level; the output takes the finest level of its ``*`` inputs"). A
``[seq]`` value is accepted where ``[tok]`` is asked for: it broadcasts over the tokens.
"""

from __future__ import annotations

import re

from shapeflow._record import Record, record

LEVELS = ("seq", "tok")
LEVELLED = ("Signal", "Advantage")
VALUE_TYPES = ("Model", "Dataset", "Rollouts", "Loss")
CONSTANT_TYPES = ("Number", "String", "Bool", "List", "None")

# What a binding kind claims about its expression.
KIND_TYPES: dict[str, tuple[str, ...]] = {
    "model": ("Model",),
    "data": ("Dataset",),
    "rollout": ("Rollouts",),
    "verify": ("Signal",),
    "reward": ("Signal",),
    "advantage": ("Advantage",),
    "objective": ("Loss",),
}


@record(slots=True)
class Type(Record):
    base: str
    level: str | None = None  # "seq", "tok" or "*" (declarations only) for Signal/Advantage

    def __str__(self) -> str:
        return f"{self.base}[{self.level}]" if self.level else self.base

    @property
    def is_constant(self) -> bool:
        return self.base in CONSTANT_TYPES

    @property
    def is_numeric_constant(self) -> bool:
        return self.base == "Number"


_TYPE_RE = re.compile(r"^(?P<base>[A-Za-z]+)(?:\[(?P<level>seq|tok|\*)\])?$")


def parse_type(text: str) -> Type:
    """``"Signal[tok]"`` → ``Type("Signal", "tok")``; raises ValueError on anything else."""
    m = _TYPE_RE.match(text.strip())
    if not m:
        raise ValueError(f"not a type: {text!r}")
    base, level = m["base"], m["level"]
    if base in LEVELLED:
        if level is None:
            raise ValueError(f"{base} needs a level: {base}[seq], {base}[tok] or {base}[*]")
    elif level is not None or base not in VALUE_TYPES + CONSTANT_TYPES:
        raise ValueError(f"not a type: {text!r}")
    return Type(base, level)


def finest(*levels: str) -> str:
    return "tok" if "tok" in levels else "seq"


def accepts(declared: Type, actual: Type) -> bool:
    """Can a value of type ``actual`` be passed where ``declared`` is asked for?"""
    if declared.base != actual.base:
        return False
    if declared.level in (None, "*") or declared.level == actual.level:
        return True
    return declared.level == "tok" and actual.level == "seq"  # broadcast over tokens


class TypeRuleError(Exception):
    """An operator applied to types it does not combine; ``hint`` says why and what to do."""

    def __init__(self, message: str, hint: str | None = None):
        super().__init__(message)
        self.message, self.hint = message, hint


def binary(op: str, left: Type, right: Type) -> Type:
    """The result type of ``left op right`` (``op`` in ``+ - * /``); raises TypeRuleError."""
    lc, rc = left.is_numeric_constant, right.is_numeric_constant
    if lc and rc:
        return Type("Number")
    for t in (left, right):
        if t.is_constant and not t.is_numeric_constant:
            raise TypeRuleError(f"'{op}' cannot take a {t}", "arithmetic works on numbers, signals, advantages and losses")
        if t.base in ("Model", "Dataset", "Rollouts"):
            raise TypeRuleError(
                f"'{op}' cannot take a {t}",
                "a stage turns rollouts into a signal first, e.g. verifiers.exact_answer(groups)",
            )
    if lc or rc:
        value = right if lc else left
        if op == "*" or (op == "/" and rc) or value.base == "Signal":
            return value  # scaling keeps the type; a reward may also be shifted or inverted
        if op == "/":
            raise TypeRuleError(f"cannot divide a number by {value}")
        raise TypeRuleError(
            f"'{op}' between a number and {value} is not defined",
            f"a constant can scale {_article(value.base)} ('*' or '/'); adding one would shift every term equally",
        )
    if left.base == right.base == "Loss":
        if op in "+-":
            return Type("Loss")
        raise TypeRuleError(f"'{op}' between two Loss values is not defined", "losses add: a + 0.01 * b")
    if "Loss" in (left.base, right.base):
        other = right if left.base == "Loss" else left
        raise TypeRuleError(f"'{op}' between Loss and {other} is not defined",
                            "a loss stage turns an advantage into a Loss; combine losses with + and -")
    if left.base == right.base:  # Signal ⊕ Signal, Advantage ⊕ Advantage
        return Type(left.base, finest(left.level, right.level))
    adv, sig = (left, right) if left.base == "Advantage" else (right, left)
    if op == "*" or (op == "/" and left.base == "Advantage"):
        return Type("Advantage", finest(adv.level, sig.level))  # token/sequence weights
    raise TypeRuleError(
        f"'{op}' between {left} and {right} is not defined",
        "a Signal is a reward-like quantity: turn it into an advantage with an estimator such as "
        "grpo(r, groups) before combining, or use '*' to weight an advantage by a signal",
    )


def _article(word: str) -> str:
    return ("an " if word[:1].lower() in "aeiou" else "a ") + word


def unary_minus(operand: Type) -> Type:
    if operand.is_constant and not operand.is_numeric_constant or operand.base in ("Model", "Dataset", "Rollouts"):
        raise TypeRuleError(f"'-' cannot take a {operand}")
    return operand


def describe(t: Type) -> str:
    """A short English gloss for messages: ``Signal[seq]`` → "a Signal[seq] (one value per response)"."""
    glosses = {
        "seq": "one value per response",
        "tok": "one value per response token",
    }
    if t.level in glosses:
        return f"{t} ({glosses[t.level]})"
    return str(t)
