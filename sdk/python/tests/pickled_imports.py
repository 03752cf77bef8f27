"""An allowed module of the pickled-call tests that imports names from modules
that are not allowed: the restricted unpickler must not reach them through it."""

from os import getcwd  # noqa: F401 - reached through this module by the tests
from pathlib import Path  # noqa: F401


def own(x):
    return x


class Proxy:
    """Forwards every attribute to what it wraps, ``__module__`` too (its class's is this
    module's): wrapping what has none, it says nothing of its module."""

    def __init__(self, target):
        object.__setattr__(self, "_target", target)

    def __getattribute__(self, name):
        return getattr(object.__getattribute__(self, "_target"), name)
