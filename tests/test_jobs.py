"""The job queue: FIFO order, positions, a failing job does not stop the worker, cancel and interrupt."""

from __future__ import annotations

import threading
import time

import pytest

from ldm_core.jobs import JobQueue, QueueFull


def test_fifo_and_positions():
    q = JobQueue()
    gate = threading.Event()
    order = []

    def slow(ctx):
        gate.wait(5)
        order.append("a")

    a = q.submit(slow)
    b = q.submit(lambda ctx: order.append("b"))
    c = q.submit(lambda ctx: order.append("c"))
    for _ in range(200):
        if q.position(a) == 0:
            break
        time.sleep(0.01)
    assert (q.position(a), q.position(b), q.position(c)) == (0, 1, 2)
    gate.set()
    assert c.wait(5)
    assert order == ["a", "b", "c"]
    assert q.position(a) == -1
    q.shutdown()


def test_failed_job_reports_and_worker_keeps_serving():
    q = JobQueue()

    def boom(ctx):
        raise RuntimeError("kaboom")

    bad = q.submit(boom)
    good = q.submit(lambda ctx: 42)
    assert good.wait(5)
    assert bad.state == "failed" and "kaboom" in str(bad.error)
    assert good.state == "done" and good.result == 42
    q.shutdown()


def test_cancel_queued_and_interrupt_running():
    q = JobQueue()
    started = threading.Event()

    def loop(ctx):
        started.set()
        for _ in range(500):
            if ctx.cancel.interrupted:
                return "stopped"
            time.sleep(0.01)
        return "ran out"

    running = q.submit(loop)
    queued = q.submit(lambda ctx: "never")
    assert started.wait(5)
    assert q.cancel(queued.id)
    assert queued.state == "cancelled"
    assert q.cancel(running.id)
    assert running.wait(5) and running.result == "stopped"
    assert not q.cancel(running.id)  # already finished
    q.shutdown()


def test_bounded_queue():
    q = JobQueue(max_queued=1)
    gate = threading.Event()
    q.submit(lambda ctx: gate.wait(5))
    time.sleep(0.05)  # the first one is running, so the queue itself is empty
    q.submit(lambda ctx: None)
    with pytest.raises(QueueFull):
        q.submit(lambda ctx: None)
    gate.set()
    q.shutdown()


def test_call_reraises():
    q = JobQueue()
    with pytest.raises(ValueError):
        q.call(lambda ctx: (_ for _ in ()).throw(ValueError("bad")))
    q.shutdown()
