"""An allowed module of the pickled-call tests that imports names from modules
that are not allowed: the restricted unpickler must not reach them through it."""

from os import getcwd  # noqa: F401 - reached through this module by the tests
from pathlib import Path  # noqa: F401


def own(x):
    return x
