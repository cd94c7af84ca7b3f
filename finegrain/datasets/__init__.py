"""Annotation readers, the synthetic benchmark, shards and their folder layout, frame sampling and
the Ray Data pipeline."""
