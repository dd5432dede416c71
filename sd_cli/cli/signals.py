"""Ctrl-C and SIGTERM for the command line: at any moment they mean "stop, keep what is finished".

`handled` makes SIGINT raise KeyboardInterrupt and SIGTERM raise `Terminated` (its subclass), and
remembers that one came: a signal that lands inside a library (the safetensors reader, `import torch`)
can surface as some other exception, and the CLI must still report "interrupted", never a misleading
error about the file it was reading. `stopped_by` tells which signal came, if any. Standard library only,
so it is in place before anything heavy is imported.
"""

from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import Iterator

from sd_cli.errors import Terminated

EXIT_CODES = {signal.SIGINT: 130, signal.SIGTERM: 143}  # 128 + the signal number, as shells report it
_received: list[int] = []


def _on_signal(signum: int, frame) -> None:
    _received.append(signum)
    raise Terminated() if signum == signal.SIGTERM else KeyboardInterrupt()


@contextlib.contextmanager
def handled() -> Iterator[None]:
    """Our handlers for SIGINT and SIGTERM inside, the previous ones restored after. A signal ignored by
    whoever started us (`cmd &` ignores SIGINT) stays ignored."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    _received.clear()
    previous = {}
    for s in (signal.SIGINT, signal.SIGTERM):
        if signal.getsignal(s) is not signal.SIG_IGN:
            previous[s] = signal.signal(s, _on_signal)
    try:
        yield
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler if handler is not None else signal.SIG_DFL)


def stopped_by(err: BaseException | None = None) -> int | None:
    """The signal that stopped the run: from `err` (KeyboardInterrupt/Terminated) or one received."""
    if isinstance(err, Terminated):
        return signal.SIGTERM
    if _received:
        return _received[0]
    if isinstance(err, KeyboardInterrupt):
        return signal.SIGINT
    return None


@contextlib.contextmanager
def ignored() -> Iterator[None]:
    """Both signals ignored inside (the summary after a first Ctrl-C must not be cut short)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {s: signal.signal(s, signal.SIG_IGN) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler if handler is not None else signal.SIG_DFL)
