"""Shape buckets: every traced size is rounded up to a few fixed values, so the number of compiled
programs stays small and a new request size within a bucket never compiles."""

from __future__ import annotations

THREE_QUARTER_FROM = 512
"""Sequence buckets from this power of two on also take the three-quarter step (384, 768, 1536, ...)."""


def bucket(n: int, minimum: int = 1) -> int:
    """Smallest power of two ≥ max(n, minimum)."""
    n = max(n, minimum, 1)
    return 1 << (n - 1).bit_length()


def length_bucket(n: int, minimum: int = 1) -> int:
    """The row length of a training or forward batch whose longest sequence has `n` tokens: the smallest
    power of two ≥ n, or three quarters of it from `THREE_QUARTER_FROM` on when that is enough. Long
    rows then carry less than a third padding instead of up to half, for at most twice the length
    compiles; the three-quarter steps stay multiples of 128 (attention kernels' block)."""
    p = bucket(n, minimum)
    return p * 3 // 4 if p >= THREE_QUARTER_FROM and max(n, minimum) <= p * 3 // 4 else p


def coarse_bucket(n: int, minimum: int = 1) -> int:
    """Smallest power of four ≥ max(n, minimum): half as many sizes as `bucket`, for where a padded
    position costs less than a compiled program (an accelerator's prefill)."""
    p = bucket(n, minimum)
    return p if p.bit_length() % 2 else 2 * p
