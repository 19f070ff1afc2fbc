"""A bounded table of recent facts that expire: what a room side remembers of rooms that ended.

Oldest entries go first when the table is full, and an entry older than the caller's time to
live reads as absent (and is dropped). Pure: the caller passes the clock.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Generic, TypeVar

K = TypeVar("K")
V = TypeVar("V")


class Recent(Generic[K, V]):
    """At most ``capacity`` entries, each readable for ``ttl_s`` after it was put."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self._items: OrderedDict[K, tuple[V, float]] = OrderedDict()

    def put(self, key: K, value: V, now: float) -> None:
        self._items[key] = (value, now)
        self._items.move_to_end(key)
        while len(self._items) > self.capacity:
            self._items.popitem(last=False)

    def get(self, key: K, now: float, ttl_s: float) -> V | None:
        found = self._items.get(key)
        if found is None:
            return None
        if now - found[1] > ttl_s:
            del self._items[key]
            return None
        return found[0]

    def pop(self, key: K, now: float, ttl_s: float) -> V | None:
        value = self.get(key, now, ttl_s)
        self._items.pop(key, None)
        return value

    def values(self) -> list[V]:
        return [value for value, _ in self._items.values()]

    def __len__(self) -> int:
        return len(self._items)


__all__ = ["Recent"]
