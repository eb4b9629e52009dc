"""One run per directory: ``<run>/run.lock``, held with ``fcntl.flock`` for the run's life.

The lock file holds the owner's pid and host. A second run into the same directory fails at once, in one
line naming the owner. The kernel releases a flock when its process dies, however it dies, so a lock file
that still names a pid but is not locked was left by a dead run: it is taken over, and the takeover said.

Only the main process of a distributed run takes the lock (the others share its run); every process
learns the outcome, so all of them fail alike. A flock belongs to an open file description, so a second
acquisition from the same process would conflict with the first: locks are counted per process and
directory instead (:func:`hold` nests).
"""

from __future__ import annotations

import fcntl
import logging
import os
import socket
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from accelerate.utils import broadcast_object_list

from scan_zoo.common.errors import UserError

logger = logging.getLogger(__name__)

LOCK_FILE = "run.lock"

_held: dict[str, list] = {}  # resolved run dir -> [open lock file, nesting count]


def prepare_run_dir(run_dir: Path) -> Path:
    """Create the run directory, or say in one line why it cannot be one."""
    run_dir = Path(run_dir)
    if run_dir.exists() and not run_dir.is_dir():
        raise UserError(f"--output-dir {run_dir} is a file, not a directory: choose another --output-dir")
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
    except (FileExistsError, NotADirectoryError):
        raise UserError(f"--output-dir {run_dir} cannot be created: a part of its path is a file") from None
    except OSError as e:
        raise UserError(f"--output-dir {run_dir} cannot be created: {e.strerror or e}") from None
    return run_dir


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def _owner(text: str) -> tuple[int | None, str]:
    pid, _, host = text.strip().partition(" ")
    try:
        return int(pid), host
    except ValueError:
        return None, host


def _acquire(run_dir: Path) -> str | None:
    """Take the lock of ``run_dir`` for this process; None, or the one-line reason it is taken."""
    key = os.path.realpath(run_dir)
    if key in _held:
        _held[key][1] += 1
        return None
    prepare_run_dir(run_dir)
    path = Path(run_dir) / LOCK_FILE
    try:
        f = open(path, "a+")
    except OSError as e:
        return f"cannot open the lock file {path}: {e.strerror or e}"
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        f.seek(0)
        pid, host = _owner(f.read())
        f.close()
        who = f"pid {pid} on {host}" if pid is not None else "another process"
        return (
            f"{run_dir} is in use by another run ({who}, lock file {path}): wait for it to end, "
            "or choose another --output-dir"
        )
    f.seek(0)
    pid, host = _owner(f.read())
    here = socket.gethostname()
    if pid is not None and pid != os.getpid():
        state = "gone" if host != here or not _pid_alive(pid) else "no longer holding it"
        logger.warning("taking over the stale lock of %s: pid %d on %s is %s", path, pid, host or "?", state)
    f.seek(0)
    f.truncate()
    f.write(f"{os.getpid()} {here}\n")
    f.flush()
    _held[key] = [f, 1]
    return None


def _release(run_dir: Path) -> None:
    key = os.path.realpath(run_dir)
    entry = _held.get(key)
    if entry is None:
        return
    entry[1] -= 1
    if entry[1] > 0:
        return
    del _held[key]
    f = entry[0]
    try:
        f.seek(0)
        f.truncate()  # an empty lock file: ended cleanly (one naming a pid but unlocked: its run died)
        f.flush()
    except OSError:
        pass
    fcntl.flock(f, fcntl.LOCK_UN)
    f.close()


@contextmanager
def hold(run_dir: Path, accelerator=None) -> Iterator[Path]:
    """Hold ``run_dir``'s lock while the block runs (the main process takes it; every process raises the same
    ``UserError`` when it cannot be taken). Nests within one process."""
    main = accelerator is None or accelerator.is_main_process
    problem = None
    if main:
        try:
            problem = _acquire(run_dir)
        except UserError as e:
            problem = str(e)
    if accelerator is not None and accelerator.num_processes > 1:
        problem = broadcast_object_list([problem])[0]
    if problem:
        raise UserError(problem)
    try:
        yield Path(run_dir)
    finally:
        if main:
            _release(run_dir)
