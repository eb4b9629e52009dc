"""Stopping a run between two steps with a checkpoint: Ctrl-C (exit status 130) and preemption (exit status 75).

While :class:`StopRequest` is active (the training loop of :meth:`scan_zoo.train.trainer.Trainer.fit`):

- the first SIGINT only sets :attr:`StopRequest.requested`: the loop stops between two steps (every process
  at the same step, see ``Trainer._train``), saves a checkpoint and raises :class:`Interrupted`, whose text is
  the one line train.py prints (exit status 130). A second SIGINT raises :class:`Interrupted` at once,
  wherever the process is; checkpoints are written atomically, so the previous one is intact and is named.
- a preemption signal (``--preempt-signals``, default SIGTERM and SIGUSR1: what schedulers send before they
  end a job) sets :attr:`StopRequest.preempted`: every process finishes its step, the checkpoint is saved and
  :class:`Preempted` is raised (exit status 75, EX_TEMPFAIL: requeue and continue with ``--resume latest``).
  The same signal again changes nothing (a launcher passing on the scheduler's signal sends a second one).
  So does :class:`Deadline` running out (``--time-limit``, ``SLURM_JOB_END_TIME``).

``accelerate launch`` with one process sends SIGTERM to the script right after a Ctrl-C (and SIGKILL 5 s
later): a SIGTERM that follows a SIGINT counts as the second Ctrl-C. With ``--preempt-signals none`` a SIGTERM
ends the process at once, as Python's default does.

Only the process that entered the context reacts: DataLoader workers forked from it inherit the handler and
ignore the signal (a terminal sends Ctrl-C to every process of the foreground group, a scheduler signals every
process of the job); torch's own SIGTERM handler in the workers is replaced by :func:`ignore_in_worker`. Outside
the context SIGINT is Python's usual KeyboardInterrupt and a preemption signal raises
:class:`PreemptedOutside` (:func:`preempt_outside`), which train.py turns into the same kind of line.
"""

from __future__ import annotations

import atexit
import contextlib
import functools
import logging
import math
import multiprocessing
import os
import signal
import threading
import time
from collections.abc import Callable, Iterator, Mapping

from scan_zoo.common.errors import UserError

logger = logging.getLogger(__name__)

EXIT_STATUS = 130  # 128 + SIGINT: what a shell reports for a program ended by Ctrl-C
EXIT_PREEMPTED = 75  # EX_TEMPFAIL (sysexits.h): stopped with a checkpoint; requeue and continue with --resume latest
NEVER = ("INT", "KILL", "STOP")  # Ctrl-C has its own meaning; SIGKILL and SIGSTOP cannot be caught


class Interrupted(Exception):
    """Training stopped on SIGINT; ``str()`` is the line the user reads."""

    def __init__(self, step: int, checkpoint: str):
        self.step, self.checkpoint = step, str(checkpoint)
        super().__init__(
            f"interrupted at step {step}; the last checkpoint is {self.checkpoint}; continue with --resume latest"
        )


class Preempted(Exception):
    """Training stopped on a preemption signal or a time limit, with a checkpoint; ``str()`` is the line."""

    def __init__(self, step: int, checkpoint: str, why: str):
        self.step, self.checkpoint, self.why = step, str(checkpoint), why
        super().__init__(
            f"preempted ({why}) at step {step}; the last checkpoint is {self.checkpoint}; "
            "requeue and continue with --resume latest"
        )


class PreemptedOutside(BaseException):
    """A preemption signal outside the training steps (data rendering, mining, evaluation, export). A
    BaseException, as KeyboardInterrupt: no ``except Exception`` on the way swallows it."""

    def __init__(self, signame: str):
        self.signame = signame
        super().__init__(signame)


def parse_signals(text: str | None) -> tuple[signal.Signals, ...]:
    """``"TERM,USR1"`` (names with or without ``SIG``) -> the signals; ``"none"`` (or None) -> ()."""
    if text is None or text.strip().lower() in ("none", ""):
        return ()
    found = []
    for part in text.split(","):
        name = part.strip().upper()
        name = name[3:] if name.startswith("SIG") else name
        sig = getattr(signal, f"SIG{name}", None) if name and name not in NEVER else None
        if not isinstance(sig, signal.Signals):
            raise UserError(
                f"--preempt-signals {text!r}: {part.strip()!r} is not a signal this can handle "
                "(give names such as TERM,USR1, or none; INT is Ctrl-C's)"
            )
        found.append(sig)
    return tuple(dict.fromkeys(found))


