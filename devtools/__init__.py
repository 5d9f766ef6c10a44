"""Helpers for developing this repository: not part of the pipeline."""
