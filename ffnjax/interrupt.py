"""Ctrl-C and SIGTERM: acted on within seconds, never in the middle of a state update.

Every command runs under `handling()` (`experiments._cli.run`): SIGINT and
SIGTERM then raise `Interrupted` in the main thread at once, except inside a
`deferred()` block (an update of resumable state that must not be cut in half:
a committed object, a state save), where the signal waits for the block's end.
Worker threads (Dask's 'threads' scheduler, an in-process LocalCluster) see the
signal at their next `check()`.

Python runs a signal handler only between bytecodes of the main thread, so a
long device call delays it: the flood fill therefore runs in bounded chunks
of FOV steps (`ffnjax.segmentation`), and compiling (seconds to a minute, once
per shape) is the one wait left. A second signal of the same kind while the
first waits acts at once.

A loop that must stop at a safe point of its own, and on several hosts at the
same step (training), runs under `flagging()` instead and polls `flagged()`.

Whoever saves state on the way out (segment's state file, train's checkpoint)
attaches the one line that says how to resume (`with_resume`);
`experiments._cli.run` prints "interrupted by SIGINT: <that line>" and exits
with 128 + the signal number.
"""

from __future__ import annotations

import contextlib
import signal
import threading
from typing import Any, Iterator

SIGNALS = (signal.SIGINT, signal.SIGTERM)


class Interrupted(KeyboardInterrupt):
    """A run stopped by a signal.

    Attributes:
      signum: the signal; name: 'SIGINT' / 'SIGTERM'; exit_code: 128 + signum.
      resume: one line saying what was saved and how to resume ('' if nothing).
      result: what the interrupted call had to return so far (e.g. training
        metrics), or None.
    """

    def __init__(self, signum: int = signal.SIGINT, resume: str = "", result: Any = None):
        super().__init__(signal.Signals(signum).name)
        self.signum, self.resume, self.result = int(signum), resume, result

    @property
    def name(self) -> str:
        return signal.Signals(self.signum).name

    @property
    def exit_code(self) -> int:
        return 128 + self.signum


class _State(threading.local):
    def __init__(self):
        self.deferring = 0    # depth of deferred() blocks in this thread
        self.raised = set()   # signals already raised in this thread


_pending: list[int] = []   # signals received under handling()
_local = _State()


def _handler(signum, frame):  # noqa: ARG001  (signal handler signature)
    if _local.deferring and signum not in _pending:
        _pending.append(signum)  # raised when the deferred block ends
        return
    _pending.append(signum)
    _local.raised.add(signum)
    raise Interrupted(signum)


def pending() -> int | None:
    """The first signal received under `handling()`, or None."""
    return _pending[0] if _pending else None


def check() -> None:
    """Raises `Interrupted` when a signal arrived that this thread has not
    raised yet (not inside `deferred()`). Cheap: call it between chunks of
    long work, in any thread."""
    if _local.deferring:
        return
    for signum in _pending:
        if signum not in _local.raised:
            _local.raised.add(signum)
            raise Interrupted(signum)


@contextlib.contextmanager
def deferred() -> Iterator[None]:
    """A block that a signal may not cut: one arriving inside raises at its end."""
    _local.deferring += 1
    try:
        yield
    finally:
        _local.deferring -= 1
    check()


@contextlib.contextmanager
def _installed(handler, signals, forget) -> Iterator[None]:
    """`handler` for `signals` while the block runs (main thread only; elsewhere a
    no-op); afterwards the previous handlers come back and `forget()` runs."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    old = {s: signal.signal(s, handler) for s in signals}
    try:
        yield
    finally:
        for s, h in old.items():
            signal.signal(s, h)
        forget()


def _forget_pending() -> None:
    _pending.clear()
    _local.raised.clear()


def handling(signals=SIGNALS) -> contextlib.AbstractContextManager[None]:
    """SIGINT / SIGTERM raise `Interrupted` while the block runs (main thread
    only; elsewhere a no-op). The previous handlers come back afterwards."""
    return _installed(_handler, signals, _forget_pending)


_flagged: list[int] = []   # signals received under flagging()


def _flag_handler(signum, frame):  # noqa: ARG001  (signal handler signature)
    if signum in _flagged:  # a second signal of a kind acts at once
        raise Interrupted(signum)
    _flagged.append(signum)


def flagged() -> int | None:
    """The first signal received under `flagging()`, or None."""
    return _flagged[0] if _flagged else None


def flagging(signals=SIGNALS) -> contextlib.AbstractContextManager[None]:
    """SIGINT / SIGTERM only mark `flagged()` while the block runs, for a loop that
    must reach a safe point (and, on several hosts, agree) before it stops; a
    second signal of the same kind raises `Interrupted` at once. Main thread
    only (elsewhere a no-op); the previous handlers come back afterwards, and
    the flags are cleared. Worker threads' `check()` does not see these signals."""
    return _installed(_flag_handler, signals, _flagged.clear)


def with_resume(e: KeyboardInterrupt, resume: str) -> Interrupted:
    """`e` as an Interrupted carrying `resume` (raise the result)."""
    out = e if isinstance(e, Interrupted) else Interrupted(signal.SIGINT)
    out.resume = resume
    return out
