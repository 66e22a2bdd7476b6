"""Name → builder registries, so the CLI and spec files name things and never branch on them."""
from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

from .errors import UserError

T = TypeVar("T")

DEFAULT_ORDER = 1000.0  # entries that give no order come after the built-ins (which use 0-999), by name


@dataclass(frozen=True)
class Meta:
    """What a registry knows about an entry besides its builder (a registry may use a subclass with more fields).

    `title` is how tables name the entry (default: its name); `order` places it among the others
    (lower first; ties by name)."""

    name: str
    title: str = ""
    order: float = DEFAULT_ORDER

    def __post_init__(self) -> None:
        if not self.title:
            object.__setattr__(self, "title", self.name)


class Registry(Generic[T]):
    """A named collection of builders; unknown names raise a UserError listing the valid ones."""

    def __init__(self, kind: str, meta_type: type[Meta] = Meta) -> None:
        self.kind = kind
        self.meta_type = meta_type
        self._items: dict[str, T] = {}
        self._meta: dict[str, Meta] = {}

    def register(self, name: str, **meta: Any) -> Callable[[T], T]:
        """Decorator registering `obj` under `name`, with metadata `meta` (fields of the registry's meta type)."""
        record = self.meta_type(name=name, **meta)  # a TypeError names an unknown field at import time

        def deco(obj: T) -> T:
            if name in self._items:
                raise ValueError(f"{self.kind} {name!r} registered twice")
            self._items[name] = obj
            self._meta[name] = record
            return obj

        return deco

    def add(self, name: str, obj: T, **meta: Any) -> None:
        """Register `obj` under `name` (non-decorator form)."""
        self.register(name, **meta)(obj)

    def get(self, name: str) -> T:
        """The builder registered as `name`, or a UserError naming the valid choices."""
        try:
            return self._items[name]
        except KeyError:
            raise UserError(
                f"unknown {self.kind} {name!r}; valid: {', '.join(sorted(self._items))}"
            ) from None

    def meta(self, name: str) -> Any:
        """The metadata registered with `name` (defaults where the entry gave none), or a UserError."""
        self.get(name)
        return self._meta[name]

    def default_meta(self, name: str) -> Any:
        """The metadata an entry registered as `name` without any would have (for names outside the registry)."""
        return self.meta_type(name=name)

    def ordered(self, names: Iterable[str]) -> list[str]:
        """`names` by their registered order, then by name (names not registered: as with default metadata)."""
        def key(name: str) -> tuple[float, str]:
            meta = self._meta.get(name) or self.default_meta(name)
            return meta.order, name

        return sorted(set(names), key=key)

    def names(self) -> list[str]:
        """Registered names, sorted."""
        return sorted(self._items)

    def __contains__(self, name: object) -> bool:
        return name in self._items

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())
