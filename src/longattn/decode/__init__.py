"""Decode-time selectors (page / token retrieval over a full cache). None are implemented yet."""

__all__: list[str] = []
