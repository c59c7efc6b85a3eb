"""Evaluation: the eval command, plots of runs and their stages, the lm-evaluation-harness adapter."""
