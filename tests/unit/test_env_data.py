"""The shipped math data (demo_data/math_{train,eval,sft}.jsonl, written by scripts/make_env_data.py)."""

import importlib.util
import json
from collections import Counter
from pathlib import Path

import pytest

from chatrlhf.environments.answers import extract_answer, is_correct
from chatrlhf.environments.calculator import CALCULATOR, evaluate
from chatrlhf.environments.tools import format_tool_call, parse_tool_calls, plain_tool_prompt

ROOT = Path(__file__).resolve().parents[2]
DATA = ROOT / "src" / "chatrlhf" / "demo_data"
NAMES = ("math_train", "math_eval", "math_sft")
_spec = importlib.util.spec_from_file_location("make_env_data", ROOT / "scripts" / "make_env_data.py")
make_env_data = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(make_env_data)


def read(name: str) -> list[dict]:
    return [json.loads(line) for line in (DATA / f"{name}.jsonl").read_text(encoding="utf-8").splitlines()]


@pytest.fixture(scope="module")
def files() -> dict[str, list[dict]]:
    return {name: read(name) for name in NAMES}


def test_sizes_and_mix(files):
    train, evals = files["math_train"], files["math_eval"]
    assert len(train) == 1500 and len(evals) == 200 and len(files["math_sft"]) == 300
    for rows in (train, evals):
        counts = Counter(row["category"] for row in rows)
        assert set(counts) == {"arithmetic", "multi_step"}
        assert 0.6 <= counts["multi_step"] / len(rows) <= 0.7  # about 2/3 multi-step; eval >= 60 %
    assert sum((DATA / f"{name}.jsonl").stat().st_size for name in NAMES) < 600_000


def test_rows_have_the_fields_and_unique_ids(files):
    for name in ("math_train", "math_eval"):
        for row in files[name]:
            assert set(row) == {"id", "category", "prompt", "answer", "steps"}, row
            assert row["id"].startswith({"arithmetic": "arith-", "multi_step": "multi-"}[row["category"]])
            assert row["answer"].lstrip("-").isdigit(), row  # integer answers
            assert 1 <= len(row["steps"]) <= (1 if row["category"] == "arithmetic" else 3), row
    ids = [row["id"] for name in ("math_train", "math_eval") for row in files[name]]
    assert len(ids) == len(set(ids))


def test_splits_are_disjoint(files):
    """No prompt text, and no computation however phrased, is in both splits."""
    train, evals = files["math_train"], files["math_eval"]
    assert not {r["prompt"] for r in train} & {r["prompt"] for r in evals}
    assert not {tuple(r["steps"]) for r in train} & {tuple(r["steps"]) for r in evals}
    assert len({r["prompt"] for r in train}) == len(train)


TEMPLATE_WORDS = ("A shop sells", "A train travels", " saves $", "A cake needs", "A field is", " days old",
                  "A theater has", " earns $", " cans", "A truck makes", "A library has", "An orchard has",
                  "A tank holds", " buses carry", "A book series", "A factory makes", "concert tickets", "A park is")
"""Words only one multi-step template writes (18 templates, in the generator's order)."""


def test_every_template_is_in_both_splits(files):
    assert len(make_env_data.TEMPLATES) == len(TEMPLATE_WORDS) >= 12
    for rows in (files["math_train"], files["math_eval"]):
        used = Counter()
        for row in rows:
            if row["category"] == "multi_step":
                [words] = [w for w in TEMPLATE_WORDS if w in row["prompt"]]  # exactly one template's
                used[words] += 1
        assert set(used) == set(TEMPLATE_WORDS)
        assert max(used.values()) <= 2 * min(used.values())  # templates take turns: none dominates


def test_steps_give_the_answer(files):
    """The calculator, run on each row's steps, gives its answer; later steps use earlier results."""
    for name in ("math_train", "math_eval"):
        for row in files[name]:
            results = [evaluate(step) for step in row["steps"]]
            assert results[-1] == row["answer"], row
            for i, result in enumerate(results[:-1]):  # each intermediate result is an operand of a later step
                assert any(result in later.split() for later in row["steps"][i + 1:]), row


def test_numbers_are_beyond_mental_arithmetic(files):
    """Every step is one operation on two numbers; every product is of two numbers of at least 12 or of a
    number of at least 1000 and a digit (the recipe's grams per day times days)."""
    for name in ("math_train", "math_eval"):
        for row in files[name]:
            for step in row["steps"]:
                a, op, b = step.split()
                if op == "*" and a != "2":  # the fence's perimeter doubles a 3-4 digit sum
                    small, large = sorted((abs(int(a)), abs(int(b))))
                    assert small >= 12 or large >= 1000, row


def test_sft_demonstrations(files):
    """Each demo: the tool prompt, the problem, one call per step with the calculator's own output, and the
    final "The answer is X." that the checker reads as the row's answer. All problems come from train."""
    by_prompt = {row["prompt"]: row for row in files["math_train"]}
    eval_prompts = {row["prompt"] for row in files["math_eval"]}
    system, tools = plain_tool_prompt([CALCULATOR]), {CALCULATOR.name: CALCULATOR}
    for demo in files["math_sft"]:
        messages = demo["messages"]
        assert messages[0] == {"role": "system", "content": system}
        assert messages[1]["role"] == "user" and messages[1]["content"] not in eval_prompts
        row = by_prompt[messages[1]["content"]]
        calls, results = messages[2:-1:2], messages[3:-1:2]
        assert len(calls) == len(results) == len(row["steps"])
        for step, call, result in zip(row["steps"], calls, results):
            assert call == {"role": "assistant", "content": format_tool_call("calculator", {"expression": step})}
            [parsed] = parse_tool_calls(call["content"], tools)
            assert parsed.arguments == {"expression": step}
            assert result == {"role": "tool", "content": evaluate(step)}
        assert messages[-1] == {"role": "assistant", "content": f"The answer is {row['answer']}."}
        assert extract_answer(messages[-1]["content"]) == row["answer"]
        assert is_correct(messages[-1]["content"], row["answer"])
    categories = Counter(by_prompt[d["messages"][1]["content"]]["category"] for d in files["math_sft"])
    assert categories == {"arithmetic": 100, "multi_step": 200}


def test_generator_reproduces_the_files_byte_for_byte(tmp_path):
    make_env_data.main(["--out-dir", str(tmp_path)])
    for name in NAMES:
        assert (tmp_path / f"{name}.jsonl").read_bytes() == (DATA / f"{name}.jsonl").read_bytes(), name
