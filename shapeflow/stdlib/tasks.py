"""Tasks: datasets of prompts with verifiable answers, made in code or read from local files (nothing downloaded)."""

from __future__ import annotations

import hashlib
import json
import math
import random
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Iterator, Literal

from pydantic import Field, field_validator, model_validator

from shapeflow._record import Record, record as _record  # `record` names rows below
from shapeflow.stdlib.registry import StageParams, stage

if TYPE_CHECKING:
    from fractions import Fraction


@_record(slots=True)
class Example(Record):
    id: str
    prompt: str
    answer: str
    meta: dict | None = None  # task-specific data a scorer needs (e.g. a reasoning-gym entry)


@_record
class TaskData(Record):
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


class TaskDataError(ValueError):
    """A data stage could not build its dataset (a missing file, bad lines, an unknown task...)."""


# --------------------------------------------------------------------------------------------
# tasks.countdown
# --------------------------------------------------------------------------------------------


class CountdownParams(StageParams):
    numbers: int = Field(4, ge=2, le=6, description="How many numbers each problem gives.")
    number_max: int = Field(
        9, ge=1, le=1000, description="The numbers are drawn from 1..number_max (9 keeps them one character)."
    )
    target_max: int = Field(100, ge=1, le=1_000_000, description="Targets lie in 1..target_max.")
    split: Literal["train", "test"] = Field("train", description="train or held-out test problems.")
    test_fraction: float = Field(0.1, gt=0, lt=1, description="Share of all problems held out for test.")
    size: int = Field(
        1000, ge=1, le=1_000_000,
        description="Number of distinct problems (small shapes hold fewer: numbers = 2 with number_max = 9 "
        "has about 140 in all).",
    )
    seed: int = Field(0, ge=0, description="Seed of the generator and of the split assignment.")


_COUNTDOWN_MISSES = 100_000  # draws in a row without a new problem: the problem space is used up
_PREC = {"+": 1, "-": 1, "*": 2, "/": 2}


def _countdown_key(numbers, target: int) -> str:
    """The canonical problem: the multiset of numbers and the target (order does not matter)."""
    return ",".join(map(str, sorted(numbers))) + f":{target}"


def _countdown_in_test(key: str, seed: int, test_fraction: float) -> bool:
    h = hashlib.blake2b(f"{seed}:{key}".encode(), digest_size=8).digest()
    return int.from_bytes(h, "big") / 2**64 < test_fraction


