"""Measuring tools, run from the repository root as modules (``python -m benchmarks.kernels.decode``).

By concern: ``kernels/`` (attention and cache-write kernels, host overhead, tuning), ``serving/``
(end-to-end throughput), ``accuracy/`` (perplexity and agreement on real text), ``tp/`` (tensor
parallelism). At the top, shared by them: ``common`` (timing, environment facts), ``harness``
(result files, the benchmark worker extension), ``plots`` and ``prepare_text`` (the accuracy text).
Results land in ``results/``; the README's table (under Results) says which command writes which file.
"""
