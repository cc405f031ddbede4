"""Data stages beyond arithmetic: countdown, the user's JSONL/parquet files, reasoning-gym, and
the verifier that scores responses with the task's own scorer."""

from __future__ import annotations

import json
import subprocess
import sys
from fractions import Fraction
from pathlib import Path

import pytest
from pydantic import ValidationError

from conftest import call, make_batch
from shapeflow._lazy import torch
from shapeflow.runtime.batch import MissingNeed
from shapeflow.stdlib import tasks
from shapeflow.stdlib.registry import default_registry
from shapeflow.stdlib.tasks import (
    Example,
    TaskData,
    TaskDataError,
    _countdown_in_test,
    evaluate_countdown,
    score_countdown,
)



# --------------------------------------------------------------------------------------------
# tasks.countdown
# --------------------------------------------------------------------------------------------

def countdown(**params):
    return call("tasks.countdown", **params)


def check_problems(data, numbers=4, number_max=9, target_max=100):
    """Every problem is well formed and its reference answer reaches the target."""
    for ex in data:
        drawn, target = ex.meta["numbers"], ex.meta["target"]
        assert len(drawn) == numbers and all(1 <= n <= number_max for n in drawn)
        assert 1 <= target <= target_max
        assert ex.prompt == f"Use {' '.join(map(str, drawn))} to make {target}:"
        assert ex.prompt.isascii() and ex.answer.isascii()
        assert ex.id == ",".join(map(str, sorted(drawn))) + f":{target}"
        assert evaluate_countdown(ex.answer, drawn) == target
        assert sorted(int(t) for t in "".join(c if c.isdigit() else " " for c in ex.answer).split()) == sorted(drawn)
        assert data.scorer(ex, ex.answer) == 1.0
    assert len({ex.id for ex in data}) == len(data)  # no repeated problem
    return {ex.id for ex in data}


def test_countdown_answers_reach_their_targets():
    data = countdown(size=300)
    assert (data.name, data.split, len(data)) == ("countdown-4", "train", 300)
    assert data.scorer is score_countdown
    check_problems(data)
    # observed seeded order: must not drift (the doc page quotes the first problem)
    assert (data[0].prompt, data[0].answer) == ("Use 7 7 1 5 to make 41:", "7*5+7-1")
    assert data[0].meta == {"numbers": [7, 7, 1, 5], "target": 41}
    assert max(len(ex.prompt) for ex in data) <= 24 and max(len(ex.answer) for ex in data) <= 11


@pytest.mark.parametrize("numbers, number_max, target_max", [(2, 9, 100), (3, 9, 100), (6, 9, 100), (5, 100, 1000)])
def test_countdown_other_shapes_are_solvable(numbers, number_max, target_max):
    data = countdown(numbers=numbers, number_max=number_max, target_max=target_max, size=60)
    assert data.name == f"countdown-{numbers}"
    check_problems(data, numbers, number_max, target_max)


def test_countdown_splits_are_disjoint_and_deterministic():
    train, test = countdown(size=2000), countdown(split="test", size=200)
    tr, te = check_problems(train), check_problems(test)
    assert tr & te == set()
    assert all(_countdown_in_test(k, 0, 0.1) for k in te) and not any(_countdown_in_test(k, 0, 0.1) for k in tr)
    assert countdown(size=2000).examples == train.examples  # deterministic
    assert countdown(size=50).examples == train.examples[:50]  # a smaller size is a prefix
    other_train, other_test = countdown(size=500, seed=1), countdown(size=100, seed=1, split="test")
    assert other_train.examples != train.examples[:500]
    assert {e.id for e in other_train} & {e.id for e in other_test} == set()


def test_countdown_used_up_problem_space(monkeypatch):
    monkeypatch.setattr(tasks, "_COUNTDOWN_MISSES", 2000)  # fail fast
    with pytest.raises(TaskDataError) as err:
        countdown(numbers=2, number_max=3, size=50)
    # by hand: {1,1} -> 1 2; {1,2} -> 1 2 3; {1,3} -> 2 3 4; {2,2} -> 1 4; {2,3} -> 1 5 6; {3,3} -> 1 6 9
    problems = ["1,1:1", "1,1:2", "1,2:1", "1,2:2", "1,2:3", "1,3:2", "1,3:3", "1,3:4", "2,2:1", "2,2:4",
                "2,3:1", "2,3:5", "2,3:6", "3,3:1", "3,3:6", "3,3:9"]
    assert sum(not _countdown_in_test(k, 0, 0.1) for k in problems) == 15
    assert str(err.value) == (
        "countdown found only 15 distinct train problems of the 50 asked for (numbers = 2, number_max = 3, "
        "target_max = 100): 2000 draws in a row found no new one; ask for a smaller size or widen the problems"
    )


