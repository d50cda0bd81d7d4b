"""Exceptions of the aggregation package (torch-free)."""

from __future__ import annotations


class AggregationError(ValueError):
    """Inputs the caller must fix: a broken global model or state file, bad arguments."""


class InvalidFile(AggregationError):
    """A file is not a readable safetensors file, or not the kind of file expected here."""


class NotEnoughUpdates(AggregationError):
    """Too few valid updates remain for the strategy (e.g. Krum needs n > 2f + 2).

    ``run_round`` does not raise it: it returns a result with ``params is None`` and the
    same text in ``reason``. The functional :func:`aggregation.aggregate` raises it.
    """
