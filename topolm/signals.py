"""Stop signals: SIGTERM, SIGINT (Ctrl-C) and SIGUSR1 (SLURM sites' usual pre-emption warning) ask a
command to stop. No torch.

Two ways to honour them:
- `StopFlag` (train.py, finetune.py): the handler only sets `requested`; the loop reads it at every
  optimizer step and every evaluation batch (under DDP all-reduced, so every rank stops at the same
  place), saves the state of the last completed step and exits 0.
- `exit_on_stop` (analyze.py, blimp.py, ablate.py, sample.py): the handler raises `Stopped` wherever the
  command is; `topolm.config.cli_main` turns it into one line (`stopped by SIGTERM; nothing written`)
  and exit status 128 + the signal's number (130 for SIGINT, 143 for SIGTERM, 138 for SIGUSR1). Their
  outputs are written atomically or staged (topolm.files), so a stop leaves no part of them; `held`
  covers the short moment in which the finished outputs are put in place.
"""
from __future__ import annotations

import signal
from contextlib import contextmanager
from typing import Iterator

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1)


def signal_name(signum: int) -> str:
    """'SIGTERM' for 15, ..."""
    return signal.Signals(signum).name


class StopFlag:
    """Turns SIGTERM/SIGINT/SIGUSR1 into a request (`requested`) that the training loop honours at its
    next check. `restore` puts back the handlers that were installed before."""

    def __init__(self):
        self.requested = False
        self._previous = {sig: signal.signal(sig, self._handle) for sig in STOP_SIGNALS}

    def _handle(self, signum, frame):
        self.requested = True

    def restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


class Stopped(BaseException):
    """A stop signal ended an inference command. A BaseException (like KeyboardInterrupt), so that no
    `except Exception` on the way swallows it; `finally` blocks (atomic writes' clean-up) still run.
    `exit_status` is 128 + the signal's number, what a shell reports for a process the signal killed."""

    def __init__(self, signum: int, note: str = "nothing written"):
        super().__init__(signum, note)
        self.signum, self.note = signum, note

    @property
    def exit_status(self) -> int:
        return 128 + self.signum

    def __str__(self) -> str:
        return f"stopped by {signal_name(self.signum)}; {self.note}"


class _ExitOnStop:
    """The handler `exit_on_stop` installs: raise `Stopped`, or, inside `held`, remember the signal."""

    def __init__(self):
        self.holding = False
        self.pending: int | None = None

    def handle(self, signum, frame):
        if self.holding:
            if self.pending is None:
                self.pending = signum
            return
        ignore_stop_signals()
        raise Stopped(signum)


_GUARD = _ExitOnStop()


def ignore_stop_signals() -> None:
    """A second signal while the command is already on its way out must not break the one-line exit."""
    for sig in STOP_SIGNALS:
        signal.signal(sig, signal.SIG_IGN)


def exit_on_stop() -> None:
    """From now on a stop signal raises `Stopped` in the main thread (within the Python instruction
    running; a long C call such as one big matrix product finishes first)."""
    _GUARD.holding, _GUARD.pending = False, None
    for sig in STOP_SIGNALS:
        signal.signal(sig, _GUARD.handle)


@contextmanager
def held(note: str) -> Iterator[None]:
    """Inside the block a stop signal is remembered instead of raised; it is raised when the block ends
    normally, as `Stopped(signum, note)` (e.g. note = "<file> was written in full"). For the final
    renames that put finished outputs in place: they take milliseconds, and a stop between them would
    leave a mix of old and new files."""
    _GUARD.holding, _GUARD.pending = True, None
    try:
        yield
    finally:
        _GUARD.holding = False
    pending, _GUARD.pending = _GUARD.pending, None
    if pending is not None:
        ignore_stop_signals()
        raise Stopped(pending, note)
