"""llmfleet benchmarks: run with `make bench` (see docs/benchmarks.md)."""