def test_countdown_params_are_bounded():
    for bad in ({"numbers": 1}, {"numbers": 7}, {"size": 0}, {"test_fraction": 1.0}, {"number_max": 0}):
        with pytest.raises(ValidationError):
            countdown(**bad)


PROBLEM = Example("3,4,9:39", "Use 4 9 3 to make 39:", "3*(9+4)", {"numbers": [4, 9, 3], "target": 39})


@pytest.mark.parametrize(
    "response, score",
    [
        ("3*(9+4)", 1.0),
        ("(4+9)*3", 1.0),
        ("4*9+3", 1.0),
        ("  4 * 9 + 3 \n", 1.0),  # spaces inside, whitespace around
        ("((((4*9))+(3)))", 1.0),
        ("9*4+3", 1.0),
        ("39", 0.0),  # 39 is not one of the numbers
        ("3*13", 0.0),
        ("4*9+3+3", 0.0),  # 3 used twice
        ("3*(9+4)+0", 0.0),
        ("3*(9+4)*1", 0.0),
        ("3*(9+4", 0.0),
        ("3*9+4)", 0.0),
        ("3*(9+4))", 0.0),
        ("()", 0.0),
        ("", 0.0),
        ("4*9+", 0.0),
        ("4 9 3", 0.0),
        ("-3+4*9+3+3", 0.0),  # no unary minus
        ("4*9+3=39", 0.0),
        ("4*9+3.0", 0.0),
        ("4x9+3", 0.0),
        ("4*9+\u0663", 0.0),  # an Arabic-Indic digit three is not ASCII
        ("__import__('os').system('echo hi')", 0.0),
        ("2**1000000", 0.0),
        ("9**4", 0.0),
        ("9" * 5000, 0.0),
        ("99999999999999999999999999*4", 0.0),
        ("(" * 600 + "4*9+3" + ")" * 600, 0.0),  # longer than 1000 characters
        ("(" * 400 + "4*9+3" + ")" * 400, 1.0),  # deep but short enough: no recursion involved
    ],
)
def test_countdown_scorer(response, score):
    assert score_countdown(PROBLEM, response) == score


def test_countdown_scorer_exact_fractions_and_division_by_zero():
    ex = Example("4,9,9:4", "Use 9 9 4 to make 4:", "4*(9/9)", {"numbers": [9, 9, 4], "target": 4})
    assert score_countdown(ex, "4*(9/9)") == 1.0
    assert score_countdown(ex, "4") == 1.0  # a subset of the numbers is allowed
    assert score_countdown(ex, "4/(9-9)") == 0.0  # division by zero is a wrong answer
    assert score_countdown(ex, "9/(9-9)*4") == 0.0
    assert score_countdown(ex, None) == 0.0
    assert evaluate_countdown("9/4*4", [9, 4, 4]) == 9  # exact: no float rounding on the way
    assert evaluate_countdown("4/9", [9, 4]) == Fraction(4, 9)
    assert evaluate_countdown("9-4-4", [9, 4, 4]) == 1  # left-associative
    assert evaluate_countdown("9-4*4/8", [9, 4, 4, 8]) == 7
    assert evaluate_countdown("9/(4-4)", [9, 4, 4]) is None
    assert evaluate_countdown(b"4", [4]) is None


# --------------------------------------------------------------------------------------------
# tasks.jsonl
# --------------------------------------------------------------------------------------------

def jsonl(**params):
    return call("tasks.jsonl", **params)


def write_lines(path: Path, lines) -> Path:
    path.write_bytes(b"".join((ln.encode() if isinstance(ln, str) else ln) + b"\n" for ln in lines))
    return path


