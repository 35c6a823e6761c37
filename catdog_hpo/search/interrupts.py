"""Ctrl-C and SIGTERM that never tear a write to the study store in half.

A signal that lands in the middle of an SQLAlchemy commit can leave the session unusable, and
then the running trial could not be closed. So the handler raises at once only inside code
marked ``allowed()`` (training, sleeping); anywhere else the signal waits, and ``check()`` (or
the end of the enclosing ``allowed()`` block's store writes, ``deferred()``) raises it at the
next safe point. ``deferred()`` blocks nest, and only the outermost raises at its end: a trial
holds the whole end of an epoch (its report to the pruner inside, then its checkpoint save) in
one, so a stop never lands between the two and loses the epoch. Plain Python without this
module installed behaves as usual.
"""

from __future__ import annotations

import contextlib
import signal
import threading
from typing import Any, Iterator


class Terminated(BaseException):
    """SIGTERM, raised like KeyboardInterrupt so the running trial is closed the same way. A
    BaseException like it, so no ``except Exception`` (a capture fallback, a cache reader)
    swallows a stop request and trains on."""


# held: how many ``deferred`` blocks are open (nested: an epoch's report inside its whole end)
_state: dict[str, Any] = {"allowed": False, "pending": None, "held": 0}


def _handler(signum: int, frame: Any) -> None:
    exc = KeyboardInterrupt() if signum == signal.SIGINT else Terminated()
    if _state["allowed"]:
        raise exc
    _state["pending"] = exc  # raised by check() at the next safe point


def install(allowed: bool = False) -> dict[int, Any]:
    """Route SIGINT and SIGTERM through the handler; returns the previous handlers (for
    ``restore``). Only the main thread may install signal handlers: elsewhere a no-op."""
    if threading.current_thread() is not threading.main_thread():
        return {}
    _state.update(allowed=allowed, pending=None)
    return {s: signal.signal(s, _handler) for s in (signal.SIGINT, signal.SIGTERM)}


def restore(previous: dict[int, Any]) -> None:
    for signum, handler in previous.items():
        signal.signal(signum, handler)
    _state.update(allowed=False, pending=None)


def ignore() -> None:
    """Ignore further signals: a trial is being closed after the first one."""
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)


def check() -> None:
    """Raise a signal that arrived while it had to wait."""
    exc = _state["pending"]
    if exc is not None:
        _state["pending"] = None
        raise exc


@contextlib.contextmanager
def allowed() -> Iterator[None]:
    """A signal interrupts this block at once (training, sleeping: nothing half-written)."""
    check()
    before = _state["allowed"]
    _state["allowed"] = True
    try:
        yield
    finally:
        _state["allowed"] = before


@contextlib.contextmanager
def deferred() -> Iterator[None]:
    """Store writes inside an ``allowed`` block: a signal waits until they are done, and is
    raised when the outermost ``deferred`` block ends. An inner one leaves it waiting: what
    encloses it is not done yet (an epoch's report ends before the epoch's checkpoint is saved,
    and raising there would lose the epoch). Left by an exception (a prune), nothing is raised
    here: the signal waits for the next ``check()``."""
    before = _state["allowed"]
    _state["allowed"] = False
    _state["held"] += 1
    try:
        yield
    finally:
        _state["allowed"] = before
        _state["held"] -= 1
    if _state["held"] == 0:
        check()
