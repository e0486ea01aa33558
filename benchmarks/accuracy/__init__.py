"""The accuracy harness: trains a small Llama, calibrates, runs every KV-cache scheme, compares (``run``)."""
