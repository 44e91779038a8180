"""Fault-injection suite: see tests/faults/README.md."""
