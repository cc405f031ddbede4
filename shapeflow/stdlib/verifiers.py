"""Verifiers: check each response and give a Signal[seq] of 1.0 (pass) or 0.0 (fail)."""

from __future__ import annotations

import re
from typing import Literal

from pydantic import Field, field_validator

from shapeflow._lazy import torch
from shapeflow.stdlib.registry import StageParams, stage


def _check_regex(value: str | None) -> str | None:
    if value is not None:
        try:
            re.compile(value)
        except re.error as exc:
            raise ValueError(f"invalid regular expression: {exc}") from None
        except (RecursionError, OverflowError) as exc:  # absurd nesting or repeat counts
            raise ValueError(f"regular expression is too complex to compile ({type(exc).__name__})") from None
    return value


class ExactAnswerParams(StageParams):
    extract: str | None = Field(
        None,
        description="A regular expression applied to the response; the answer is its first group "
        "(or the whole match). none compares the whole response.",
    )
    strip: bool = Field(True, description="Ignore leading and trailing whitespace on both sides.")
    case_sensitive: bool = Field(True, description="Compare letters case-sensitively.")

    _valid_extract = field_validator("extract")(_check_regex)


@stage(
    "verifiers.exact_answer",
    kind="verify",
    inputs={"groups": "Rollouts"},
    output="Signal[seq]",
    params=ExactAnswerParams,
    needs=("response", "answer"),
)
def exact_answer(groups, *, extract, strip, case_sensitive):
    """1.0 where the response's answer equals the reference answer, else 0.0.

        v_i = 1[ norm(extract(y_i)) == norm(answer_i) ]

    ``extract`` picks the answer out of the response with a regular expression (its first
    group, or the whole match; no match fails); ``norm`` strips whitespace and folds case as
    configured. Example: responses ["65", " 65 ", "56"] against "65" give [1, 1, 0].
    """
    pattern = re.compile(extract) if extract is not None else None

    def norm(text: str) -> str:
        text = text.strip() if strip else text
        return text if case_sensitive else text.casefold()

    def answer_of(response: str) -> str | None:
        if pattern is None:
            return response
        m = pattern.search(response)
        if m is None:
            return None
        return m.group(1) if m.groups() else m.group(0)

    values = []
    for response, answer in zip(groups.need("response"), groups.need("answer")):
        got = answer_of(response)
        values.append(float(got is not None and norm(got) == norm(str(answer))))
    return torch.tensor(values, dtype=torch.float32, device=groups.device)


class FormatParams(StageParams):
    regex: str = Field(description="The pattern a well-formed response matches.")
    mode: Literal["fullmatch", "search"] = Field(
        "fullmatch", description="fullmatch: the whole response must match; search: a match anywhere."
    )

    _valid_regex = field_validator("regex")(_check_regex)


@stage(
    "verifiers.format",
    kind="verify",
    inputs={"groups": "Rollouts"},
    output="Signal[seq]",
    params=FormatParams,
    needs=("response",),
)
def format(groups, *, regex, mode):  # noqa: A001 - the stage is called `format` in specs
    """1.0 where the response matches ``regex``, else 0.0 (a format reward).

        v_i = 1[ regex matches y_i ]     (whole response, or anywhere with mode = "search")

    Example: regex "^[0-9]+$" on ["65", "6 5", ""] gives [1, 0, 0].
    """
    pattern = re.compile(regex)
    match = pattern.fullmatch if mode == "fullmatch" else pattern.search
    values = [float(match(response) is not None) for response in groups.need("response")]
    return torch.tensor(values, dtype=torch.float32, device=groups.device)
