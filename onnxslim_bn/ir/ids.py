"""Maps and sets keyed by object identity, for graph nodes and tensors.

onnx-graphsurgeon's ``Node`` and ``Tensor`` are unhashable (they compare by value), and their
names are the user's words, not identities: two nodes may share a name, and a name may be
empty. Structures about graph objects key them by ``id()`` here, holding a reference to each
key so that its id stays valid while the map lives.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, MutableMapping, MutableSet
from typing import Generic, TypeVar

K = TypeVar("K")
V = TypeVar("V")


class ObjectMap(MutableMapping[K, V], Generic[K, V]):
    """A dict whose keys are objects compared by identity, in insertion order."""

    def __init__(self, items: Iterable[tuple[K, V]] = ()) -> None:
        self._items: dict[int, tuple[K, V]] = {}
        for key, value in items:
            self[key] = value

    def __getitem__(self, key: K) -> V:
        return self._items[id(key)][1]

    def __setitem__(self, key: K, value: V) -> None:
        self._items[id(key)] = (key, value)

    def __delitem__(self, key: K) -> None:
        del self._items[id(key)]

    def __contains__(self, key: object) -> bool:
        return id(key) in self._items

    def __iter__(self) -> Iterator[K]:
        return (key for key, _ in self._items.values())

    def __len__(self) -> int:
        return len(self._items)

    def __repr__(self) -> str:
        return f"ObjectMap({len(self)} items)"


class ObjectSet(MutableSet[K], Generic[K]):
    """A set of objects compared by identity, in insertion order."""

    def __init__(self, items: Iterable[K] = ()) -> None:
        self._items: dict[int, K] = {}
        for item in items:
            self.add(item)

    def add(self, item: K) -> None:
        self._items.setdefault(id(item), item)

    def discard(self, item: K) -> None:
        self._items.pop(id(item), None)

    def __contains__(self, item: object) -> bool:
        return id(item) in self._items

    def __iter__(self) -> Iterator[K]:
        return iter(self._items.values())

    def __len__(self) -> int:
        return len(self._items)

    def __repr__(self) -> str:
        return f"ObjectSet({len(self)} items)"
