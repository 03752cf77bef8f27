"""The README's pipeline ("Workflows and scheduling policy from Python"), as it is there:
the test worker allows this module (``--allow-module pipeline``)."""


def load(n: int) -> list:
    return list(range(n))


def square_all(xs: list) -> list:
    return [x * x for x in xs]


def total(parts: list) -> int:
    return sum(sum(p) for p in parts)
