"""Spreading requests over several service endpoints.

Each call goes to the healthy endpoint with the fewest requests in flight from this client (ties
broken round-robin). An endpoint that refuses connections (or answers 503: busy, or draining before it
stops) is marked down for a cooldown that doubles with each consecutive failure (up to
`max_cooldown_s`), or for as long as its Retry-After asks if that is longer (a draining service asks
for the time until it has stopped listening), and gets no new requests meanwhile; a success marks it
up again, if that attempt started after the last failure (a slow answer to an older request says
nothing about the endpoint now). When every endpoint is down, the one due back first is tried.
"""

from __future__ import annotations

import dataclasses
import itertools
import time
import urllib.parse


@dataclasses.dataclass
class Endpoint:
    url: str  # base URL without a trailing slash
    in_flight: int = 0
    failures: int = 0  # consecutive connection failures
    down_until: float = 0.0  # time.monotonic() before which no new request is sent here
    failed_at: float = 0.0  # time.monotonic() of the last failure


def _base_url(url: str) -> str:
    parts = urllib.parse.urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError(f"endpoint: expected http(s)://host[:port][/prefix], got {url!r}")
    return url.rstrip("/")


class EndpointPool:
    def __init__(self, urls: list[str], *, base_cooldown_s: float = 0.5, max_cooldown_s: float = 30.0):
        if not urls:
            raise ValueError("at least one endpoint URL is needed")
        self.endpoints = [Endpoint(_base_url(url)) for url in urls]
        self.base_cooldown_s = base_cooldown_s
        self.max_cooldown_s = max_cooldown_s
        self._turn = itertools.count()

    def pick(self, avoid: set[str] = frozenset()) -> Endpoint:
        """The endpoint for the next attempt; `avoid`: URLs already tried for this request, used only
        when nothing else is up."""
        now = time.monotonic()
        up = [e for e in self.endpoints if e.down_until <= now]
        fresh = [e for e in up if e.url not in avoid] or up
        if not fresh:
            return min(self.endpoints, key=lambda e: e.down_until)
        fewest = min(e.in_flight for e in fresh)
        candidates = [e for e in fresh if e.in_flight == fewest]
        return candidates[next(self._turn) % len(candidates)]

    def mark_down(self, endpoint: Endpoint, retry_after_s: float | None = None) -> None:
        """A refusal; `retry_after_s`: how long the endpoint asked to be left alone, if it said."""
        endpoint.failures += 1
        endpoint.failed_at = time.monotonic()
        cooldown = min(self.max_cooldown_s, self.base_cooldown_s * 2 ** (endpoint.failures - 1))
        endpoint.down_until = endpoint.failed_at + max(cooldown, retry_after_s or 0.0)

    def mark_up(self, endpoint: Endpoint, attempt_started: float) -> None:
        """A success of an attempt that began at `attempt_started` (time.monotonic())."""
        if attempt_started < endpoint.failed_at:
            return
        endpoint.failures = 0
        endpoint.down_until = 0.0

    def any_up(self, avoid: set[str]) -> bool:
        """Whether an endpoint not in `avoid` is up now."""
        now = time.monotonic()
        return any(e.down_until <= now and e.url not in avoid for e in self.endpoints)
