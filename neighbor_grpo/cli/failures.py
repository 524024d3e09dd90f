"""How the `ngrpo` command ends on a failure: one line `ngrpo CMD: error: ...` and an exit status (see
docs/robustness.md, "Errors on the command line")."""

from __future__ import annotations

import signal
import sys
import threading


def one_line(error: BaseException) -> tuple[int, str]:
    """(exit status, message) of a failure: expected ones say what was wrong and where; exit 2 for bad input,
    1 for a failure of the run or the machine."""
    import errno

    text = " ".join(str(error).split()) or type(error).__name__
    if isinstance(error, OSError) and not isinstance(error, (FileNotFoundError, FileExistsError)) and error.strerror:
        where = f" {str(error.filename)!r}" if error.filename else ""
        hint = {errno.ENOSPC: " (the disk is full)", errno.EROFS: " (a read-only file system)",
                errno.EDQUOT: " (disk quota exceeded)"}.get(error.errno, "")
        return 1, f"cannot use{where}: {error.strerror}{hint}"
    if isinstance(error, (ValueError, TypeError, ImportError, FileNotFoundError, FileExistsError)):
        return 2, text
    if isinstance(error, (RuntimeError, ArithmeticError, OSError)):
        return (2 if type(error).__name__ in ("ConfigError", "OwnershipError", "RunFolderError") else 1), text
    if isinstance(error, MemoryError):
        return 1, "out of memory (lower the batch: prompts_per_iteration, group_size or speed.micro_batch)"
    return 1, f"unexpected {type(error).__name__}: {text} (a bug: rerun with --debug for the traceback and report it)"


def stdout_is_closed() -> bool:
    """Whether standard output is a pipe whose reader has gone (`ngrpo config | head`)."""
    import select

    try:
        poller = select.poll()
        poller.register(sys.stdout.fileno(), select.POLLOUT)
        return any(events & select.POLLERR for _, events in poller.poll(0))
    except (OSError, ValueError, AttributeError):
        return False


def report_failure(command: str, error: BaseException, debug: bool) -> int:
    if debug:
        import traceback

        traceback.print_exception(error)
    code, message = one_line(error)
    print(f"ngrpo {command}: error: {message}", file=sys.stderr)
    return code


class InterruptSeen:
    """Ctrl-C behaves as usual (KeyboardInterrupt) but is also remembered while the command runs."""

    def __init__(self):
        self.seen, self._previous = False, None

    def _handle(self, signum, frame) -> None:
        self.seen = True
        raise KeyboardInterrupt

    def __enter__(self) -> "InterruptSeen":
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGINT, self._handle)
        return self

    def __exit__(self, *exc) -> bool:
        if self._previous is not None:
            signal.signal(signal.SIGINT, self._previous)
        return False


def report_interrupt(command: str, debug: bool) -> int:
    if debug:
        import traceback

        traceback.print_exc()
    hint = " (a run continues from its latest checkpoint with `ngrpo train --resume RUN`)" if command == "train" else ""
    print(f"ngrpo {command}: interrupted{hint}".replace("ngrpo :", "ngrpo:"), file=sys.stderr)
    return 130
