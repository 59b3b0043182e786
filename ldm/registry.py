"""Choices by name (samplers, objectives): one table each, and a name the table does not hold is refused with the
names it does, so a name added to one table can never run another entry's code through an ``else:``."""
from __future__ import annotations

from typing import Mapping, TypeVar

T = TypeVar("T")


class UnknownName(ValueError):
    """A name that is not in its registry."""


class Registry(dict[str, T]):
    """``{name: entry}``; ``registry[name]`` raises ``UnknownName`` listing the known names."""

    def __init__(self, what: str, entries: Mapping[str, T]):
        super().__init__(entries)
        self.what = what

    def __missing__(self, name: str) -> T:
        raise UnknownName(f"unknown {self.what} {name!r}; known: {', '.join(self)}")

    def names(self) -> tuple[str, ...]:
        return tuple(self)
