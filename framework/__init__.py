"""The client API: the types shared with the official `tinker` SDK (and, later, the clients)."""

from framework import types

__all__ = ["types"]
