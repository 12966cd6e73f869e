"""Stopping on SIGINT or SIGTERM: inside `stop_on_signals()` either signal raises `Stopped`, which
unwinds like Ctrl-C does (workers stopped, temporary files removed) instead of dying mid-write.
`ditplan` then prints one line and exits 128 + the signal number."""
from __future__ import annotations

import contextlib
import signal
from typing import Any, Iterator

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


class Stopped(BaseException):
    """SIGINT or SIGTERM arrived. A BaseException, like KeyboardInterrupt, so that no `except
    Exception` reports it as a failure."""

    def __init__(self, signum: int) -> None:
        super().__init__(signum)
        self.signum = signum
        self.name = signal.Signals(signum).name


def _raise_stopped(signum: int, frame: Any) -> None:  # noqa: ARG001 - signal handler signature
    raise Stopped(signum)


@contextlib.contextmanager
def stop_on_signals() -> Iterator[None]:
    """SIGINT and SIGTERM raise Stopped while the block runs (main thread only)."""
    try:
        previous = {signum: signal.signal(signum, _raise_stopped) for signum in STOP_SIGNALS}
    except ValueError:  # not the main thread: leave signals alone
        yield
        return
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
