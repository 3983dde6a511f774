"""The chat service's hand-off of tokens from worker threads to the event loop."""

from __future__ import annotations

import asyncio
import threading

from llmws_core.chat import Handoff


async def test_handoff_delivers_everything_in_order_with_few_wakeups() -> None:
    """Items put from worker threads arrive complete and in order, one loop wake-up per burst."""
    loop = asyncio.get_running_loop()
    handoff = Handoff(loop)
    queues: list[asyncio.Queue[int]] = [asyncio.Queue() for _ in range(4)]
    wakeups = 0
    deliver = handoff._deliver

    def counted() -> None:
        nonlocal wakeups
        wakeups += 1
        deliver()

    handoff._deliver = counted  # type: ignore[method-assign]

    def producer() -> None:
        for step in range(200):  # a decode step emits one token per running stream
            for q in queues:
                handoff.put(q, step)

    t = threading.Thread(target=producer)
    t.start()
    await asyncio.to_thread(t.join)
    await asyncio.sleep(0.05)
    for q in queues:
        got = [q.get_nowait() for _ in range(q.qsize())]
        assert got == list(range(200))
    assert wakeups < 200 * len(queues)
