"""Annotation readers, the synthetic benchmark, shards, frame sampling and the Ray Data pipeline."""
