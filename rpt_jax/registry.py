"""Name -> implementation tables for the pluggable parts (filters, estimators, aggregations).

A paper variant is a config string, not a fork: `FILTERS = Registry("position filter",
"rpt_jax.data.filtering.register_filter")`, `@FILTERS.register("entropy")`, `FILTERS.get(name)`.
A Registry is a read-only Mapping (`name in R`, `sorted(R)`); adding goes through `register`.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Callable, Generic, Iterator, TypeVar

T = TypeVar("T")


class Registry(Mapping, Generic[T]):
  """A read-only mapping of names to implementations with one way in (`register`)."""

  def __init__(self, kind: str, how_to_add: str):
    self.kind, self.how_to_add = kind, how_to_add
    self._entries: dict[str, T] = {}

  def register(self, name: str) -> Callable[[T], T]:
    """Decorator adding `fn` under `name`; a name is registered once."""

    def wrap(fn: T) -> T:
      if name in self._entries:
        raise ValueError(f"{self.kind} {name!r} is already registered; pick another name.")
      self._entries[name] = fn
      return fn

    return wrap

  def get(self, name: str) -> T:  # type: ignore[override]  (raises instead of returning None)
    try:
      return self._entries[name]
    except KeyError:
      raise ValueError(f"unknown {self.kind} {name!r}; registered: {sorted(self._entries)} (add "
                       f"one with {self.how_to_add}).") from None

  def __getitem__(self, name: str) -> T:
    return self._entries[name]

  def __iter__(self) -> Iterator[str]:
    return iter(self._entries)

  def __len__(self) -> int:
    return len(self._entries)