def parse_duration(text: str, what: str = "--time-limit") -> float:
    """``SECONDS`` (a positive number) or ``[HH:]MM:SS`` -> seconds; anything else is a UserError."""
    parts = str(text).strip().split(":")
    try:
        if len(parts) == 1:
            seconds = float(parts[0])
        elif len(parts) in (2, 3) and all(p.isdigit() for p in parts):
            values = [int(p) for p in parts]
            if any(v >= 60 for v in values[1:]):
                raise ValueError
            seconds = float(sum(v * 60**i for i, v in enumerate(reversed(values))))
        else:
            raise ValueError
    except ValueError:
        raise UserError(f"{what} {text!r} is not SECONDS or HH:MM:SS (minutes and seconds below 60)") from None
    if not math.isfinite(seconds) or seconds <= 0:
        raise UserError(f"{what} {text!r} must be a positive time")
    return seconds


def process_start_time() -> float:
    """When this process started (unix seconds): the job's clock starts then, not when training does."""
    try:
        with open("/proc/self/stat") as f:
            ticks = int(f.read().rsplit(")", 1)[1].split()[19])  # field 22: start time, clock ticks after boot
        with open("/proc/stat") as f:
            boot = next(int(ln.split()[1]) for ln in f if ln.startswith("btime "))
        return boot + ticks / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError, StopIteration):
        return _IMPORTED


_IMPORTED = time.time()  # the fallback where /proc is missing


class Deadline:
    """When this process must have saved its checkpoint: the earlier of ``--time-limit`` after the process
    started and ``SLURM_JOB_END_TIME`` (unix seconds), if either is set.

    :meth:`due` says whether to stop before the next step: when less time is left than the margin, which is
    ``--time-limit-margin`` seconds if given, else twice the longest step measured so far plus the longest
    checkpoint write measured so far (a step's time until one was measured). Before the first step has been
    measured only a deadline already past is due.
    """

    def __init__(
        self, end: float | None, why: str = "", margin: float | None = None, clock: Callable[[], float] = time.time
    ):
        self.end, self.why, self.margin, self.clock = end, why, margin, clock
        self.step_s: float | None = None
        self.checkpoint_s: float | None = None

    @classmethod
    def from_config(
        cls, time_limit: str | None, margin: float | None, environ: Mapping[str, str] = os.environ
    ) -> "Deadline":
        ends = []
        if time_limit:
            ends.append((process_start_time() + parse_duration(time_limit), f"--time-limit {time_limit}"))
        slurm = environ.get("SLURM_JOB_END_TIME", "").strip()
        if slurm:
            try:
                ends.append((float(slurm), "the SLURM job's end time"))
            except ValueError:
                raise UserError(f"SLURM_JOB_END_TIME={slurm!r} is not a time in unix seconds") from None
        end, why = min(ends) if ends else (None, "")
        return cls(end, why, margin)

    def note_step(self, seconds: float) -> None:
        self.step_s = max(seconds, self.step_s or 0.0)

    def note_checkpoint(self, seconds: float) -> None:
        self.checkpoint_s = max(seconds, self.checkpoint_s or 0.0)

    def due(self) -> bool:
        if self.end is None:
            return False
        left = self.end - self.clock()
        if left <= 0:
            return True
        if self.margin is not None:
            return left < self.margin
        if self.step_s is None:
            return False
        return left < 2 * self.step_s + (self.checkpoint_s if self.checkpoint_s is not None else self.step_s)


def ignore_in_worker(signals: tuple[signal.Signals, ...], worker_id: int = 0) -> None:
    """DataLoader ``worker_init_fn``: the worker ignores the preemption signals (torch's handler would end it
    on a SIGTERM from anyone but its parent); it still ends with its loader, or when the training process dies.
    Use it through :func:`worker_init`, which also makes sure such workers cannot block the process's exit."""
    for sig in signals:
        signal.signal(sig, signal.SIG_IGN)


def worker_init(signals: tuple[signal.Signals, ...]) -> Callable[[int], None]:
    """The ``worker_init_fn`` of a training loader whose workers ignore ``signals``.

    At exit, multiprocessing ends daemonic children (DataLoader workers) with SIGTERM and then waits for them:
    a worker ignoring SIGTERM, left alive by a loader stopped mid-epoch (an error, a partial benchmark), would
    hang the exit. So the first call registers :func:`reap_workers` to run before that (atexit is last in,
    first out) and end them with SIGKILL, which they cannot ignore and which loses nothing: they hold no state.
    """
    global _reaper_registered
    if not _reaper_registered:
        atexit.register(reap_workers)
        _reaper_registered = True
    return functools.partial(ignore_in_worker, signals)


