"""idp.bridge: synchronous code on the event loop with its I/O awaited (the token endpoint's path)."""

import asyncio
import contextvars
import gc
import threading
import weakref

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


def test_each_call_sees_only_its_own_requests_context_though_greenlets_are_reused():
    def sync_handler(mine):
        seen = request_id.get()
        request_id.set(mine)  # in this request's context, not the next one's
        bridge.wait(_later(None, 0))
        return seen

    async def one_request(mine):
        return await bridge.run(sync_handler, mine)

    async def main():
        first = await asyncio.create_task(one_request("a"))
        second = await asyncio.create_task(one_request("b"))
        many = await asyncio.gather(*(one_request(str(i)) for i in range(200)))  # more at once than are kept idle
        return first, second, set(many)

    assert asyncio.run(main()) == ("-", "-", {"-"})


def test_an_error_or_a_cancellation_ends_only_its_own_call():
    def raises():
        raise ValueError("bad input")

    def waits_long():
        bridge.wait(asyncio.sleep(10))

    async def main():
        with pytest.raises(ValueError, match="bad input"):
            await bridge.run(raises)
        task = asyncio.create_task(bridge.run(waits_long))
        await asyncio.sleep(0.01)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        return await bridge.run(lambda: bridge.wait(_later("still works")))

    assert asyncio.run(main()) == "still works"


def test_what_a_finished_thread_ran_is_freed_with_it():
    """Each TestClient request (and each anyio portal) runs its own loop in its own thread:
    the greenlets kept for reuse there must not keep that thread's objects (an app, its
    database connections) alive once it has ended."""
    class App:
        def handle(self):
            return bridge.wait(_later("ok", 0))

    app = App()
    alive = weakref.ref(app)
    results = []
    # Given as args, which the thread drops when it ends: the test's ``del`` is then the last reference.
    thread = threading.Thread(target=lambda handle: results.append(asyncio.run(bridge.run(handle))),
                              args=(app.handle,))
    thread.start()
    thread.join()
    del app, thread
    gc.collect()
    assert results == ["ok"]
    assert alive() is None


def test_no_handler_calls_the_store_or_the_audit_log_without_awaiting():
    """A blocking Redis or database call in an async handler or factor step stalls every
    request of the process for its round trip. They hand such calls to ``bridge.run`` or
    ``svc.db.call`` (whatever a synchronous function so handed calls is fine); one written
    directly is found here, not under load. Adding a write to the caller's ``Batch`` (a
    last argument ``writes``, ``earlier`` or ``batch``), and making a record, is no I/O."""
    import ast
    from pathlib import Path

    import idp

    blocking = ("svc.store.", "svc.sessions.", "svc.transactions.", "svc.lockout.", "svc.audit.", "svc.db.rows",
                "svc.db.write", "svc.db.scalar", "svc.db.session", "captcha.new_form", "captcha.check_form",
                "captcha.form_answer", "self.status", "self.drop", "Enrolment(", "enrolment.")
    # Functions of the factors' modules that read or write the store themselves.
    stores = {"start_registration", "current_registration", "cancel_registration", "issue_challenge",
              "take_challenge", "registration_options", "par.pull", "par.push"}
    no_io = {"svc.transactions.create", "svc.sessions.create", "svc.transactions.claim", "svc.store.aclose",
             "svc.sessions.cookie", "svc.sessions.sid_of", "svc.sessions.renew"}

    def blocks(call) -> bool:
        name = ast.unparse(call.func)
        batched = len(call.args) > 1 and ast.unparse(call.args[-1]) in ("writes", "earlier", "batch")
        named = name.startswith(blocking) or name in stores or name.rsplit(".", 1)[-1] in stores
        return named and name not in no_io and not batched

    def calls(node):
        """The calls made by ``node`` itself, not by the functions it defines."""
        for child in ast.iter_child_nodes(node):
            if not isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
                if isinstance(child, ast.Call):
                    yield child
                yield from calls(child)

    found = []
    root = Path(idp.__file__).parent
    for path in sorted(list((root / "web").glob("*.py")) + list((root / "factors").glob("*.py"))):
        for handler in ast.walk(ast.parse(path.read_text())):
            if isinstance(handler, ast.AsyncFunctionDef):
                found += [f"{path.parent.name}/{path.name}:{call.lineno} {handler.name}: {ast.unparse(call.func)}"
                          for call in calls(handler) if blocks(call)]
    assert not found