def _random_expression(rng: random.Random, numbers: list[int]) -> tuple[int, str]:
    """A random expression using every number once; intermediate values stay positive integers.

    Two random sub-expressions are combined at a time with an operator chosen among those
    that keep the value a positive integer (``a - b`` only for a > b, ``a / b`` only when b > 1
    divides a). Parentheses are written only where precedence needs them.
    """
    items = [(n, str(n), 3) for n in numbers]  # (value, text, precedence of the top operator)
    while len(items) > 1:
        i, j = rng.sample(range(len(items)), 2)
        a, b = items[i], items[j]
        if a[0] < b[0]:
            a, b = b, a
        ops = ["+", "*"]
        if a[0] > b[0]:
            ops.append("-")
        if b[0] > 1 and a[0] % b[0] == 0:
            ops.append("/")
        op = rng.choice(ops)
        if op in "+*" and rng.random() < 0.5:
            a, b = b, a  # commutative: either order reads fine
        value = {"+": a[0] + b[0], "-": a[0] - b[0], "*": a[0] * b[0], "/": a[0] // max(b[0], 1)}[op]
        prec = _PREC[op]
        left = a[1] if a[2] >= prec else f"({a[1]})"
        right = b[1] if b[2] > prec or (b[2] == prec and op in "+*") else f"({b[1]})"
        items = [it for k, it in enumerate(items) if k not in (i, j)] + [(value, f"{left}{op}{right}", prec)]
    return items[0][0], items[0][1]


def evaluate_countdown(response: str, numbers) -> "Fraction | None":
    """The exact value of ``response`` read as an arithmetic expression, or None if it is not one.

    Accepted: non-negative integer literals, ``+ - * /``, parentheses and spaces; each literal
    must be one of ``numbers``, each number used at most as often as it is given. Anything else
    (unary minus, ``**``, names, other characters, too long a text, division by zero) gives
    None. A small operator-precedence parser: no recursion, nothing evaluated by Python.
    """
    from collections import Counter
    from fractions import Fraction

    if not isinstance(response, str) or len(response) > 1000:
        return None
    available = Counter(numbers)
    values: list[Fraction] = []
    ops: list[str] = []

    def reduce_top() -> bool:
        op = ops.pop()
        b, a = values.pop(), values.pop()
        if op == "/" and b == 0:
            return False
        values.append(a + b if op == "+" else a - b if op == "-" else a * b if op == "*" else a / b)
        return True

    expect_operand = True
    i, n = 0, len(response)
    while i < n:
        c = response[i]
        if c in " \t":
            i += 1
            continue
        if expect_operand:
            if c.isascii() and c.isdigit():
                j = i
                while j < n and response[j].isascii() and response[j].isdigit():
                    j += 1
                if j - i > 9:
                    return None  # far beyond any number a problem gives
                literal = int(response[i:j])
                if available[literal] <= 0:
                    return None
                available[literal] -= 1
                values.append(Fraction(literal))
                expect_operand = False
                i = j
                continue
            if c == "(":
                ops.append(c)
                i += 1
                continue
            return None
        if c in _PREC:
            while ops and ops[-1] != "(" and _PREC[ops[-1]] >= _PREC[c]:
                if not reduce_top():
                    return None
            ops.append(c)
            expect_operand = True
        elif c == ")":
            while ops and ops[-1] != "(":
                if not reduce_top():
                    return None
            if not ops:
                return None
            ops.pop()
        else:
            return None
        i += 1
    if expect_operand:
        return None
    while ops:
        if ops[-1] == "(" or not reduce_top():
            return None
    return values[0]


def score_countdown(example: Example, response: str) -> float:
    """1.0 when ``response`` is an expression over the problem's numbers that equals its target."""
    value = evaluate_countdown(response.strip() if isinstance(response, str) else response,
                               example.meta["numbers"])
    return float(value is not None and value == example.meta["target"])


@stage("tasks.countdown", kind="data", inputs={}, output="Dataset", params=CountdownParams, phase="setup")
def countdown(*, numbers, number_max, target_max, split, test_fraction, size, seed):
    """Reach a target with given numbers: ``"Use 7 7 1 5 to make 41:"``, answer ``"7*5+7-1"``.

    Each problem is made by drawing ``numbers`` numbers from 1..``number_max`` and combining
    all of them in a random expression whose intermediate values stay positive integers; the
    value, when in 1..``target_max``, is the target and the expression the reference answer.
    Any correct expression scores: the task's scorer reads the response as an expression
    over ``+ - * /`` and parentheses (no unary minus, no other characters) that uses only
    the given numbers, each at most once, and gives 1.0 when it equals the target exactly
    (fractions allowed on the way), else 0.0. It never evaluates Python.

    A problem is its multiset of numbers and its target; a seeded hash assigns each to train
    or test, so the splits never overlap, and a smaller ``size`` takes a prefix of the same
    order. ``meta`` holds ``{"numbers": [...], "target": n}``. Prompts are ASCII and short
    for character-level models. Example: numbers = 3 gives problems like
    ``"Use 4 9 3 to make 39:"`` (reference ``"3*(9+4)"``; ``"(4+9)*3"`` scores 1.0 too).
    """
    rng = random.Random(seed)
    wanted = split == "test"
    chosen: dict[str, Example] = {}
    misses = 0
    while len(chosen) < size:
        drawn = [rng.randint(1, number_max) for _ in range(numbers)]
        target, expression = _random_expression(rng, drawn)
        key = _countdown_key(drawn, target)
        if (
            1 <= target <= target_max
            and key not in chosen
            and _countdown_in_test(key, seed, test_fraction) == wanted
        ):
            prompt = f"Use {' '.join(map(str, drawn))} to make {target}:"
            chosen[key] = Example(key, prompt, expression, {"numbers": drawn, "target": target})
            misses = 0
            continue
        misses += 1
        if misses >= _COUNTDOWN_MISSES:
            raise TaskDataError(
                f"countdown found only {len(chosen)} distinct {split} problems of the {size} asked for "
                f"(numbers = {numbers}, number_max = {number_max}, target_max = {target_max}): "
                f"{misses} draws in a row found no new one; ask for a smaller size or widen the problems"
            )
    return TaskData(f"countdown-{numbers}", split, tuple(chosen.values()), score_countdown)


# --------------------------------------------------------------------------------------------
# tasks.jsonl
# --------------------------------------------------------------------------------------------


class JsonlParams(StageParams):
    path: str = Field(
        min_length=1,
        description="A .jsonl file (one JSON object a line) or a .parquet file; a relative path is "
        "read from the current directory.",
    )
    prompt_field: str = Field("prompt", min_length=1, description="The field holding each prompt (a string).")
    answer_field: str = Field(
        "answer", min_length=1, description="The field holding each reference answer (a string or a number)."
    )
    id_field: str | None = Field(
        None, min_length=1,
        description="The field holding each example's unique id (a string or an integer); none numbers "
        "the examples by line (or row).",
    )
    split: str = Field("train", min_length=1, description="The split name the data is recorded under.")
    limit: int | None = Field(None, ge=1, description="Read at most this many examples (the first ones); none reads all.")


_MAX_SHOWN = 5  # bad lines listed in one error


def _json_type(value) -> str:
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, (int, float)):
        return "a number"
    return {str: "a string", list: "an array", dict: "an object", type(None): "null"}.get(type(value), type(value).__name__)