def test_jsonl_reads_prompts_and_answers(tmp_path):
    f = write_lines(tmp_path / "gsm.jsonl", [
        json.dumps({"question": "Tom has 3 apples and buys 4. How many?", "answer": "7"}),
        "",
        json.dumps({"question": "2 dozen?", "answer": 24, "source": "x"}),
        "   ",
        json.dumps({"question": "Half of 5?", "answer": 2.5}),
        json.dumps({"question": "1e3?", "answer": 1000.0}),
    ])
    data = jsonl(path=str(f), prompt_field="question")
    assert (data.name, data.split, data.scorer) == ("gsm", "train", None)
    assert [(e.id, e.prompt, e.answer) for e in data] == [
        ("line-1", "Tom has 3 apples and buys 4. How many?", "7"),
        ("line-3", "2 dozen?", "24"),
        ("line-5", "Half of 5?", "2.5"),
        ("line-6", "1e3?", "1000"),
    ]
    assert data[1].meta == {"question": "2 dozen?", "answer": 24, "source": "x"}
    limited = jsonl(path=str(f), prompt_field="question", limit=2, split="test")
    assert [e.id for e in limited] == ["line-1", "line-3"] and limited.split == "test"


def test_jsonl_id_field_and_relative_path(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "data").mkdir()
    write_lines(tmp_path / "data" / "d.jsonl", [
        json.dumps({"id": "a", "p": "x?", "a": "1"}),
        json.dumps({"id": 7, "p": "y?", "a": "2"}),
    ])
    data = jsonl(path="data/d.jsonl", prompt_field="p", answer_field="a", id_field="id")
    assert [(e.id, e.prompt, e.answer) for e in data] == [("a", "x?", "1"), ("7", "y?", "2")]


def test_jsonl_bad_lines_are_listed_with_line_numbers(tmp_path):
    f = write_lines(tmp_path / "bad.jsonl", [
        json.dumps({"prompt": "ok", "answer": "1", "id": "a"}),
        '{"prompt": "x", "answer": }',
        "[1, 2]",
        json.dumps({"answer": "1", "id": "b"}),
        json.dumps({"prompt": 5, "answer": "1", "id": "c"}),
        json.dumps({"prompt": "", "answer": "1", "id": "d"}),
        json.dumps({"prompt": "p", "answer": True, "id": "e"}),
        json.dumps({"prompt": "p", "answer": "1", "id": "a"}),
        b'{"prompt": "\xff", "answer": "1"}',
        json.dumps({"prompt": "fine", "answer": "2", "id": "z"}),
    ])
    with pytest.raises(TaskDataError) as err:
        jsonl(path=str(f), id_field="id")
    assert str(err.value) == (
        f"{f}: 8 bad lines\n"
        "  line 2: invalid JSON (Expecting value at column 27)\n"
        "  line 3: expected a JSON object, got an array\n"
        "  line 4: no field 'prompt'\n"
        "  line 5: field 'prompt' is a number, not a string\n"
        "  line 6: field 'prompt' is empty\n"
        "  ... and 3 more"
    )


@pytest.mark.parametrize(
    "record, reason",
    [
        ({"prompt": "p", "answer": True, "id": 1}, "field 'answer' is a boolean, not a string or a number"),
        ({"prompt": "p", "answer": None, "id": 1}, "field 'answer' is null, not a string or a number"),
        ({"prompt": "p", "answer": ["1"], "id": 1}, "field 'answer' is an array, not a string or a number"),
        ({"prompt": "p", "id": 1}, "no field 'answer'"),
        ({"prompt": ["p"], "answer": "1", "id": 1}, "field 'prompt' is an array, not a string"),
        ({"prompt": {"x": 1}, "answer": "1", "id": 1}, "field 'prompt' is an object, not a string"),
        ({"prompt": "p", "answer": "1", "id": 1.5}, "field 'id' is a number, not a string or an integer"),
        ({"prompt": "p", "answer": "1", "id": False}, "field 'id' is a boolean, not a string or an integer"),
        ({"prompt": "p", "answer": "1"}, "no field 'id'"),
    ],
)
def test_jsonl_one_bad_line(tmp_path, record, reason):
    f = write_lines(tmp_path / "one.jsonl", [json.dumps({"prompt": "p", "answer": "1", "id": 0}), json.dumps(record)])
    with pytest.raises(TaskDataError) as err:
        jsonl(path=str(f), id_field="id")
    assert str(err.value) == f"{f}: 1 bad line\n  line 2: {reason}"


