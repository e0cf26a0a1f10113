"""broker.cpu_batch.TurnBatch: the calls queued in one event-loop turn run together, each exactly once,
with its own result or exception; a cancelled caller's call is skipped; each loop has its own queue."""

from __future__ import annotations

import asyncio
import threading
from typing import Any

import pytest

from broker.cpu_batch import TurnBatch


def test_calls_of_one_turn_run_in_one_callback_in_order() -> None:
    calls: list[tuple[str, Any]] = []

    def work(n: int) -> int:
        calls.append(("call", n))
        return n * n

    async def main() -> list[int]:
        batch = TurnBatch()
        futures = [batch.run(work, n) for n in range(5)]
        assert calls == []  # queued, not run
        asyncio.get_running_loop().call_soon(calls.append, ("next turn", None))
        results = list(await asyncio.gather(*futures))
        return results

    assert asyncio.run(main()) == [0, 1, 4, 9, 16]
    # All five ran before a callback scheduled after them: one drain, in the order queued.
    assert calls == [("call", n) for n in range(5)] + [("next turn", None)]


def test_tasks_that_reach_the_step_in_one_turn_share_a_batch() -> None:
    batches: list[int] = []
    running: list[int] = []

    def work(n: int) -> int:
        running.append(n)
        return n

    async def caller(batch: TurnBatch, n: int) -> int:
        return await batch.run(work, n)

    async def main() -> None:
        batch = TurnBatch()
        original = batch._drain

        def counting_drain(loop: asyncio.AbstractEventLoop) -> None:
            batches.append(len(batch._queues.get(loop, [])))
            original(loop)

        batch._drain = counting_drain  # type: ignore[method-assign]
        assert await asyncio.gather(*(caller(batch, n) for n in range(8))) == list(range(8))
        assert await caller(batch, 8) == 8

    asyncio.run(main())
    assert batches == [8, 1]
    assert running == list(range(9))


def test_each_caller_gets_its_own_exception_and_the_others_their_results() -> None:
    def work(n: int) -> int:
        if n % 2:
            raise ValueError(f"odd {n}")
        return n

    async def main() -> list[Any]:
        batch = TurnBatch()
        return await asyncio.gather(*(batch.run(work, n) for n in range(4)), return_exceptions=True)

    results = asyncio.run(main())
    assert results[0] == 0 and results[2] == 2
    assert isinstance(results[1], ValueError) and str(results[1]) == "odd 1"
    assert isinstance(results[3], ValueError) and str(results[3]) == "odd 3"


def test_a_cancelled_callers_call_is_skipped() -> None:
    ran: list[int] = []

    async def main() -> None:
        batch = TurnBatch()
        first = batch.run(ran.append, 1)
        second = batch.run(ran.append, 2)
        first.cancel()
        await second
        assert first.cancelled()

    asyncio.run(main())
    assert ran == [2]


def test_a_base_exception_leaves_the_loop_and_the_rest_still_run() -> None:
    ran: list[int] = []

    def work(n: int) -> int:
        if n == 1:
            raise KeyboardInterrupt
        ran.append(n)
        return n

    loop = asyncio.new_event_loop()
    try:
        batch = TurnBatch()
        futures: list[asyncio.Future[int]] = []

        async def queue() -> None:
            futures.extend(batch.run(work, n) for n in range(3))
            await asyncio.sleep(0)  # the drain runs in this turn

        with pytest.raises(KeyboardInterrupt):
            loop.run_until_complete(queue())
        assert futures[0].result() == 0
        assert futures[1].cancelled()
        assert loop.run_until_complete(futures[2]) == 2
    finally:
        loop.close()
    assert ran == [0, 2]


def test_each_loop_has_its_own_queue() -> None:
    batch = TurnBatch()
    threads_seen: dict[str, set[int]] = {}
    barrier = threading.Barrier(2)

    def work(name: str) -> int:
        threads_seen.setdefault(name, set()).add(threading.get_ident())
        return threading.get_ident()

    def in_thread(name: str, out: list[int]) -> None:
        async def main() -> list[int]:
            barrier.wait()
            return list(await asyncio.gather(*(batch.run(work, name) for _ in range(20))))

        out.extend(asyncio.run(main()))

    outs: dict[str, list[int]] = {"a": [], "b": []}
    threads = [threading.Thread(target=in_thread, args=(name, outs[name])) for name in outs]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    # Every call ran on its own caller's loop thread.
    for name, thread in zip(outs, threads, strict=True):
        assert outs[name] == [thread.ident] * 20
        assert threads_seen[name] == {thread.ident}
    assert batch._queues == {}