_reaper_registered = False


def reap_workers() -> None:
    """SIGKILL this process's daemonic multiprocessing children (DataLoader workers) that are still alive.

    torch's SIGCHLD handler would report each killed worker as a failure: the process is exiting, so the
    default handler is restored first."""
    children = [c for c in multiprocessing.active_children() if c.daemon]
    if not children:
        return
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)
    for child in children:
        child.kill()
    for child in children:
        child.join(5)


class StopRequest:
    """Context manager: the first SIGINT asks the loop to stop (``requested``), a second raises ``abort()``;
    a signal of ``preempt`` asks it to stop for a preemption (``preempted``: the signal's name).

    ``abort`` builds the :class:`Interrupted` to raise on the second SIGINT (it names the step reached and
    the newest complete checkpoint). ``notice``: say once, on the first signal, that the run is stopping
    (the main process; the others stay quiet). Outside the main thread, where Python delivers no signals,
    the context does nothing.
    """

    def __init__(self, abort: Callable[[], Interrupted], notice: bool = True, preempt: tuple[signal.Signals, ...] = ()):
        self.abort, self.notice, self.preempt = abort, notice, tuple(preempt)
        self.requested = False
        self.preempted: str | None = None
        self._pid: int | None = None
        self._previous: dict = {}

    def _handle(self, signum, frame) -> None:
        if os.getpid() != self._pid:  # a forked DataLoader worker: the main process decides
            return
        if self.requested:
            raise self.abort()
        self.requested = True
        if self.notice:
            logger.warning("Ctrl-C: stopping after this step and saving a checkpoint (Ctrl-C again stops at once)")

    def _handle_preempt(self, signum, frame) -> None:
        if os.getpid() != self._pid:
            return
        if signum == signal.SIGTERM and self.requested:
            self._launcher_after_ctrl_c()
        if self.preempted is None:
            self.preempted = signal.Signals(signum).name
            if self.notice:
                logger.warning(
                    "%s: preempted; stopping after this step and saving a checkpoint (exit status %d)",
                    self.preempted,
                    EXIT_PREEMPTED,
                )

    def _handle_term(self, signum, frame) -> None:
        """SIGTERM when it is not a preemption signal: after Ctrl-C, the launcher ending us; else the default."""
        if os.getpid() == self._pid and self.requested:
            self._launcher_after_ctrl_c()
        previous = self._previous.get(signal.SIGTERM)
        if callable(previous):
            previous(signum, frame)
            return
        signal.signal(signal.SIGTERM, signal.SIG_DFL)  # as without this context: the process ends now
        os.kill(os.getpid(), signal.SIGTERM)

    def _launcher_after_ctrl_c(self) -> None:
        # the launcher ends the DataLoader workers too: torch's SIGCHLD handler would then raise, as a traceback,
        # from the loader's shutdown after our line
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)
        raise self.abort()

    def __enter__(self) -> "StopRequest":
        self.requested, self.preempted = False, None
        if threading.current_thread() is threading.main_thread():
            self._pid = os.getpid()
            handlers = {signal.SIGINT: self._handle, signal.SIGTERM: self._handle_term}
            handlers.update({sig: self._handle_preempt for sig in self.preempt})
            self._previous = {sig: signal.signal(sig, fn) for sig, fn in handlers.items()}
        return self

    def __exit__(self, *exc) -> None:
        if self._pid is not None:
            for sig, previous in self._previous.items():
                if previous is None:
                    previous = signal.default_int_handler if sig == signal.SIGINT else signal.SIG_DFL
                signal.signal(sig, previous)
            self._pid, self._previous = None, {}


@contextlib.contextmanager
def preempt_outside(signals: tuple[signal.Signals, ...]) -> Iterator[None]:
    """While active, the first of ``signals`` raises :class:`PreemptedOutside` in this process (later ones are
    ignored); forked children ignore them. :class:`StopRequest` takes over inside the training loop."""
    if not signals or threading.current_thread() is not threading.main_thread():
        yield
        return
    pid, seen = os.getpid(), []

    def handle(signum, frame):
        if os.getpid() != pid or seen:
            return
        seen.append(signum)
        raise PreemptedOutside(signal.Signals(signum).name)

    previous = {sig: signal.signal(sig, handle) for sig in signals}
    try:
        yield
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old if old is not None else signal.SIG_DFL)