def test_jsonl_non_finite_number_and_bad_utf8(tmp_path):
    f = write_lines(tmp_path / "nan.jsonl", ['{"prompt": "p", "answer": NaN}', b'{"prompt": "\xc3", "answer": "1"}'])
    with pytest.raises(TaskDataError) as err:
        jsonl(path=str(f))
    assert str(err.value) == (
        f"{f}: 2 bad lines\n  line 1: field 'answer' is not a finite number\n  line 2: not UTF-8 (byte 13)"
    )


def test_jsonl_missing_file_directory_and_empty_file(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(TaskDataError) as err:
        jsonl(path="nope.jsonl")
    assert str(err.value) == f"data file not found: nope.jsonl (relative to the current directory {Path.cwd()})"
    with pytest.raises(TaskDataError) as err:
        jsonl(path=str(tmp_path / "nope.jsonl"))
    assert str(err.value) == f"data file not found: {tmp_path / 'nope.jsonl'}"
    with pytest.raises(TaskDataError) as err:
        jsonl(path=str(tmp_path))
    assert str(err.value) == f"data path is not a file: {tmp_path}"
    write_lines(tmp_path / "empty.jsonl", ["", "  "])
    with pytest.raises(TaskDataError) as err:
        jsonl(path="empty.jsonl")
    assert str(err.value) == "empty.jsonl holds no examples"
    with pytest.raises(ValidationError):
        jsonl(path="")
    with pytest.raises(ValidationError):
        jsonl(path="x.jsonl", limit=0)


@pytest.fixture
def hf_offline(tmp_path, monkeypatch):
    """`datasets` offline, with its cache in the test's folder."""
    for var, value in (("HF_HOME", str(tmp_path / "hf")), ("HF_DATASETS_OFFLINE", "1"), ("HF_HUB_OFFLINE", "1")):
        monkeypatch.setenv(var, value)
    datasets = pytest.importorskip("datasets")
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "hf" / "datasets")
    return datasets


def test_parquet_round_trip(tmp_path, hf_offline):
    rows = [{"q": "1+1?", "a": 2, "n": "x"}, {"q": "2+2?", "a": 4, "n": "y"}, {"q": "3+3?", "a": 6, "n": "z"}]
    f = tmp_path / "math.parquet"
    hf_offline.Dataset.from_list(rows).to_parquet(str(f))
    data = jsonl(path=str(f), prompt_field="q", answer_field="a", id_field="n")
    assert data.name == "math"
    assert [(e.id, e.prompt, e.answer, e.meta) for e in data] == [
        (r["n"], r["q"], str(r["a"]), r) for r in rows
    ]
    assert [e.id for e in jsonl(path=str(f), prompt_field="q", answer_field="a", limit=2)] == ["row-1", "row-2"]
    with pytest.raises(TaskDataError) as err:
        jsonl(path=str(f), answer_field="answer")
    assert str(err.value) == f"{f} has no column 'prompt', 'answer' (columns: q, a, n)"
    nulls = tmp_path / "nulls.parquet"
    hf_offline.Dataset.from_list([{"prompt": "p", "answer": "1"}, {"prompt": None, "answer": "2"}]).to_parquet(
        str(nulls))
    with pytest.raises(TaskDataError) as err:
        jsonl(path=str(nulls))
    assert str(err.value) == f"{nulls}: 1 bad row\n  row 2: field 'prompt' is null, not a string"
    (tmp_path / "junk.parquet").write_bytes(b"not parquet")
    with pytest.raises(TaskDataError, match="^cannot read .*junk.parquet as parquet: "):
        jsonl(path=str(tmp_path / "junk.parquet"))


# --------------------------------------------------------------------------------------------
# tasks.reasoning_gym
# --------------------------------------------------------------------------------------------

def gym(**params):
    pytest.importorskip("reasoning_gym")
    st = default_registry()["tasks.reasoning_gym"]  # conftest.call takes `name` itself
    return st.fn(**st.params(**params).model_dump())


