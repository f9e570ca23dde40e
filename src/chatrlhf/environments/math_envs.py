"""The shipped math environments: ``math`` (one answer, checked) and ``calculator`` (the same problems with a
calculator tool, over several turns). Both read the data row's ``answer`` column and score 1 for a correct
final answer, 0 otherwise (``answers.is_correct``: last number, "answer: x", ``\\boxed{x}``, fractions,
thousands separators). Their data: ``demo:math_train`` and ``demo:math_eval`` (held out); tool-use
demonstrations for SFT: ``demo:math_sft``.
"""

from __future__ import annotations

from chatrlhf.environments.answers import extract_answer, is_correct, parse_number
from chatrlhf.environments.base import Environment, Step
from chatrlhf.environments.calculator import CALCULATOR
from chatrlhf.environments.tools import parse_tool_calls, run_tool


def _check_answer(row: dict) -> str | None:
    if parse_number(str(row["answer"])) is None:
        return f"column 'answer' must be a number (e.g. 1239, -2.5, 3/4), got {row['answer']!r}"
    return None


class MathEnv(Environment):
    """One turn: the reply's final answer is checked against the row's ``answer``."""

    max_turns = 1
    max_total_tokens = 512
    required_columns = ("answer",)
    train_data, eval_data = "demo:math_train", "demo:math_eval"
    system = "Solve the problem. End your reply with: The answer is <number>."
    check_row = staticmethod(_check_answer)

    def step(self, state, reply: str) -> Step:
        correct = is_correct(reply, str(state["answer"]))
        return Step(reward=float(correct), done=True,
                    info={"correct": correct, "answered": extract_answer(reply) is not None})


class CalculatorEnv(Environment):
    """Several turns: a reply with ``<tool_call>`` blocks gets the calculator's results as ``tool`` messages;
    the first reply without one is the final answer, checked as in ``MathEnv``."""

    max_turns = 5
    max_total_tokens = 1024
    required_columns = ("answer",)
    train_data, eval_data, sft_data = "demo:math_train", "demo:math_eval", "demo:math_sft"
    tools = [CALCULATOR]
    check_row = staticmethod(_check_answer)

    def step(self, state, reply: str) -> Step:
        tools = {t.name: t for t in self.tools}
        calls = parse_tool_calls(reply, tools)
        if not calls:
            correct = is_correct(reply, str(state["answer"]))
            return Step(reward=float(correct), done=True,
                        info={"correct": correct, "answered": extract_answer(reply) is not None})
        results = [run_tool(call, tools) for call in calls]
        return Step(messages=[{"role": "tool", "content": text} for text, _ in results],
                    info={"tool_calls": len(results), "tool_errors": sum(not ok for _, ok in results),
                          "correct": False})
