"""The two kinds of failure the harness reports, and their exit codes (see docs/contract/cli.md).

* ``UsageError`` (exit 2): bad usage or bad input -- a broken ``envs/*.toml``, an unknown variant,
  a missing interpreter, a step run out of order.  One sentence naming the file/flag/thing, plus the fix.
* ``StepFailed`` (exit 1): the command ran and found a problem (a build failed, doctor found an error).
"""

from __future__ import annotations

EXIT_OK = 0
EXIT_PROBLEM = 1
EXIT_USAGE = 2


# what kind of error it is, when a caller branches on it (never on the message's text)
LOCK_HELD = "lock-held"          # another run holds the variant (core/locks)
STEP_ORDER = "step-order"        # a single step run before the step it needs (pipeline/run.require)
KINDS = (LOCK_HELD, STEP_ORDER)


class HarnessError(Exception):
    exit_code = EXIT_PROBLEM

    def __init__(self, message: str, fix: str | None = None, *, kind: str | None = None,
                 evidence: str | None = None):
        super().__init__(message)
        if kind is not None and kind not in KINDS:
            raise ValueError(f"undeclared error kind {kind!r}")
        self.message = message
        self.fix = fix
        self.kind = kind            # one of KINDS, or None
        self.evidence = evidence    # the log line diagnose reads for it (an unreachable index: pip's wording)
        self.recorded = False       # written to the step's log and status already (pipeline/run)

    def __str__(self) -> str:  # one line, the fix after the problem
        return f"{self.message} Fix: {self.fix}" if self.fix else self.message


class UsageError(HarnessError):
    exit_code = EXIT_USAGE


class StepFailed(HarnessError):
    exit_code = EXIT_PROBLEM

    def __init__(self, message: str, fix: str | None = None, log: str | None = None,
                 result: dict | None = None, *, kind: str | None = None):
        super().__init__(message, fix, kind=kind)
        self.log = log          # the step's log, for diagnose
        self.result = result    # the command's JSON object (--json still prints it on failure)
