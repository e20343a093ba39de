"""Evaluation: generation, judge-free contrastive metrics, LLM judges (OpenAI-compatible or local), EM rates."""

from em_interp.eval.em_metrics import em_rate, is_em
from em_interp.eval.judge import LocalJudge, OpenAIJudge
from em_interp.eval.questions import Question, load_questions

__all__ = ["LocalJudge", "OpenAIJudge", "Question", "em_rate", "is_em", "load_questions"]
