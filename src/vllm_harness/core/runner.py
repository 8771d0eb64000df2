"""Run one step's commands: full output to the step's log file, progress on the terminal, a short summary.

Every child gets an argument list and an explicit environment (never ``shell=True``).  While it runs the
terminal shows the step, the time, ninja's ``[n/N]`` as a bar when the build prints it, and the last
line; when stdout is not a terminal a heartbeat line is printed every 15 s instead, also while the child
is silent.  When a command fails, the log is read by ``diagnose`` and its top finding is printed under the
summary.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from vllm_harness.core import masking, procs, writer
from vllm_harness.core.errors import StepFailed

NINJA_RE = re.compile(rb"\[(\d+)/(\d+)\]")
ANSI_RE = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")


def mask(text: str) -> str:
    """Hide credentials in URLs (https://user:token@host -> https://***@host): core.masking's one rule."""
    return masking.mask(text)


def console():
    import shutil

    from rich.console import Console

    # not a terminal (CI, a pipe): never wrap a summary line at 80 columns
    return Console(
        stderr=False,
        highlight=False,
        soft_wrap=True,
        width=None if sys.stdout.isatty() else max(120, shutil.get_terminal_size().columns),
    )


def emit(parts: list, con=None, show: bool = True) -> str:
    """Print rich renderables (tables, text) for people; return the same as plain text (160 columns)."""
    import io

    from rich.console import Console

    buf = io.StringIO()
    plain = Console(file=buf, width=160, force_terminal=False, color_system=None)
    for part in parts:
        plain.print(part)
    if show:
        out = con if con is not None else console()
        for part in parts:
            out.print(part)
    return buf.getvalue()


@dataclass
class StepLog:
    path: Path
    started: float = field(default_factory=time.monotonic)
    append: bool = False  # a later command of the same step: the log goes on (no new .prev.log)

    def open(self):
        """The log, unbuffered; never written through a link (core.writer.open_log refuses one)."""
        return writer.open_log(
            self.path, append=self.append, previous=self.path.with_name(self.path.stem + ".prev.log")
        )


class Progress:
    """Terminal progress for one step: a rich live bar, or a heartbeat line when not a terminal.

    ninja's ``[n/N]`` (the harness sets ``NINJA_STATUS="[%f/%t] "``: finished/total edges) becomes a bar with
    the rate (edges a minute) and the ETA, both from the edges finished since this ninja run began (a new
    ``N``, e.g. the next extension's ninja, starts a new count).  The full output still goes to the log.
    """

    def __init__(
        self, step: str, quiet: bool = False, clock=time.monotonic, beat: float = 15.0, ticker: bool = False
    ):
        self.step = step
        self.quiet = quiet
        self.clock = clock
        self.t0 = clock()
        self.last_line = ""
        self.done = self.total = 0
        self.run_t0: float | None = None  # when this ninja run began (the last other line before it)
        self.last_other = self.t0  # when the last line that was not ninja's status came
        self.beat = beat
        self.next_beat = self.t0 + beat
        self._live = None
        self._con = None
        if not quiet:
            self._con = console()
            if self._con.is_terminal:
                from rich.progress import BarColumn, MofNCompleteColumn, TextColumn, TimeElapsedColumn
                from rich.progress import Progress as RProgress

                self._live = RProgress(
                    TextColumn(f"[bold]{step}[/]"),
                    BarColumn(bar_width=24),
                    MofNCompleteColumn(),
                    TimeElapsedColumn(),
                    TextColumn("{task.fields[rate]}"),
                    TextColumn("{task.description}", style="dim"),
                    console=self._con,
                    transient=True,
                )
                self._task = self._live.add_task("", total=None, rate="")
                self._live.start()
        # a silent child (a download, an import) still gets its heartbeat: a thread ticks every second
        self._stop = threading.Event()
        self._ticker = None
        if ticker and not quiet and self._live is None:
            self._ticker = threading.Thread(target=self._tick_loop, name=f"progress-{step}", daemon=True)
            self._ticker.start()

    def _tick_loop(self) -> None:
        while not self._stop.wait(1.0):
            self.tick()

    def tick(self) -> None:
        """The heartbeat without new output: at least one line every ``beat`` seconds off a terminal."""
        now = self.clock()
        if self._live is None and not self.quiet and now >= self.next_beat:
            self.next_beat = now + self.beat
            st = self.status()
            line = "" if st and NINJA_RE.match(self.last_line.encode()) else self.last_line[-100:]
            print(
                " ".join(x for x in (f"  ... {self.step} {now - self.t0:.0f}s", st, mask(line)) if x),
                flush=True,
            )

    def rate(self) -> float | None:
        """Edges a second in this ninja run (None until two edges have finished)."""
        if self.run_t0 is None:
            return None
        dt = self.clock() - self.run_t0
        return self.done / dt if self.done > 0 and dt > 0 else None

    def eta(self) -> float | None:
        r = self.rate()
        return (self.total - self.done) / r if r else None

    def status(self) -> str:
        """'[37/120] 31% 2.4/min ETA 34m35s' (or '' before ninja printed anything)."""
        if not self.total:
            return ""
        out = f"[{self.done}/{self.total}] {100 * self.done // self.total}%"
        r, e = self.rate(), self.eta()
        if r:
            out += f" {r * 60:.1f}/min" if r < 1 else f" {r:.1f}/s"
        if e is not None:
            out += f" ETA {_hms(e)}"
        return out

    def feed(self, raw: bytes) -> None:
        found = NINJA_RE.findall(raw)
        now = self.clock()
        if found:
            done, total = int(found[-1][0]), int(found[-1][1])
            if self.run_t0 is None or total != self.total or done < self.done:  # a new ninja run
                self.run_t0 = self.last_other
            self.done, self.total = done, total
        elif raw.strip():
            self.last_other = now
        text = ANSI_RE.sub("", raw.decode("utf-8", "replace")).strip()
        if text:
            self.last_line = text
        if self._live is not None:
            desc = self.last_line[-80:]
            r, e = self.rate(), self.eta()
            rate = (f"{r * 60:.1f}/min" if r < 1 else f"{r:.1f}/s") if r else ""
            rate += f" ETA {_hms(e)}" if e is not None else ""
            if self.total:
                self._live.update(
                    self._task, completed=self.done, total=self.total, description=desc, rate=rate
                )
            else:
                self._live.update(self._task, description=desc)
        else:
            self.tick()

    def close(self) -> None:
        self._stop.set()
        if self._ticker is not None:
            self._ticker.join(timeout=2)
        if self._live is not None:
            self._live.stop()


def _hms(seconds: float) -> str:
    s = int(round(seconds))
    return (
        f"{s // 3600}h{s % 3600 // 60:02d}m"
        if s >= 3600
        else f"{s // 60}m{s % 60:02d}s"
        if s >= 60
        else f"{s}s"
    )


@dataclass(frozen=True)
class CommandOptions:
    """How :func:`run_commands` runs: in ``cwd`` (None: here), without progress output (``quiet``), ending
    the step after ``timeout`` seconds (None: never), adding to the log instead of starting it afresh
    (``append``)."""

    cwd: Path | None = None
    quiet: bool = False
    timeout: float | None = None
    append: bool = False


def run_commands(
    step: str,
    commands: list[list[str]],
    log_path: Path,
    env: dict[str, str],
    *,
    options: CommandOptions | None = None,
    **fields: object,
) -> float:
    """Run ``commands`` one after another; all output to ``log_path``.  Returns seconds taken.
    ``options`` (or its fields as keywords: ``cwd=``, ``quiet=``, ``timeout=``, ``append=``): see
    :class:`CommandOptions`.

    Raises ``StepFailed`` (with the log path) when one exits non-zero.  On Ctrl-C / SIGTERM the child's
    whole process group (pip, cmake, ninja, nvcc) is ended before the exception goes on.
    """
    opts = options if options is not None else CommandOptions(**fields)
    cwd, timeout = opts.cwd, opts.timeout
    log = StepLog(log_path, append=opts.append)
    prog = Progress(step, quiet=opts.quiet, ticker=True)
    t0 = time.monotonic()
    try:
        with log.open() as fh:
            for argv in commands:
                fh.write(f"$ {mask(' '.join(argv))}\n".encode())
                fh.write(f"# cwd: {cwd or os.getcwd()}\n".encode())
                try:  # its own process group, ended with the harness even if the harness is SIGKILLed
                    proc = procs.popen(
                        argv,
                        cwd=cwd,
                        env=env,
                        stdout=subprocess.PIPE,
                        stderr=subprocess.STDOUT,
                        stdin=subprocess.DEVNULL,
                    )
                except OSError as e:
                    fh.write(f"cannot start {argv[0]}: {e}\n".encode())
                    raise StepFailed(
                        f"{step}: cannot start {argv[0]} ({e.strerror}).",
                        "Check that it is installed and on PATH.",
                        log=str(log_path),
                    ) from None
                try:
                    assert proc.stdout is not None
                    for raw in iter(proc.stdout.readline, b""):
                        fh.write(mask(raw.decode("utf-8", "replace")).encode("utf-8"))
                        for seg in raw.split(b"\r"):
                            prog.feed(seg)
                        if timeout and time.monotonic() - t0 > timeout:
                            raise TimeoutError
                    rc = proc.wait()
                except BaseException as e:
                    procs.end_group(proc)
                    fh.write(f"# interrupted ({type(e).__name__} {e}): child processes ended\n".encode())
                    raise
                finally:
                    procs.release(proc)
                fh.write(f"# exit status {rc}\n".encode())
                if rc != 0:
                    raise StepFailed(
                        f"{step} failed: `{mask(' '.join(_short(argv)))}` exited with {rc}.",
                        None,
                        log=str(log_path),
                    )
    finally:
        prog.close()
    return time.monotonic() - t0


def _short(argv: list[str]) -> list[str]:
    out = [Path(argv[0]).name] + argv[1:]
    return out if len(out) <= 8 else out[:8] + ["..."]


def summary(
    step: str, ok: bool, seconds: float, log: Path | None, note: str = "", quiet: bool = False
) -> None:
    if quiet:
        return
    mark = "[green]✓[/]" if ok else "[red]✗[/]"
    where = f"  log: {rel_path(log)}" if log else ""
    console().print(f"{mark} [bold]{step:<13}[/] {seconds:7.1f}s{where}{('  ' + note) if note else ''}")


def rel_path(p: Path) -> str:
    try:
        return str(p.resolve().relative_to(Path.cwd()))
    except ValueError:
        return str(p)


def write_json(path: Path, data: dict) -> None:
    """A state file (in the harness's own folder: no ownership check), atomically, never through a link."""
    writer.write_file(path, mask(json.dumps(data, indent=2)), what="State file", force=True)
