"""The pure core: DAGs, states, retries and cache keys. No I/O happens here."""
