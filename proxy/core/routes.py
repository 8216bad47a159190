"""Route table: longest matching prefix wins (CONTRACT §2).

A prefix matches on a segment boundary: ``/v1/renders`` matches ``/v1/renders`` and
``/v1/renders/42`` but not ``/v1/renders-admin`` (Envoy's ``path_separated_prefix``; a plain
string prefix would hand an unrelated path to the wrong upstream and the wrong auth mode).
A prefix that ends in ``/`` (``/embed/``) matches everything below it.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import Generic, Protocol, TypeVar


class HasPrefix(Protocol):
    @property
    def prefix(self) -> str: ...


R = TypeVar("R", bound=HasPrefix)


def prefix_matches(prefix: str, path: str) -> bool:
    if not path.startswith(prefix):
        return False
    return len(path) == len(prefix) or prefix.endswith("/") or path[len(prefix)] == "/"


class RouteTable(Generic[R]):
    """Built once at start-up; ``match`` is a scan of prefixes longest first."""

    __slots__ = ("_routes",)

    def __init__(self, routes: Iterable[R]) -> None:
        self._routes = tuple(sorted(routes, key=lambda r: len(r.prefix), reverse=True))

    def __iter__(self) -> Iterator[R]:
        return iter(self._routes)

    def match(self, path: str) -> R | None:
        for route in self._routes:
            if prefix_matches(route.prefix, path):
                return route
        return None
