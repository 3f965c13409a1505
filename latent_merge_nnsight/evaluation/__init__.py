"""Evaluation: toy tasks and their scorer, JudgeBench data, pairwise LLM judging, the official protocol."""
