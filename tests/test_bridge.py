"""idp.bridge: synchronous code on the event loop with its I/O awaited (the token endpoint's path)."""

import asyncio
import contextvars

import pytest

from idp import bridge

request_id = contextvars.ContextVar("request_id", default="-")


async def _later(value, seconds=0.01):
    await asyncio.sleep(seconds)
    return value


async def _fails():
    await asyncio.sleep(0)
    raise ConnectionError("store down")


def test_waits_are_awaited_on_the_loop_while_other_tasks_run():
    order = []

    def sync_handler(name):
        order.append(f"{name} start")
        value = bridge.wait(_later(name))
        order.append(f"{name} end")
        return value, bridge.inside()

    async def main():
        return await asyncio.gather(bridge.run(sync_handler, "a"), bridge.run(sync_handler, "b"))

    assert asyncio.run(main()) == [("a", True), ("b", True)]
    assert order[:2] == ["a start", "b start"]  # b ran while a waited
    assert not bridge.inside()


def test_an_awaitables_error_is_raised_where_the_sync_code_waited():
    def sync_handler():
        try:
            bridge.wait(_fails())
        except ConnectionError as e:
            return f"handled: {e}"

    def unhandled():
        bridge.wait(_fails())

    assert asyncio.run(bridge.run(sync_handler)) == "handled: store down"
    with pytest.raises(ConnectionError):
        asyncio.run(bridge.run(unhandled))


def test_the_sync_code_sees_the_callers_context_variables():
    def sync_handler():
        bridge.wait(_later(None))
        return request_id.get()

    async def main():
        request_id.set("req-42")
        return await bridge.run(sync_handler)

    assert asyncio.run(main()) == "req-42"
