"""Durable records (SQL, ``db``/``models``) and short-lived state (``kv``)."""
