"""Serving benchmarks: end-to-end throughput with a KV-cache-bound workload, merging lanes of it, and
``vllm serve`` under load (``serve_load``)."""
