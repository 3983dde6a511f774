"""Stop strings for streamed text, shared by the batching backends."""

from __future__ import annotations

from collections.abc import Sequence


class StopMatcher:
    """Holds back text that may be the start of a stop string; reports a full match."""

    def __init__(self, stops: Sequence[str]) -> None:
        self.stops = [s for s in stops if s]
        self.pending = ""
        #: The stop string that matched (the earliest in the text), None until one does.
        self.matched: str | None = None

    def feed(self, text: str) -> tuple[str, bool]:
        """Add text; return (text safe to emit now, whether a stop string matched)."""
        if not self.stops:
            return text, False
        self.pending += text
        first = -1
        for stop in self.stops:
            idx = self.pending.find(stop)
            if idx != -1 and (first == -1 or idx < first):
                first, self.matched = idx, stop
        if first != -1:
            out = self.pending[:first]
            self.pending = ""
            return out, True
        hold = 0
        for stop in self.stops:
            for n in range(min(len(stop) - 1, len(self.pending)), 0, -1):
                if self.pending.endswith(stop[:n]):
                    hold = max(hold, n)
                    break
        cut = len(self.pending) - hold
        out, self.pending = self.pending[:cut], self.pending[cut:]
        return out, False

    def flush(self) -> str:
        out, self.pending = self.pending, ""
        return out
