"""Ctrl-C (SIGINT) during training: finish the step, save a checkpoint, stop in one line with exit status 130.

While :class:`StopRequest` is active (the training loop of :meth:`scan_zoo.train.trainer.Trainer.fit`), the first
SIGINT only sets :attr:`StopRequest.requested`: the loop stops between two steps (every process at the same
step, see ``Trainer._train``), saves a checkpoint and raises :class:`Interrupted`, whose text is the one line
train.py prints. A second SIGINT raises :class:`Interrupted` at once, wherever the process is; checkpoints
are written atomically, so the previous one is intact and is the one named.

``accelerate launch`` with one process sends SIGTERM to the script right after the Ctrl-C (and SIGKILL 5 s
later): a SIGTERM that follows a SIGINT counts as the second one. A SIGTERM alone does what it did before
(the process ends at once), and so does a SIGTERM in a DataLoader worker.

Only the process that entered the context reacts to SIGINT: DataLoader workers forked from it inherit the handler
and ignore the signal (a terminal sends Ctrl-C to every process of the foreground group, workers included),
so they neither die mid-batch nor print a traceback. Outside the context SIGINT is Python's usual
KeyboardInterrupt, which train.py turns into the same kind of line.
"""
from __future__ import annotations

import logging
import os
import signal
import threading
from typing import Callable, Optional

logger = logging.getLogger(__name__)

EXIT_STATUS = 130  # 128 + SIGINT: what a shell reports for a program ended by Ctrl-C


class Interrupted(Exception):
    """Training stopped on SIGINT; ``str()`` is the line the user reads."""

    def __init__(self, step: int, checkpoint: str):
        self.step, self.checkpoint = step, str(checkpoint)
        super().__init__(f"interrupted at step {step}; the last checkpoint is {self.checkpoint}; "
                         "continue with --resume latest")


class StopRequest:
    """Context manager: the first SIGINT asks the loop to stop (``requested``), a second raises ``abort()``.

    ``abort`` builds the :class:`Interrupted` to raise on the second SIGINT (it names the step reached and
    the newest complete checkpoint). ``notice``: say once, on the first SIGINT, that the run is stopping
    (the main process; the others stay quiet). Outside the main thread, where Python delivers no signals,
    the context does nothing.
    """

    def __init__(self, abort: Callable[[], Interrupted], notice: bool = True):
        self.abort, self.notice = abort, notice
        self.requested = False
        self._pid: Optional[int] = None
        self._previous = self._previous_term = None

    def _handle(self, signum, frame) -> None:
        if os.getpid() != self._pid:  # a forked DataLoader worker: the main process decides
            return
        if self.requested:
            raise self.abort()
        self.requested = True
        if self.notice:
            logger.warning("Ctrl-C: stopping after this step and saving a checkpoint (Ctrl-C again stops at once)")

    def _handle_term(self, signum, frame) -> None:
        if os.getpid() == self._pid and self.requested:  # the launcher ending us after Ctrl-C
            # it ends the DataLoader workers too: torch's SIGCHLD handler would then raise, as a traceback, from
            # the loader's shutdown after our line
            signal.signal(signal.SIGCHLD, signal.SIG_DFL)
            raise self.abort()
        if callable(self._previous_term):
            self._previous_term(signum, frame)
            return
        signal.signal(signal.SIGTERM, signal.SIG_DFL)  # as without this context: the process ends now
        os.kill(os.getpid(), signal.SIGTERM)

    def __enter__(self) -> "StopRequest":
        self.requested = False
        if threading.current_thread() is threading.main_thread():
            self._pid = os.getpid()
            self._previous = signal.signal(signal.SIGINT, self._handle)
            self._previous_term = signal.signal(signal.SIGTERM, self._handle_term)
        return self

    def __exit__(self, *exc) -> None:
        if self._pid is not None:
            signal.signal(signal.SIGINT, self._previous if self._previous is not None else signal.default_int_handler)
            signal.signal(signal.SIGTERM, self._previous_term if self._previous_term is not None else signal.SIG_DFL)
            self._pid = None
