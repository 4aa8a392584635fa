"""The thread bridge of the IEC 104 driver: the send thread and the loop inbox."""

from __future__ import annotations

import asyncio
import threading
import time

import pytest

from drivers.iec104.bridge import LoopInbox, SendThread


async def test_calls_run_in_order_off_the_loop_and_settle_on_it():
    sender = SendThread(name="test-send")
    loop_thread = threading.get_ident()
    ran_on: list[int] = []

    def call(n):
        ran_on.append(threading.get_ident())
        return n * 2

    def refuse():
        raise RuntimeError("c104 refused")

    futures = [sender.submit(call, n) for n in range(20)]
    failing = sender.submit(refuse)
    assert await asyncio.gather(*futures) == [n * 2 for n in range(20)]
    with pytest.raises(RuntimeError, match="c104 refused"):
        await failing
    assert len(set(ran_on)) == 1 and loop_thread not in ran_on


async def test_a_stuck_call_does_not_hold_up_the_next():
    sender = SendThread(name="test-send", stuck_after_s=0.05)
    release = threading.Event()
    stuck = sender.submit(release.wait, 5)
    await asyncio.sleep(0.15)
    started = time.monotonic()
    assert await asyncio.wait_for(sender.submit(lambda: "sent"), 1) == "sent"
    assert time.monotonic() - started < 0.5
    assert sender.replaced == 1 and not stuck.done()
    release.set()
    assert await asyncio.wait_for(stuck, 1) is True  # the stuck call still reports when it ends


async def test_inbox_runs_every_post_in_order_with_few_wake_ups():
    loop = asyncio.get_running_loop()
    inbox = LoopInbox.of(loop)
    assert LoopInbox.of(loop) is inbox
    received: dict[int, list[int]] = {n: [] for n in range(8)}
    drains = 0
    original_drain = inbox._drain

    def counting_drain():
        nonlocal drains
        drains += 1
        original_drain()

    inbox._drain = counting_drain

    def producer(n):
        for i in range(200):
            inbox.post(lambda n=n, i=i: (received[n].append(i), threading.get_ident() == loop_thread))

    loop_thread = threading.get_ident()
    threads = [threading.Thread(target=producer, args=(n,)) for n in range(8)]
    for thread in threads:
        thread.start()
    await asyncio.to_thread(lambda: [thread.join() for thread in threads])
    deadline = time.monotonic() + 2
    while sum(map(len, received.values())) < 1600:
        assert time.monotonic() < deadline
        await asyncio.sleep(0.01)
    assert all(items == list(range(200)) for items in received.values())
    assert drains < 1600
