"""leasehold's benchmarks against the libraries users would pick instead. Not tests:
run ``python -m bench`` (see docs/benchmarks.md)."""
