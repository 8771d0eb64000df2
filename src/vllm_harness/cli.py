"""The one command line behind the nox sessions and the invoke tasks: ``python -m vllm_harness <command>``.

Exit status (docs/contract/cli.md): 0 nothing wrong, 1 the command ran and found a problem, 2 bad usage
or bad input.  ``--json`` prints the contract's JSON on stdout; otherwise a table for people.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import threading
from contextlib import contextmanager

from vllm_harness.commands.table import COMMANDS
from vllm_harness.core import oserrors
from vllm_harness.core.errors import EXIT_USAGE, HarnessError
from vllm_harness.core.masking import MaskingStream


def parser() -> argparse.ArgumentParser:
    """argparse from the one command table (commands/table.py), which tasks.py reads too."""
    p = argparse.ArgumentParser(prog="vllm-harness", description=__doc__.splitlines()[0])
    p.add_argument("--root", help="the harness checkout (default: found from the current folder)")
    sub = p.add_subparsers(dest="command", required=True)
    for cmd in COMMANDS:
        s = sub.add_parser(cmd.name, help=cmd.help, description=cmd.help)
        s.set_defaults(fn=cmd.load)
        for arg in cmd.args:
            arg.add_to(s)
    return p


def _terminate(signum, frame):  # SIGTERM/SIGHUP end a run like Ctrl-C: the step is marked, children ended
    raise KeyboardInterrupt(f"signal {signum}")


def main(argv: list[str] | None = None) -> int:
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, _terminate)
        if signal.getsignal(signal.SIGHUP) is not signal.SIG_IGN:  # respect `nohup`
            signal.signal(signal.SIGHUP, _terminate)
    # every line this command prints (tables, progress, messages, JSON) passes through the one masking rule
    with _masked_output():
        return _main(argv)


@contextmanager
def _masked_output():
    saved = sys.stdout, sys.stderr
    if not isinstance(sys.stdout, MaskingStream):
        sys.stdout, sys.stderr = MaskingStream(sys.stdout), MaskingStream(sys.stderr)
    try:
        yield
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        sys.stdout, sys.stderr = saved


def _main(argv: list[str] | None) -> int:
    p = parser()
    try:
        a = p.parse_args(argv)
    except SystemExit as e:
        return int(e.code or 0) and EXIT_USAGE
    try:
        return a.fn()(a)
    except HarnessError as e:
        print(f"error: {e}", file=sys.stderr)
        return e.exit_code
    except BrokenPipeError:  # `... | head`: the reader left; nothing more to say
        sys.stdout = sys.stderr = open(os.devnull, "w")  # the interpreter's exit flushes them
        return 141
    except OSError as e:  # the machine refused (a read-only or full disk, a path too long): one message
        err = oserrors.from_args(e, vars(a))
        if err is None:
            raise
        print(f"error: {err}", file=sys.stderr)
        return err.exit_code
    except KeyboardInterrupt as e:
        print("interrupted: the step was marked not done and its processes ended; rerun to resume",
              file=sys.stderr)
        return 143 if "signal" in str(e) else 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
