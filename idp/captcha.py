"""The image captcha (``IDP_CAPTCHA``: always, after-failure, off, for the login form).

On the login form the answer lives in the login transaction, is replaced every
time the form is shown and is good for one try (``take``); other forms get a
captcha record of their own (``new_form``), good for one answer. Answers are
compared in constant time.

An image costs about 3.4 ms of CPU, asked for by anyone: drawn on the event loop, a flood
of them would stall every other request of the process. They are drawn on threads of
their own (``png``), ``RENDER_THREADS`` at once; up to ``QUEUED`` more wait their turn
without holding a request thread, and beyond those a flood is refused at once (``Busy``,
a 503) rather than queued without end."""

from __future__ import annotations

import asyncio
import hmac
import secrets
import threading
from concurrent.futures import ThreadPoolExecutor

from captcha.image import ImageCaptcha

from idp.factors import plain

RENDER_THREADS = 2
QUEUED = 64  # ~0.1 s of drawing: a user's image waits no longer than that in a flood
_renderers = ThreadPoolExecutor(RENDER_THREADS, thread_name_prefix="captcha")
_taken = 0  # images drawn or waiting, counted on the event loop (no lock needed)
_images = threading.local()  # an ImageCaptcha per thread: its fonts are not shared between threads
FORM_SECONDS = 900
DIGITS = "23456789"  # no 0/1: too easily read as O/l


def wanted(svc, tx) -> bool:
    mode = svc.settings.captcha
    return mode == "always" or (mode == "after-failure" and tx.get("failures", 0) > 0)


def new_answer() -> str:
    return "".join(secrets.choice(DIGITS) for _ in range(5))


def check(tx, answer) -> bool:
    """Read as every code is (``plain``): "２３４５６", typed in full width, is 23456."""
    expected = tx.get("captcha")
    return bool(expected and isinstance(answer, str) and hmac.compare_digest(expected.encode(), plain(answer).encode()))


def take(svc, tx, answer) -> bool:
    """The answer to a login form's image (``tx``'s), good for one try: right, and the first
    use of that image, claimed in the store, so neither a replayed POST nor several sent at
    once get more out of one solved image. The transaction forgets the image either way (its
    next page shows another)."""
    expected = tx.pop("captcha", None)
    if expected is None:
        return False
    # Claimed before it is compared, right or wrong: posts sent at once, each with the
    # transaction as it was before the others saved it, get one guess between them.
    ttl = max(1, int(tx["exp"] - svc.clock())) + 60
    return svc.store.set(f"captcha-used:{tx['id']}:{expected}", {}, ttl, only_new=True) and \
        check({"captcha": expected}, answer)


class Busy(Exception):
    """More images asked for than the captcha threads will draw soon."""


async def png(answer: str) -> bytes:
    """The image of ``answer``, drawn on a captcha thread; ``Busy`` in a flood."""
    global _taken
    if _taken >= RENDER_THREADS + QUEUED:
        raise Busy
    _taken += 1
    try:
        return await asyncio.get_running_loop().run_in_executor(_renderers, _draw, answer)
    finally:
        _taken -= 1


def _draw(answer: str) -> bytes:
    if not hasattr(_images, "image"):
        _images.image = ImageCaptcha(width=160, height=60)
    return _images.image.generate(answer).getvalue()


def new_form(svc) -> str:
    """A captcha for a form outside the login: returns the id its page carries."""
    form_id = secrets.token_urlsafe(24)
    svc.store.set("captcha:" + form_id, {"captcha": new_answer(), "exp": svc.clock() + FORM_SECONDS}, FORM_SECONDS + 60)
    return form_id


def form_answer(svc, form_id: str | None) -> str | None:
    record = svc.store.get("captcha:" + form_id) if form_id and len(form_id) < 64 else None
    return record["captcha"] if record and record["exp"] >= svc.clock() else None


def check_form(svc, form_id: str | None, answer) -> bool:
    """One answer per image: the record is taken whether the answer is right or not."""
    record = svc.store.take("captcha:" + form_id) if form_id and len(form_id) < 64 else None
    return bool(record and record["exp"] >= svc.clock() and check(record, answer))
