"""Scoring benchmarks: metrics, candidate answers, Rel."""
