"""finegrain: a Ray-based experiment platform for fine-grained video action recognition."""

__version__ = "0.1.0"
