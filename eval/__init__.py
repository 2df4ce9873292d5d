"""Evaluation: prompt sets (`jmerge.eval.prompts`), judges (`jmerge.eval.judges`), suites, reports."""
