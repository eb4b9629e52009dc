"""train.py with a pause at chosen training events, for tests that must act at an exact moment.

    python tests/pause_train.py --pause step:2[,checkpoint_written:8 ...] TRAIN.PY-ARGS...

A process reaching a listed ``<point>:<step>`` (:mod:`scan_zoo.train.events`) writes its pid to
``<run_dir>/.paused_<point>_<step>.<rank>`` and waits while that file exists (5 minutes at most), so that
the test can SIGKILL it, signal it, or change the data at exactly that moment, and delete the file to let it
go on. Runs under ``accelerate launch`` as train.py does (every process pauses).
"""

import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import train  # noqa: E402  (the checkout's train.py, found through the path above)


def pauser(wanted: set[str]):
    def on_event(event) -> None:
        if f"{event.point}:{event.step}" not in wanted:
            return
        marker = Path(event.run_dir) / f".paused_{event.point}_{event.step}.{event.rank}"
        part = marker.with_name(marker.name + ".part")
        part.write_text(str(os.getpid()))
        os.replace(part, marker)  # whole or absent
        deadline = time.monotonic() + 300
        while marker.exists() and time.monotonic() < deadline:
            time.sleep(0.05)

    return on_event


def main(argv: list[str]) -> int:
    wanted: set[str] = set()
    if argv[:1] == ["--pause"]:
        wanted, argv = set(argv[1].split(",")), argv[2:]
    return train.main(argv, callbacks=[pauser(wanted)] if wanted else [])


if __name__ == "__main__":
    try:
        sys.exit(main(sys.argv[1:]))
    except KeyboardInterrupt:  # as train.py: Ctrl-C while the libraries are imported is one line
        print(train.interrupted_line("train.py"), file=sys.stderr)
        sys.stderr.flush()
        os._exit(130)
