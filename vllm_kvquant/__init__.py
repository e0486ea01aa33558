"""vllm-kvquant: an 8-bit (FP8 e4m3 / INT8) KV cache for vLLM with calibrated static scales.

Select it with ``--attention-backend kvquant`` (or ``LLM(..., attention_backend="kvquant")``);
the plugin registers itself through vLLM's ``vllm.general_plugins`` entry point.
"""

__version__ = "0.1.0"


def _map_source_checkout_subpackages() -> None:
    """In a source checkout, resolve ``vllm_kvquant.kernels`` / ``.scales`` to the sibling folders.

    The wheel installs ``kernels/`` and ``scales/`` inside this package. When Python imports
    this package straight from a checkout instead (``python -m ...`` run from the repository
    root puts it first on ``sys.path``), the two folders sit beside it; extending ``__path__``
    with just those two names keeps ``vllm_kvquant.kernels`` meaning the same thing.
    """
    import importlib.util
    import sys
    from pathlib import Path

    here = Path(__file__).resolve().parent
    root = here.parent
    missing = [n for n in ("kernels", "scales") if not (here / n).is_dir() and (root / n / "__init__.py").is_file()]
    if not missing:
        return
    # The checkout's root goes last on sys.path: its kernels/ and scales/ are ours only as
    # vllm_kvquant.kernels / .scales, and must not shadow installed top-level packages of those
    # names (transformers imports the Hugging Face ``kernels`` package where that is installed).
    on_path = [p for p in sys.path if Path(p or ".").resolve() == root]
    if on_path:
        sys.path[:] = [p for p in sys.path if p not in on_path] + [str(root)]

    class _CheckoutFinder:
        @staticmethod
        def find_spec(fullname, path=None, target=None):  # type: ignore[no-untyped-def]
            prefix, _, name = fullname.rpartition(".")
            if prefix != __name__ or name not in missing:
                return None
            location = root / name
            return importlib.util.spec_from_file_location(
                fullname, location / "__init__.py", submodule_search_locations=[str(location)]
            )

    sys.meta_path.insert(0, _CheckoutFinder())


_map_source_checkout_subpackages()
