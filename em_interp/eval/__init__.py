"""Evaluation: generation, judge-free contrastive metrics, LLM judges (OpenAI-compatible or local), EM rates."""

from em_interp.eval.contrastive import ContrastiveResult, contrastive, contrastive_many, mean_answer_logprobs
from em_interp.eval.em_metrics import em_rate, is_em
from em_interp.eval.generation import generate, generate_tokens
from em_interp.eval.judge import LocalJudge, OpenAIJudge
from em_interp.eval.judged_direction import JudgedDirection, judged_mean_diff, split_by_judge
from em_interp.eval.questions import Question, load_questions

__all__ = [
    "ContrastiveResult", "JudgedDirection", "LocalJudge", "OpenAIJudge", "Question", "contrastive", "contrastive_many",
    "em_rate", "generate", "generate_tokens", "is_em", "judged_mean_diff", "load_questions", "mean_answer_logprobs",
    "split_by_judge",
]
