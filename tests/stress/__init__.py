"""Reliability proof: storms, leaks, misuse and bad input (``pytest -m stress``)."""
