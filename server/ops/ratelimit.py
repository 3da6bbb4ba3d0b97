"""Per-key requests/min and tokens/min over a sliding 60 s window, in memory (one gateway process).

Tokens are known only when a request ends, so a request of a key with a tokens-per-minute limit reserves an
estimate when it is admitted and settles when it ends (the reservation is replaced by what it used): concurrent
requests see each other's reservations, so concurrency cannot run past the limit.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable

from server.errors import RateLimited
from server.ops.context import Principal, RequestContext

WINDOW_S = 60.0
DEFAULT_RESERVE = 256  # tokens a request reserves when the server sets no HUBSERVE_MAX_NEW_TOKENS


class _Window:
    def __init__(self) -> None:
        self.requests: deque[float] = deque()
        self.tokens: deque[tuple[float, int]] = deque()
        self.token_sum = 0
        self.reserved = 0  # tokens reserved by requests in flight

    def prune(self, now: float) -> None:
        while self.requests and self.requests[0] <= now - WINDOW_S:
            self.requests.popleft()
        while self.tokens and self.tokens[0][0] <= now - WINDOW_S:
            self.token_sum -= self.tokens.popleft()[1]


class RateLimiter:
    """``admit`` raises RateLimited (429, Retry-After: when the oldest entry leaves the window) for a key over
    its rpm, or whose tokens of the last minute plus those reserved in flight reached its tpm; else it reserves
    ``min(tpm, reserve)`` tokens on ``ctx``. ``settle`` releases the reservation and charges what was used."""

    def __init__(self, clock: Callable[[], float] = time.monotonic, reserve: int = DEFAULT_RESERVE) -> None:
        self._clock = clock
        self._windows: dict[str, _Window] = {}
        self.reserve = reserve

    def admit(self, who: Principal, ctx: RequestContext | None = None) -> None:
        if who.rpm is None and who.tpm is None:
            return
        now = self._clock()
        w = self._windows.setdefault(who.name, _Window())
        w.prune(now)
        if who.rpm is not None and len(w.requests) >= who.rpm:
            raise RateLimited(
                f"Key `{who.name}` is over its limit of {who.rpm} requests per minute; retry later.",
                retry_after=max(1.0, w.requests[0] + WINDOW_S - now),
            )
        if who.tpm is not None and w.token_sum + w.reserved >= who.tpm:
            oldest = w.tokens[0][0] + WINDOW_S - now if w.tokens else 1.0  # only reservations: they end soon
            raise RateLimited(
                f"Key `{who.name}` is over its limit of {who.tpm} tokens per minute; retry later.",
                retry_after=max(1.0, oldest),
            )
        w.requests.append(now)
        if who.tpm is not None and ctx is not None and ctx.reserved_tokens == 0:
            ctx.reserved_tokens = min(who.tpm, self.reserve)
            w.reserved += ctx.reserved_tokens

    def settle(self, who: Principal, ctx: RequestContext | None, tokens: int) -> None:
        """At the request's end, however it ended: its reservation goes, the tokens it used count."""
        w = self._windows.get(who.name)
        if w is not None and ctx is not None and ctx.reserved_tokens:
            w.reserved = max(0, w.reserved - ctx.reserved_tokens)
            ctx.reserved_tokens = 0
        self.charge(who, tokens)

    def charge(self, who: Principal, tokens: int) -> None:
        if who.tpm is None or tokens <= 0:
            return
        w = self._windows.setdefault(who.name, _Window())
        w.tokens.append((self._clock(), tokens))
        w.token_sum += tokens