def _answer_text(value) -> str | None:
    """An answer as text: strings as they are, numbers in decimal (72 and 72.0 both give "72")."""
    if isinstance(value, str):
        return value
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float) and math.isfinite(value):
        return str(int(value)) if value.is_integer() and abs(value) < 1e15 else repr(value)
    return None


def _example_of(record, number: int, where: str, fields: tuple[str, str, str | None]) -> Example | str:
    """The example of one record, or the reason it is bad."""
    prompt_field, answer_field, id_field = fields
    if not isinstance(record, dict):
        return f"expected a JSON object, got {_json_type(record)}"
    for name in (prompt_field, answer_field) + ((id_field,) if id_field else ()):
        if name not in record:
            return f"no field '{name}'"
    prompt = record[prompt_field]
    if not isinstance(prompt, str):
        return f"field '{prompt_field}' is {_json_type(prompt)}, not a string"
    if not prompt:
        return f"field '{prompt_field}' is empty"
    answer = _answer_text(record[answer_field])
    if answer is None:
        value = record[answer_field]
        what = "not a finite number" if isinstance(value, float) else f"{_json_type(value)}, not a string or a number"
        return f"field '{answer_field}' is {what}"
    if id_field:
        raw = record[id_field]
        if isinstance(raw, bool) or not isinstance(raw, (str, int)):
            return f"field '{id_field}' is {_json_type(raw)}, not a string or an integer"
        ident = str(raw)
    else:
        ident = f"{where}{number}"
    return Example(ident, prompt, answer, dict(record))


def _data_path(path: str) -> Path:
    p = Path(path).expanduser()
    if not p.exists():
        where = "" if p.is_absolute() else f" (relative to the current directory {Path.cwd()})"
        raise TaskDataError(f"data file not found: {path}{where}")
    if not p.is_file():
        raise TaskDataError(f"data path is not a file: {path}")
    return p


