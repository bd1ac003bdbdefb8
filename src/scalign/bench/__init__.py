"""Benchmarks against the shared peer workloads (`python -m scalign.bench KIND --workload NAME`)."""
