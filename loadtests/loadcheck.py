"""The load test's end-of-run verdict, as pure functions over per-key counts (no locust, no
network), so that it can be unit-tested and reused by ``locustfile.py`` and ``loadtest.py``.

The rules (CONTRACT §6: a token bucket of capacity ``rpm`` refilled at ``rpm/60`` per second,
starting full, a rejected request taking no token):

- no response was 5xx, and no request failed at the transport level;
- every key was admitted at most ``rpm + rpm/60 x span_s`` times, where ``span_s`` runs from the
  first request sent with that key to the last answer received for it (the bucket cannot have
  started earlier nor been drained later);
- every key meant to be driven over its limit saw at least one 429;
- a key never saw a 429 before it could have spent its burst: a 429 means the bucket was below
  one token, so at least ``rpm`` requests were admitted (or are of unknown outcome);
- answers to keyed requests carry ``X-RateLimit-Limit: rpm``, and 429s a ``Retry-After`` >= 1;
- a bad key (unknown, wrong secret, revoked, missing, another tenant's) is never admitted.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import asdict, dataclass, field
from typing import Any

# Statuses that mean "refused before the limiter": they take no token (CONTRACT §5, §6).
AUTH_REFUSALS = frozenset({401, 403})


@dataclass
class KeyStats:
    """What one API key's own traffic saw, from the client side."""

    rpm: int
    over_limit: bool = False  # the scenario drives this key over its limit on purpose
    sent: int = 0
    admitted: int = 0  # answered with anything but 429/401/403: the request took a token
    limited: int = 0  # 429
    refused: int = 0  # 401/403 (not expected for a good key; takes no token)
    first_sent: float | None = None  # monotonic seconds
    last_done: float | None = None
    bad_headers: int = 0  # X-RateLimit-Limit != rpm, or a 429 without Retry-After >= 1

    def record_sent(self, at: float) -> None:
        self.sent += 1
        if self.first_sent is None or at < self.first_sent:
            self.first_sent = at

    def record_answer(
        self, status: int, at: float, limit_header: str | None, retry_after: str | None
    ) -> None:
        """One answer (status > 0) for a request already counted by ``record_sent``."""
        if self.last_done is None or at > self.last_done:
            self.last_done = at
        if status == 429:
            self.limited += 1
            if not _at_least_one(retry_after):
                self.bad_headers += 1
        elif status in AUTH_REFUSALS:
            self.refused += 1
            return  # refused before the limiter: no rate-limit headers to check
        else:
            self.admitted += 1
        if limit_header != str(self.rpm):
            self.bad_headers += 1

    @property
    def unknown(self) -> int:
        """Requests sent whose outcome was never seen (transport error, cut at the stop)."""
        return self.sent - self.admitted - self.limited - self.refused

    @property
    def span_s(self) -> float:
        if self.first_sent is None or self.last_done is None:
            return 0.0
        return max(0.0, self.last_done - self.first_sent)

    def allowance(self, span_s: float | None = None) -> float:
        """The most requests a bucket of this rpm can admit over ``span_s`` (default: own)."""
        span = self.span_s if span_s is None else span_s
        return self.rpm + self.rpm / 60.0 * span


def _at_least_one(value: str | None) -> bool:
    try:
        return value is not None and int(value) >= 1
    except ValueError:
        return False


@dataclass
class RunStats:
    """Everything the verdict needs: per-key stats, every status seen, bad-key outcomes."""

    keys: dict[str, KeyStats] = field(default_factory=dict)
    statuses: Counter[int] = field(default_factory=Counter)
    transport_errors: int = 0
    bad_key_requests: int = 0
    bad_key_admitted: int = 0  # a bad key answered with anything but 401/403

    def to_json(self) -> dict[str, Any]:
        return {
            "keys": {
                name: {**asdict(k), "span_s": k.span_s, "allowance": k.allowance()}
                for name, k in self.keys.items()
            },
            "statuses": {str(s): n for s, n in sorted(self.statuses.items())},
            "transport_errors": self.transport_errors,
            "bad_key_requests": self.bad_key_requests,
            "bad_key_admitted": self.bad_key_admitted,
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> RunStats:
        fields = set(KeyStats.__dataclass_fields__)
        return cls(
            keys={
                n: KeyStats(**{k: v for k, v in d.items() if k in fields})
                for n, d in data["keys"].items()
            },
            statuses=Counter({int(s): n for s, n in data["statuses"].items()}),
            transport_errors=data["transport_errors"],
            bad_key_requests=data["bad_key_requests"],
            bad_key_admitted=data["bad_key_admitted"],
        )


def check(run: RunStats) -> list[str]:
    """The failures of a run, one sentence each; an empty list is a pass."""
    failures: list[str] = []
    server_errors = {s: n for s, n in sorted(run.statuses.items()) if s >= 500}
    if server_errors:
        failures.append(f"{sum(server_errors.values())} responses were 5xx: {server_errors}")
    if run.transport_errors:
        failures.append(f"{run.transport_errors} requests failed without an HTTP answer")
    if run.bad_key_admitted:
        failures.append(
            f"{run.bad_key_admitted} of {run.bad_key_requests} requests with a bad key "
            "were not refused with 401/403"
        )
    for name, key in sorted(run.keys.items()):
        allowance = key.allowance()
        if key.admitted > allowance:
            failures.append(
                f"key {name} (rpm {key.rpm}): {key.admitted} requests admitted in "
                f"{key.span_s:.1f} s, more than its bucket allows ({allowance:.1f})"
            )
        if key.over_limit and key.limited == 0:
            failures.append(
                f"key {name} (rpm {key.rpm}) was driven over its limit "
                f"({key.sent} requests in {key.span_s:.1f} s) and never got a 429"
            )
        if key.limited and key.admitted + key.unknown < key.rpm:
            failures.append(
                f"key {name} (rpm {key.rpm}) got {key.limited} 429s after only "
                f"{key.admitted} admitted requests: its burst of {key.rpm} was not spent"
            )
        if key.bad_headers:
            failures.append(
                f"key {name} (rpm {key.rpm}): {key.bad_headers} answers without "
                "X-RateLimit-Limit equal to the rpm (or a 429 without Retry-After >= 1)"
            )
    return failures
