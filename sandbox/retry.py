"""When the client may send a request again: only when the program certainly did not run.

Safe to retry (the service never saw the whole request, or refused it before running anything):
- the connection could not be made (refused, unreachable, connect timeout) or no pooled connection
  became free (`httpx.ConnectError`, `ConnectTimeout`, `PoolTimeout`);
- the request could not be written out (`httpx.WriteError`): the service runs a program only after
  reading its whole body;
- the answer is 503 (queue full, too many connections, or draining: the service is stopping and runs
  nothing new) or 429: refused before acceptance.
Everything else (the connection dropped or timed out after the request was sent, 502/504 from a
proxy) may come after the program ran: it is reported, never retried, so no program runs twice.

Backoff: attempt i (from 0) waits min(max_delay_s, base_delay_s * 2**i), scaled by a random factor in
[0.5, 1], and at least the shortest Retry-After among the endpoints that refused in that round (none:
0); no attempt starts after `deadline_s`. A connection the service closed while it was idle in the
pool is not reused (httpx drops it when it finds it closed, and the client keeps idle connections for
less time than the service waits before closing them); one closed after the request went out raises
`RemoteProtocolError`/`ReadError`: not retried.
"""

from __future__ import annotations

import dataclasses
import random

import httpx

SAFE_ERRORS: tuple[type[Exception], ...] = (httpx.ConnectError, httpx.ConnectTimeout, httpx.PoolTimeout,
                                            httpx.WriteError)
SAFE_STATUS = frozenset({429, 503})


@dataclasses.dataclass(frozen=True)
class RetryPolicy:
    """The defaults keep trying for about a minute of sustained overload before giving up."""

    max_attempts: int = 40
    base_delay_s: float = 0.05
    max_delay_s: float = 2.0
    deadline_s: float = 120.0

    def delay(self, attempt: int, retry_after: float | None) -> float:
        backoff = min(self.max_delay_s, self.base_delay_s * 2**attempt) * random.uniform(0.5, 1.0)
        return max(backoff, retry_after or 0.0)


def is_safe_error(error: Exception) -> bool:
    """Whether a transport error proves the request was not run."""
    return isinstance(error, SAFE_ERRORS)


def retry_after(response: httpx.Response) -> float | None:
    """The Retry-After header in seconds (the delta-seconds form), if any."""
    value = response.headers.get("Retry-After")
    try:
        return float(value) if value is not None else None
    except ValueError:
        return None
