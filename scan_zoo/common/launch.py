"""``scan-zoo-launch``: ``accelerate launch`` that is quiet by default and passes the script's exit status on.

Two things ``accelerate launch`` does that a user of this project should not see:

- without ``--config_file`` and without the file ``accelerate config`` writes, it prints six lines of
  "values were not passed ... had defaults used instead". This launcher passes the shipped one-process
  config (``scan_zoo/recipes/accelerate_default.yaml``) in that case; flags such as ``--multi_gpu
  --num_processes 2`` still override it.
- when the script exits non-zero it raises ``CalledProcessError`` (a traceback after the script's own
  one-line error) and exits 1, or with ``-q`` exits 1: the script's status (2 for a bad option, 3 for a
  non-finite loss, 130 after Ctrl-C) is lost. This launcher runs accelerate's launch command in-process
  and exits with the script's status instead, adding nothing to its output.
"""

from __future__ import annotations

import os
import subprocess
import sys

from accelerate.commands.config import default_config_file
from accelerate.commands.launch import launch_command, launch_command_parser

from scan_zoo.common.recipes import ACCELERATE_CONFIG


def launch_args(argv: list[str], user_default_exists: bool) -> list[str]:
    """``argv`` for ``accelerate launch``, with the shipped config first unless the user has a config."""
    given = any(a.split("=")[0] in ("--config_file", "--config-file") for a in argv)
    if given or user_default_exists:
        return list(argv)
    return ["--config_file", str(ACCELERATE_CONFIG), *argv]


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = launch_command_parser()
    parser.prog = "scan-zoo-launch"
    args = parser.parse_args(launch_args(argv, os.path.isfile(default_config_file)))
    args.quiet = False  # with -q accelerate exits 1 whatever the script's status; the traceback is dropped below
    try:
        launch_command(args)
    except subprocess.CalledProcessError as e:  # the script failed; its stderr has already been copied through
        return e.returncode if e.returncode > 0 else 128 - e.returncode
    except Exception as e:  # torchrun's ChildFailedError (several processes): the first failure's exit code
        failures = getattr(e, "failures", None)
        if not failures:
            raise
        # the process that failed on its own (the others are then stopped by a signal); they printed their lines
        first = min(failures.values(), key=lambda f: (f.exitcode <= 0, f.timestamp))
        return first.exitcode if first.exitcode > 0 else 128 - first.exitcode
    return 0


if __name__ == "__main__":
    sys.exit(main())