def _jsonl_records(p: Path):
    """(line number, record or the reason it is unreadable) for each non-blank line."""
    with open(p, "rb") as handle:
        for number, raw in enumerate(handle, 1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as exc:
                yield number, f"not UTF-8 (byte {exc.start + 1})"
                continue
            if not line.strip():
                continue
            try:
                yield number, (json.loads(line),)
            except json.JSONDecodeError as exc:
                yield number, f"invalid JSON ({exc.msg} at column {exc.colno})"
            except RecursionError:
                yield number, "invalid JSON (nested too deeply)"


def _parquet_records(p: Path, path: str, columns: tuple[str, ...]):
    """(row number, record) for each row of a parquet file, read with `datasets`."""
    try:
        from datasets import load_dataset
    except ImportError:  # pragma: no cover - the runtime extra installs it
        raise TaskDataError("reading parquet files needs the `datasets` package (pip install datasets)") from None
    try:
        table = load_dataset("parquet", data_files={"train": str(p)}, split="train")
    except Exception as exc:
        raise TaskDataError(f"cannot read {path} as parquet: {exc}") from None
    missing = [c for c in columns if c not in table.column_names]
    if missing:
        raise TaskDataError(
            f"{path} has no column {', '.join(repr(c) for c in missing)} (columns: {', '.join(table.column_names)})"
        )
    for number, row in enumerate(table, 1):
        yield number, (row,)


@stage("tasks.jsonl", kind="data", inputs={}, output="Dataset", params=JsonlParams, phase="setup")
def jsonl(*, path, prompt_field, answer_field, id_field, split, limit):
    """Your own prompts and answers from a JSONL file (GSM8K style) or a parquet file.

    Each line of a ``.jsonl`` file is a JSON object with a prompt and an answer, e.g.
    ``{"question": "Tom has 3 ...", "answer": "72"}`` with ``prompt_field = "question"``; blank
    lines are skipped. A path ending in ``.parquet`` is read with the ``datasets`` library, one
    example a row. A relative ``path`` is resolved against the current directory (where
    ``shapeflow run`` is started), not against the spec file.

    Prompts must be non-empty strings; answers strings or numbers (a number becomes its
    decimal text: 72 and 72.0 both give "72"); ids strings or integers, unique (none numbers
    the examples "line-N" / "row-N"). Every bad line is reported in one error, with its line
    number (the first five are listed, then a count). ``meta`` holds the whole record; the
    task has no scorer of its own (``verifiers.task_score`` compares answers exactly). With ``limit``, reading
    stops after that many examples. Example: a 3-line file with limit = 2 gives 2 examples.
    """
    p = _data_path(path)
    parquet = p.suffix.lower() == ".parquet"
    fields = (prompt_field, answer_field, id_field)
    unit = "row" if parquet else "line"
    records = (
        _parquet_records(p, path, tuple(f for f in fields if f)) if parquet else _jsonl_records(p)
    )
    examples: list[Example] = []
    first_seen: dict[str, int] = {}
    bad: list[str] = []
    for number, record in records:
        if limit is not None and len(examples) >= limit:
            break
        found = _example_of(record[0], number, f"{unit}-", fields) if isinstance(record, tuple) else record
        if isinstance(found, Example):
            if found.id in first_seen:
                found = f"duplicate id '{found.id}' (first on {unit} {first_seen[found.id]})"
            else:
                first_seen[found.id] = number
                examples.append(found)
                continue
        bad.append(f"{unit} {number}: {found}")
    if bad:
        shown = [f"  {b}" for b in bad[:_MAX_SHOWN]]
        if len(bad) > _MAX_SHOWN:
            shown.append(f"  ... and {len(bad) - _MAX_SHOWN} more")
        noun = unit if len(bad) == 1 else f"{unit}s"
        raise TaskDataError(f"{path}: {len(bad)} bad {noun}\n" + "\n".join(shown))
    if not examples:
        raise TaskDataError(f"{path} holds no examples")
    return TaskData(Path(path).stem, split, tuple(examples))


# --------------------------------------------------------------------------------------------
# tasks.reasoning_gym
# --------------------------------------------------------------------------------------------


def _config_value(text: str):
    """A config value: JSON when it parses as JSON (numbers, true/false/null, lists), else the text."""
    try:
        return json.loads(text)
    except (ValueError, RecursionError):
        return text


def _parse_config(items: list[str]) -> dict:
    out: dict = {}
    for item in items:
        key, sep, value = item.partition("=")
        key = key.strip()
        if not sep or not key.isidentifier():
            raise ValueError(f"config entry {item!r} is not of the form \"key=value\"")
        if key in ("size", "seed"):
            raise ValueError(f"config entry {item!r}: set {key} with the stage's own parameter")
        if key in out:
            raise ValueError(f"config key '{key}' is given twice")
        out[key] = _config_value(value.strip())
    return out


class ReasoningGymParams(StageParams):
    name: str = Field(min_length=1, description="The reasoning-gym dataset, e.g. 'chain_sum' or 'countdown'.")
    config: list[str] = Field(
        [],
        description="Settings of the dataset's own config as \"key=value\" strings, e.g. "
        "[\"min_terms=2\", \"max_terms=3\"]; a value that parses as JSON is that JSON value, "
        "else the text.",
    )
    split: Literal["train", "test"] = Field("train", description="train or held-out test problems.")
    test_fraction: float = Field(0.1, gt=0, lt=1, description="Share of all problems held out for test.")
    size: int = Field(1000, ge=1, le=1_000_000, description="Number of distinct problems.")
    seed: int = Field(0, ge=0, description="Seed of the generator and of the split assignment.")

    @field_validator("config")
    @classmethod
    def _config_entries(cls, value: list[str]) -> list[str]:
        _parse_config(value)
        return value


class ReasoningGymScorer:
    """A reasoning-gym dataset's own ``score_answer(response, entry)``; a scorer error scores 0.0."""

    def __init__(self, dataset):
        self.dataset = dataset

    def __call__(self, example: Example, response: str) -> float:
        try:
            value = float(self.dataset.score_answer(response, example.meta))
        except Exception:  # a response the scorer cannot read is a wrong answer, not a crash
            return 0.0
        return value if math.isfinite(value) else 0.0


def _gym_dataset(name: str, config: dict, size: int, seed: int):
    import difflib

    try:
        import reasoning_gym
        from reasoning_gym.factory import DATASETS
    except ImportError:
        raise TaskDataError("tasks.reasoning_gym needs the reasoning-gym package (pip install reasoning-gym)") from None
    if name not in DATASETS:
        close = difflib.get_close_matches(name, list(DATASETS), n=1)
        hint = f"; did you mean '{close[0]}'?" if close else f" ({len(DATASETS)} datasets; see reasoning_gym.factory.DATASETS)"
        raise TaskDataError(f"reasoning-gym has no dataset '{name}'{hint}")
    try:
        return reasoning_gym.create_dataset(name, size=size, seed=seed, **config)
    except (TypeError, ValueError, AssertionError) as exc:
        import dataclasses

        keys = [f.name for f in dataclasses.fields(DATASETS[name][1]) if f.name not in ("size", "seed")]
        raise TaskDataError(
            f"reasoning-gym dataset '{name}' rejected its config {config}: {exc or type(exc).__name__} "
            f"(its config keys: {', '.join(keys) or 'none'})"
        ) from None


@stage("tasks.reasoning_gym", kind="data", inputs={}, output="Dataset", params=ReasoningGymParams, phase="setup")
def reasoning_gym(*, name, config, split, test_fraction, size, seed):
    """Procedural problems of a reasoning-gym dataset, scored by the dataset's own scorer.

    The prompt is the entry's question, the answer its answer and ``meta`` the whole entry;
    the task's scorer is the dataset's ``score_answer(response, entry)`` (partial credit in
    [0, 1] for some datasets; a response the scorer fails on scores 0.0). The whole response
    is scored as the answer. ``config`` sets fields of the dataset's config, e.g.
    ``["min_terms=2", "max_terms=3"]`` for chain_sum; values are read as JSON where they parse
    (``"7"``, ``"true"``, ``"[1, 2]"``), else kept as text. Nothing is downloaded.

    The entries of the dataset's seeded stream (index 0, 1, ...) are assigned to train or test
    by a seeded hash of their question, skipping repeated questions, so the splits never
    overlap and a smaller ``size`` takes a prefix. reasoning-gym seeds entry i with seed + i:
    seeds 0 and 1 share most problems, and only the splits of one seed are disjoint. Example:
    name = "chain_sum", config = ["max_terms=2", "max_digits=1"] starts with the prompt "State
    the final answer to the following arithmetic problem: 0 - 4 =" and the answer "-4".
    """
    settings = _parse_config(config)
    wanted = split == "test"
    share = test_fraction if wanted else 1 - test_fraction
    budget = int(size / share * 2) + 1000  # draws allowed before the problem space counts as used up
    dataset = _gym_dataset(name, settings, budget, seed)
    chosen: dict[str, Example] = {}
    for index in range(budget):
        entry = dataset[index]
        question = str(entry["question"])
        if question in chosen:
            continue
        h = hashlib.blake2b(f"{seed}:{question}".encode(), digest_size=8).digest()
        if (int.from_bytes(h, "big") / 2**64 < test_fraction) != wanted:
            continue
        answer = entry.get("answer")
        chosen[question] = Example(f"{name}-{index}", question, "" if answer is None else str(answer), entry)
        if len(chosen) == size:
            break
    else:
        raise TaskDataError(
            f"reasoning-gym '{name}' gave only {len(chosen)} distinct {split} problems of the {size} asked for "
            f"in {budget} draws; ask for a smaller size or widen its config"
        )
    return TaskData(f"reasoning_gym-{name}", split, tuple(chosen.values()), ReasoningGymScorer(dataset))
