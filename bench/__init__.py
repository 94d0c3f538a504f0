"""Benchmarks: programs with JSON output, a markdown table and PNG plots."""
