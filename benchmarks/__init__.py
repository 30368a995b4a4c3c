"""Benchmarks: the platform against its peers, and the pipeline's own speed (``nox -s bench``)."""
