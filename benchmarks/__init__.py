"""Benchmarks of DeferredSeg routing, federation cost and speed (``python -m benchmarks.run``)."""
