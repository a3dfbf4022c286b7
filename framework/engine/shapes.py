"""Shape buckets: every traced size is rounded up to a power of two, so the number of compiled
programs stays small and a new request size within a bucket never compiles."""

from __future__ import annotations


def bucket(n: int, minimum: int = 1) -> int:
    """Smallest power of two ≥ max(n, minimum)."""
    n = max(n, minimum, 1)
    return 1 << (n - 1).bit_length()
