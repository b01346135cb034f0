"""Benchmarks: ``scaleformer bench NAME`` prints a table and (``--json PATH``) writes the figures."""