@pytest.mark.parametrize(
    "name, size, test_fraction",
    [("chain_sum", 40, 0.1), ("basic_arithmetic", 40, 0.1), ("countdown", 4, 0.5)],  # countdown: ~20 ms a problem
)
def test_reasoning_gym_gold_scores_and_splits(name, size, test_fraction):
    train = gym(name=name, size=size, test_fraction=test_fraction)
    test = gym(name=name, size=size, test_fraction=test_fraction, split="test")
    assert (train.name, train.split, test.split) == (f"reasoning_gym-{name}", "train", "test")
    assert len(train) == len(test) == size
    for ex in list(train) + list(test):
        assert ex.prompt == ex.meta["question"] and ex.answer == str(ex.meta["answer"])
        assert ex.id == f"{name}-{ex.meta['metadata']['source_index']}"
        assert train.scorer(ex, ex.answer) == 1.0
        assert train.scorer(ex, "12345") < 0.5
        assert train.scorer(ex, "") < 0.5
    assert {e.prompt for e in train} & {e.prompt for e in test} == set()
    assert len({e.prompt for e in train}) == size
    again = gym(name=name, size=size, test_fraction=test_fraction)
    assert [(e.id, e.prompt, e.answer) for e in again] == [(e.id, e.prompt, e.answer) for e in train]
    prefix = gym(name=name, size=2, test_fraction=test_fraction)
    assert [e.id for e in prefix] == [e.id for e in train][:2]


def test_reasoning_gym_config_and_first_problem():
    data = gym(name="chain_sum", config=["max_terms=2", "max_digits=1"], size=3)  # quoted in the doc page
    assert [(e.id, e.prompt, e.answer) for e in data] == [
        ("chain_sum-0", "State the final answer to the following arithmetic problem: 0 - 4 =", "-4"),
        ("chain_sum-1", "State the final answer to the following arithmetic problem: 4 - 1 =", "3"),
        ("chain_sum-2", "State the final answer to the following arithmetic problem: 1 + 5 =", "6"),
    ]
    assert data.scorer(data[0], "-4") == 1.0 and data.scorer(data[0], "4") == 0.0


def test_reasoning_gym_errors():
    with pytest.raises(TaskDataError) as err:
        gym(name="chain_summ", size=3)
    assert str(err.value) == "reasoning-gym has no dataset 'chain_summ'; did you mean 'chain_sum'?"
    with pytest.raises(TaskDataError, match=r"^reasoning-gym has no dataset 'xyzzy' \(\d+ datasets; see "):
        gym(name="xyzzy", size=3)
    with pytest.raises(TaskDataError) as err:
        gym(name="chain_sum", config=["foo=1"], size=3)
    assert str(err.value) == (
        "reasoning-gym dataset 'chain_sum' rejected its config {'foo': 1}: ChainSumConfig.__init__() got an "
        "unexpected keyword argument 'foo' (its config keys: min_terms, max_terms, min_digits, max_digits, "
        "allow_negation)"
    )
    with pytest.raises(TaskDataError, match=r"rejected its config \{'min_terms': 0\}: min_terms must be positive"):
        gym(name="chain_sum", config=["min_terms=0"], size=3)
    with pytest.raises(TaskDataError) as err:
        gym(name="chain_sum", config=["max_terms=2", "max_digits=1"], size=100, split="test")
    assert str(err.value) == (
        "reasoning-gym 'chain_sum' gave only 28 distinct test problems of the 100 asked for in 3000 draws; "
        "ask for a smaller size or widen its config"
    )


@pytest.mark.parametrize(
    "config, message",
    [
        (["max_terms"], "config entry 'max_terms' is not of the form \"key=value\""),
        (["=3"], "config entry '=3' is not of the form \"key=value\""),
        (["2x=3"], "config entry '2x=3' is not of the form \"key=value\""),
        (["seed=3"], "config entry 'seed=3': set seed with the stage's own parameter"),
        (["size=3"], "config entry 'size=3': set size with the stage's own parameter"),
        (["a=1", "a=2"], "config key 'a' is given twice"),
    ],
)
def test_reasoning_gym_config_is_checked_without_importing_it(config, message):
    with pytest.raises(ValidationError, match=message.replace("(", r"\(")):
        tasks.ReasoningGymParams(name="chain_sum", config=config)


def test_reasoning_gym_config_values():
    assert tasks._parse_config(["a=7", "b = true", "c=[1, 2]", "d=hello", "e=\"7\"", "f=", "g=1.5"]) == {
        "a": 7, "b": True, "c": [1, 2], "d": "hello", "e": "7", "f": "", "g": 1.5,
    }


def test_reasoning_gym_scorer_never_raises():
    class Flaky:
        def score_answer(self, answer, entry):
            if answer == "boom":
                raise ValueError("cannot parse")
            return float("nan") if answer == "nan" else 0.25

    scorer = tasks.ReasoningGymScorer(Flaky())
    ex = Example("x", "q", "a", {"question": "q", "answer": "a"})
    assert (scorer(ex, "boom"), scorer(ex, "nan"), scorer(ex, "ok")) == (0.0, 0.0, 0.25)


