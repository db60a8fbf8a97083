"""Synchronous code on the event loop, with its I/O awaited.

authlib's grants and the store interface are synchronous. Run in Starlette's
thread pool, each token request paid a thread hand-off and fought the event
loop for the GIL; run on the loop, each Redis round trip stalled every other
request. ``run`` gives the middle way (SQLAlchemy's asyncio layer does the
same): the synchronous function runs in a greenlet on the loop, and where it
would block it hands an awaitable to ``wait``, which suspends the greenlet
while the loop serves other requests, and resumes it with the result.

The greenlets are kept and reused, one function after another: on CPython
3.11 a new greenlet maps and unmaps a frame stack chunk of its own, about
10 µs, more than the rest of ``run`` together.

Code that may run either way asks ``inside()`` and blocks when it is not.
"""

from __future__ import annotations

import asyncio
import threading

import greenlet

_DONE = object()  # what a worker hands its parent when the function has returned or raised
_IDLE_MAX = 64  # workers kept per thread; more are only needed while that many calls wait at once
_idle = threading.local()  # greenlets cannot switch between threads: each thread keeps its own


class _Worker(greenlet.greenlet):
    """Runs one function per ``run``; ``wait`` inside it returns to the loop."""

    def __init__(self):
        super().__init__(_serve)
        self.outcome = None  # (value, raised) of the last function


def _serve(fn, args):
    # The worker is looked up, never held: no reference cycle keeps it (and, through its
    # parent, the thread that ran it) alive once its thread's idle list is dropped.
    while True:
        try:
            greenlet.getcurrent().outcome = (fn(*args), False)
        except BaseException as e:  # noqa: BLE001  (re-raised by run, in the caller)
            greenlet.getcurrent().outcome = (e, True)
        del fn, args  # nothing of this call outlives it while the worker is idle
        fn, args = greenlet.getcurrent().parent.switch(_DONE)


def _idle_workers() -> list:
    try:
        return _idle.workers
    except AttributeError:
        _idle.workers = []
        return _idle.workers


async def run(fn, *args):
    """``fn(*args)``, on the calling event loop; its ``wait`` calls are awaited here."""
    idle = _idle_workers()
    worker = idle.pop() if idle else _Worker()
    caller = greenlet.getcurrent()
    if worker.parent is not caller:
        worker.parent = caller
    worker.gr_context = caller.gr_context  # the request's context variables (its log id)
    step = worker.switch(fn, args)
    while step is not _DONE:
        try:
            value = await step
        except BaseException as e:  # noqa: BLE001  (handed back into fn, which decides)
            step = worker.throw(e)
        else:
            step = worker.switch(value)
    (value, raised), worker.outcome = worker.outcome, None
    worker.gr_context = None
    if len(idle) < _IDLE_MAX:
        idle.append(worker)
    if raised:
        raise value
    return value


def inside() -> bool:
    return isinstance(greenlet.getcurrent(), _Worker)


def wait(awaitable):
    """The awaitable's result; only inside ``run``."""
    return greenlet.getcurrent().parent.switch(awaitable)


class LoopLocal:
    """A value per event loop (its own connections: they serve only the loop that opened
    them), made on first use there. Those of loops that have closed since are dropped
    then, ``retire`` called on each: a process that runs a loop per task (a test client
    per request) keeps none of theirs open."""

    def __init__(self, make, retire=lambda value: None):
        self._make, self._retire = make, retire
        self._values: dict = {}  # event loop -> its value

    def get(self):
        loop = asyncio.get_running_loop()
        value = self._values.get(loop)
        if value is None:
            for old in [other for other in list(self._values) if other.is_closed()]:  # a copy: other threads add theirs
                if (gone := self._values.pop(old, None)) is not None:
                    self._retire(gone)
            value = self._values[loop] = self._make()
        return value

    def pop(self):
        """The running loop's value, forgotten (for its shutdown to close), or None."""
        return self._values.pop(asyncio.get_running_loop(), None)
