"""The model manager's fair queue (FIFO, positions, cancelled waiters) and its swap
(the old model finishes its in-flight generation; newcomers get the new one)."""

from __future__ import annotations

import asyncio
import threading
from pathlib import Path

import pytest

from llmws_core import errors
from llmws_core.config import Settings
from llmws_core.engine.manager import FairQueue
from llmws_core.engine.scan import ModelEntry
from tests.scripted import ScriptedBackend, scripted_manager


async def test_fair_queue_admits_in_order_and_reports_positions() -> None:
    """Waiters get the slot first come, first served, and hear their position move up."""
    queue = FairQueue(slots=1)
    await queue.acquire()
    order: list[str] = []
    positions: dict[str, list[int]] = {"b": [], "c": []}

    async def user(name: str) -> None:
        await queue.acquire(positions[name].append)
        order.append(name)
        queue.release()

    b = asyncio.create_task(user("b"))
    await asyncio.sleep(0)
    c = asyncio.create_task(user("c"))
    await asyncio.sleep(0)
    assert queue.depth == 2 and positions == {"b": [1], "c": [2]}
    queue.release()
    await asyncio.gather(b, c)
    assert order == ["b", "c"] and positions["c"] == [2, 1]
    assert queue.running == 0 and queue.depth == 0


async def test_a_cancelled_waiter_leaves_the_queue_and_others_move_up() -> None:
    """A waiter that gives up is removed; the one behind it is told it moved up."""
    queue = FairQueue(slots=1)
    await queue.acquire()
    positions: list[int] = []
    first = asyncio.create_task(queue.acquire())
    await asyncio.sleep(0)
    second = asyncio.create_task(queue.acquire(positions.append))
    await asyncio.sleep(0)
    first.cancel()
    with pytest.raises(asyncio.CancelledError):
        await first
    assert queue.depth == 1 and positions == [2, 1]
    queue.release()
    await second
    assert queue.running == 1


async def test_a_full_queue_refuses_with_busy() -> None:
    """Past max_waiting, a new request is refused with busy instead of waiting without bound."""
    queue = FairQueue(slots=1, max_waiting=1)
    await queue.acquire()
    waiter = asyncio.create_task(queue.acquire())
    await asyncio.sleep(0)
    with pytest.raises(errors.Busy):
        await queue.acquire()
    waiter.cancel()
    with pytest.raises(asyncio.CancelledError):
        await waiter


async def test_a_swap_waits_for_the_running_generation(tmp_path: Path) -> None:
    """A switch loads the new model while the old one finishes its reply, then swaps."""
    settings = Settings.model_validate(
        {"paths": {"var_dir": str(tmp_path / "var"), "models_dir": str(tmp_path / "models")}}
    )
    gate = threading.Event()
    old = ScriptedBackend(["a", "b"], gate=gate)
    manager = await scripted_manager(settings, old, settings.models_dir)
    new = ScriptedBackend(["new"])
    manager.factories["scripted"] = lambda entry, s: new

    async def generate() -> str:
        out: list[str] = []
        async with manager.use() as backend:
            await asyncio.to_thread(backend.generate, [], _params(), out.append, lambda: False)
        return "".join(out)

    running = asyncio.create_task(generate())
    await asyncio.sleep(0.05)
    path = settings.models_dir / "other.gguf"
    path.write_bytes(b"GGUF")
    switch = asyncio.create_task(
        manager.load(ModelEntry("other", path, "models/other.gguf", "gguf", "scripted", 0.0, "models"))
    )
    await asyncio.sleep(0.1)
    assert manager.backend is old and not switch.done()  # still serving the reply in flight
    gate.set()
    assert await running == "ab"
    await asyncio.wait_for(switch, 5)
    assert manager.backend is new and manager.entry is not None and manager.entry.name == "other"
    assert await generate() == "new"


def _params():  # type: ignore[no-untyped-def]
    from llmws_core.engine.backends.base import GenerationParams

    return GenerationParams(max_new_tokens=8)
