"""Errors the vLLM-facing part raises at start-up, so users see what to fix."""


class KVQuantConfigError(ValueError):
    """A configuration kvquant cannot run: bad option, unsupported model feature or mismatch."""
