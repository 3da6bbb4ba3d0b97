"""Per-key requests/min and tokens/min over a sliding 60 s window, in memory (one gateway process)."""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable

from server.errors import RateLimited
from server.ops.context import Principal

WINDOW_S = 60.0


class _Window:
    def __init__(self) -> None:
        self.requests: deque[float] = deque()
        self.tokens: deque[tuple[float, int]] = deque()
        self.token_sum = 0

    def prune(self, now: float) -> None:
        while self.requests and self.requests[0] <= now - WINDOW_S:
            self.requests.popleft()
        while self.tokens and self.tokens[0][0] <= now - WINDOW_S:
            self.token_sum -= self.tokens.popleft()[1]


class RateLimiter:
    """``admit`` raises RateLimited (429, Retry-After: when the oldest entry leaves the window) for a key over
    its rpm, or whose tokens of the last minute reached its tpm; ``charge`` adds a finished request's tokens."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._windows: dict[str, _Window] = {}

    def admit(self, who: Principal) -> None:
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
        if who.tpm is not None and w.token_sum >= who.tpm:
            raise RateLimited(
                f"Key `{who.name}` is over its limit of {who.tpm} tokens per minute; retry later.",
                retry_after=max(1.0, w.tokens[0][0] + WINDOW_S - now),
            )
        w.requests.append(now)

    def charge(self, who: Principal, tokens: int) -> None:
        if who.tpm is None or tokens <= 0:
            return
        w = self._windows.setdefault(who.name, _Window())
        w.tokens.append((self._clock(), tokens))
        w.token_sum += tokens
