"""How many threads llama.cpp decodes with, chosen by measuring, not by counting cores.

llama.cpp splits every decode step over `n_threads` threads that meet at a barrier
after each operation, hundreds of times per token. On a quiet machine one thread per
physical core is fastest. When other programs keep the cores busy (a laptop with a
browser and a build running), a descheduled thread holds every other one at the
barrier, and decoding can fall from 60 to 2 tokens/s; fewer threads than cores then
decode 15 times faster. Neither count is right on every machine at every moment.

`ThreadGovernor` watches the wall time of decode steps and picks between all cores
and fewer: it switches at once when three steps in a row take several times their
usual time, and otherwise tries the other count for a few steps now and then (less
and less often while the choice keeps being confirmed), keeping whichever is faster.
"Faster" is the mean step time, not the median: on contended cores most steps on all
threads take as long as on fewer, and one in four or five takes many times longer
(a thread descheduled at a barrier); the median hides exactly those steps, which are
where the time goes.
Pure logic with no llama.cpp import, so it is tested with made-up timings.
"""

from __future__ import annotations

import statistics
import time
from collections import deque
from collections.abc import Callable, Iterable

#: Consecutive steps this many times slower than usual mean the machine is contended.
COLLAPSE_FACTOR = 4.0
COLLAPSE_STEPS = 3
#: Steps timed with the other thread count during a probe.
PROBE_STEPS = 6
#: Steps at the current count that a probe is compared with: more than a probe has, so
#: that one stray slow step (a page fault, a busy event loop) does not decide alone.
RECENT_STEPS = 24
#: Seconds between probes: doubled each time the current choice is confirmed.
PROBE_MIN_INTERVAL = 2.0
PROBE_MAX_INTERVAL = 60.0
#: The probed count must take at most this share of the current count's step time to
#: be kept: fewer threads must be clearly faster (on a quiet machine their steps are
#: 30-40 % longer, and a busy event loop makes step times noisy), all cores a bit faster.
FEWER_MARGIN = 0.7
MORE_MARGIN = 0.9


def _bucket(n_tokens: int) -> int:
    """Steps of similar size share a baseline (1, 2, 3-4, 5-8, 9-16, ... tokens)."""
    return max(0, n_tokens - 1).bit_length()


class ThreadGovernor:
    """Chooses the thread count for the next decode step from the last steps' times."""

    def __init__(self, n_threads: int, *, clock: Callable[[], float] = time.monotonic) -> None:
        self.choices = sorted({n_threads, max(1, n_threads // 2)}, reverse=True)
        self.current = self.choices[0]
        self._clock = clock
        #: (threads, bucket) -> usual seconds per step (an EWMA of unremarkable steps).
        self._usual: dict[tuple[int, int], float] = {}
        #: The last steps at the current count, slow ones included: (bucket, seconds).
        self._recent: deque[tuple[int, float]] = deque(maxlen=RECENT_STEPS)
        self._slow = 0
        self._probe: list[tuple[int, float]] | None = None  # steps of the probe in progress
        self._probe_from = self.current
        self._interval = PROBE_MIN_INTERVAL
        self._next_probe = clock() + PROBE_MIN_INTERVAL
        #: How often the governor changed its mind (for tests and logs).
        self.switches = 0

    @property
    def enabled(self) -> bool:
        return len(self.choices) > 1

    def observe(self, n_tokens: int, seconds: float) -> int:
        """Record a decode-only step of `n_tokens` tokens; returns the count for the next one."""
        if not self.enabled:
            return self.current
        bucket = _bucket(n_tokens)
        if self._probe is not None:
            self._probe.append((bucket, seconds))
            before = self._median(self._recent, bucket)
            if before is not None and seconds > COLLAPSE_FACTOR * before:
                self._end_probe()  # the probed count is far worse: stop paying for it
            elif len(self._probe) >= PROBE_STEPS:
                self._end_probe()
            return self.current
        self._recent.append((bucket, seconds))
        key = (self.current, bucket)
        usual = self._usual.get(key)
        if usual is not None and seconds > COLLAPSE_FACTOR * usual:
            self._slow += 1
            if self._slow >= COLLAPSE_STEPS:
                # Contended: try the other count right away, and probe often for a while.
                self._slow = 0
                self._interval = PROBE_MIN_INTERVAL
                self._start_probe()
            return self.current
        self._slow = 0
        self._usual[key] = seconds if usual is None else 0.8 * usual + 0.2 * seconds
        if self._clock() >= self._next_probe:
            self._start_probe()
        return self.current

    @staticmethod
    def _median(steps: Iterable[tuple[int, float]], bucket: int) -> float | None:
        steps = list(steps)
        same = [s for b, s in steps if b == bucket] or [s for _, s in steps]
        return statistics.median(same) if same else None

    def _start_probe(self) -> None:
        self._probe_from = self.current
        self._probe = []
        self.current = next(c for c in self.choices if c != self.current)

    @staticmethod
    def _mean(steps: Iterable[tuple[int, float]], bucket: int) -> float | None:
        steps = list(steps)
        same = [s for b, s in steps if b == bucket] or [s for _, s in steps]
        return statistics.fmean(same) if same else None

    def _end_probe(self) -> None:
        probe, self._probe = self._probe or [], None
        bucket = probe[-1][0] if probe else 0
        # Throughput decides: the mean step, slow ones included (see the module's docstring).
        probed = self._mean(probe, bucket)
        before = self._mean(self._recent, bucket)
        margin = MORE_MARGIN if self.current > self._probe_from else FEWER_MARGIN
        if probed is not None and before is not None and probed < margin * before:
            self.switches += 1  # the probed count is faster now: keep it
            self._recent = deque(probe, maxlen=RECENT_STEPS)
            self._interval = PROBE_MIN_INTERVAL
        else:
            self.current = self._probe_from
            self._interval = min(PROBE_MAX_INTERVAL, self._interval * 2)
        self._next_probe = self._clock() + self._interval
