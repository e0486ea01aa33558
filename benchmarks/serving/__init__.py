"""Serving benchmarks: end-to-end throughput with a KV-cache-bound workload, and merging lanes of it."""
