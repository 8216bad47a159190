"""Every existing name held in memory (CONTRACT §3's parenthesis): the hosts and key prefixes a
tenant or key exists for, loaded at start-up and kept current by NOTIFY, so that an unknown host
or prefix is answered with no query and a cold start pays no per-tenant miss.

The loading order makes it exact. The LISTEN link is up before the snapshot is taken (the
preload starts from the listener's (re)connection), so a change committed after the snapshot
arrives as a notification. Every name a notification mentions (old and new slug, domain,
prefix) is added to the index: a name that may exist is never answered "unknown" without a
query; if it does not exist after all, the loading cache remembers that as a negative entry.
A row streamed from the snapshot is not put in the cache when a notification named it during
the preload (the snapshot may be older than that change); it is loaded on first use instead.
"""

from __future__ import annotations

from collections.abc import Iterable

# Progress in the log every this many rows.
PROGRESS_EVERY_ROWS = 50_000


class NameIndex:
    """Names that exist (or may exist). Until ``complete``, every name may exist."""

    def __init__(self) -> None:
        self.complete = False
        self.slugs: set[str] = set()
        self.domains: set[str] = set()
        self.prefixes: set[str] = set()

    def may_have_slug(self, slug: str) -> bool:
        return not self.complete or slug in self.slugs

    def may_have_domain(self, domain: str) -> bool:
        return not self.complete or domain in self.domains

    def may_have_prefix(self, prefix: str) -> bool:
        return not self.complete or prefix in self.prefixes

    def mention(
        self, slugs: Iterable[str], domains: Iterable[str], prefixes: Iterable[str]
    ) -> None:
        """A notification named these: they may exist from now on."""
        self.slugs.update(slugs)
        self.domains.update(domains)
        self.prefixes.update(prefixes)

    def reset(self) -> None:
        """Changes may have been missed (the LISTEN link was down): nothing is known for sure
        until the next preload completes."""
        self.complete = False
        self.slugs, self.domains, self.prefixes = set(), set(), set()