# --------------------------------------------------------------------------------------------
# verifiers.task_score
# --------------------------------------------------------------------------------------------

def scored_batch(task, examples, responses):
    b = make_batch(range(len(responses)), responses=list(responses), examples=list(examples))
    b.task = task
    return b


def test_task_score_uses_the_task_scorer():
    task = TaskData("countdown-3", "train", (PROBLEM,), score_countdown)
    b = scored_batch(task, [PROBLEM] * 4, ["3*(9+4)", "(4+9)*3", "39", "4*9+3"])  # the doc page's example
    got = call("verifiers.task_score", b)
    assert got.dtype.is_floating_point and got.tolist() == [1.0, 1.0, 0.0, 1.0]
    rows = torch.tensor([1, 2])
    assert b.select(rows).examples == [PROBLEM, PROBLEM] and b.select(rows).task is task


def test_task_score_partial_credit_and_threshold():
    def scorer(example, response):
        return {"a": 0.05, "b": 1.0, "c": 0.5, "d": float("nan")}[response]

    task = TaskData("t", "train", (PROBLEM,), scorer)
    b = scored_batch(task, [PROBLEM] * 4, ["a", "b", "c", "d"])
    assert call("verifiers.task_score", b).tolist() == pytest.approx([0.05, 1.0, 0.5, 0.0])
    assert call("verifiers.task_score", b, threshold=0.5).tolist() == [0.0, 1.0, 1.0, 0.0]
    with pytest.raises(ValidationError):
        call("verifiers.task_score", b, threshold=1.5)


def test_task_score_without_a_scorer_is_exact_match():
    data = call("tasks.arithmetic", digits=1, size=2)
    b = scored_batch(data, [data[0], data[0], data[1]], [data[0].answer, f" {data[0].answer}\n", "x"])
    assert call("verifiers.task_score", b).tolist() == [1.0, 1.0, 0.0]


def test_task_score_needs_the_examples():
    with pytest.raises(MissingNeed) as err:
        call("verifiers.task_score", make_batch([0], responses=["1"]))
    assert str(err.value) == (
        "the rollouts carry no task examples (verifiers.task_score needs the runtime's rollouts)"
    )


# --------------------------------------------------------------------------------------------
# `shapeflow check` on specs using the new stages: fast, nothing heavy imported
# --------------------------------------------------------------------------------------------

SPEC = """\
model     policy  = models.causal_lm("builtin:arith-tiny")
data      prompts = {data}
rollout   groups  = rollouts.sample(policy, prompts, n = 4, max_new_tokens = 12)
verify    ok      = verifiers.task_score(groups{extra})
advantage adv     = grpo(ok, groups)
objective loss    = losses.ppo_clip(adv, groups)
"""

DATA = {
    "countdown": ('tasks.countdown(numbers = 3, target_max = 50, split = "train", size = 500)', ""),
    "jsonl": ('tasks.jsonl(path = "data/gsm8k.jsonl", prompt_field = "question", limit = 100)', ""),
    "parquet": ('tasks.jsonl(path = "data/train.parquet", id_field = "uid", split = "train")', ""),
    "gym": ('tasks.reasoning_gym(name = "chain_sum", config = ["min_terms=2", "max_terms=3"], size = 200)',
            ", threshold = 0.5"),
}


def test_check_specs_with_the_new_stages_imports_nothing_heavy(tmp_path):
    for name, (data, extra) in DATA.items():
        (tmp_path / f"{name}.shape").write_text(SPEC.format(data=data, extra=extra))
    heavy = ("torch", "transformers", "accelerate", "mlflow", "datasets", "reasoning_gym", "pyarrow", "pandas")
    script = (
        "import sys\n"
        "from shapeflow.cli import main\n"
        "code = main(['check', '.'])\n"
        f"print(code, sorted(m for m in {heavy!r} if m in sys.modules))\n"
    )
    proc = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, capture_output=True, text=True, check=True)
    assert proc.stdout == "0 []\n", proc.stdout + proc.stderr
    cli = Path(sys.executable).parent / "shapeflow"
    proc = subprocess.run([str(cli), "check", "."], cwd=tmp_path, capture_output=True, text=True)
    assert (proc.returncode, proc.stdout, proc.stderr) == (0, "", "")
