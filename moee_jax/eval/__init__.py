"""Evaluation: an expression reader trained on synthetic ground truth, and the metrics computed from it."""
