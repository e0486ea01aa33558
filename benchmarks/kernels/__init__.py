"""Kernel benchmarks: decode attention (ours, FA3, FlashInfer, vLLM), prefill, cache write, host overhead, tuning."""
