"""Evaluation: pass@k, accuracy by level, solution sampling, re-ranking."""
