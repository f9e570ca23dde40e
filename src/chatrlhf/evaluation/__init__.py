"""Held-out evaluation of a run's models, win-rates, and the run report with its plots.

Importing this package loads neither transformers nor matplotlib; they are imported where used.
"""

from chatrlhf.evaluation.answers import (
    Answer,
    Answers,
    answer_kl,
    kl_to_reference,
    response_log_probs,
    sample_answers,
)
from chatrlhf.evaluation.evaluate import evaluate_models
from chatrlhf.evaluation.metrics import win_rate
from chatrlhf.evaluation.prompts import EvalPrompt, load_eval_prompts
from chatrlhf.evaluation.report import md_escape, write_report
from chatrlhf.evaluation.run import EvalConfig, run_eval

__all__ = [
    "Answer",
    "Answers",
    "EvalConfig",
    "EvalPrompt",
    "answer_kl",
    "evaluate_models",
    "kl_to_reference",
    "load_eval_prompts",
    "md_escape",
    "response_log_probs",
    "run_eval",
    "sample_answers",
    "win_rate",
    "write_report",
]
