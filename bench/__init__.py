"""Benchmarks: each script prints one JSON object on stdout (progress on stderr)."""
