"""Tensor-parallel checks: calibration, generation, serving and throughput at tp >= 2 (``check``)."""
