"""Synchronous code on the event loop, with its I/O awaited.

authlib's grants and the store interface are synchronous. Run in Starlette's
thread pool, each token request paid a thread hand-off and fought the event
loop for the GIL; run on the loop, each Redis round trip stalled every other
request. ``run`` gives the middle way (SQLAlchemy's asyncio layer does the
same): the synchronous function runs in a greenlet on the loop, and where it
would block it hands an awaitable to ``wait``, which suspends the greenlet
while the loop serves other requests, and resumes it with the result.

Code that may run either way asks ``inside()`` and blocks when it is not.
"""

from __future__ import annotations

import greenlet


class _Greenlet(greenlet.greenlet):
    """A greenlet started by ``run``: ``wait`` inside it returns to the loop."""


async def run(fn, *args):
    """``fn(*args)``, on the calling event loop; its ``wait`` calls are awaited here."""
    child = _Greenlet(fn, greenlet.getcurrent())
    child.gr_context = greenlet.getcurrent().gr_context  # the request's context variables (its log id)
    step = child.switch(*args)
    while not child.dead:
        try:
            value = await step
        except BaseException as e:  # noqa: BLE001  (handed back into fn, which decides)
            step = child.throw(e)
        else:
            step = child.switch(value)
    return step


def inside() -> bool:
    return isinstance(greenlet.getcurrent(), _Greenlet)


def wait(awaitable):
    """The awaitable's result; only inside ``run``."""
    return greenlet.getcurrent().parent.switch(awaitable)
