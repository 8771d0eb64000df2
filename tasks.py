"""invoke tasks: the single steps of a variant build, for daily work (`invoke --list`).

Generated from the one command table (src/vllm_harness/commands/table.py), as the CLI is: every flag of
`python -m vllm_harness <command>` is a flag of `invoke <command>`, with the same name and help.
"""

from __future__ import annotations

import inspect
import sys
from pathlib import Path

from invoke import Collection, Exit, Task

sys.path.insert(0, str(Path(__file__).parent / "src"))
from vllm_harness.cli import main as harness
from vllm_harness.commands.table import COMMANDS, Command


class TableTask(Task):
    """A task whose short flags are the command table's (``-j`` is --jobs, as in make and ninja), never
    generated from the flag's letters (invoke's default gave ``-j`` to --json and ``-h``, help everywhere, to
    --cache)."""

    def __init__(self, body, shorts: dict[str, str], **kw):
        super().__init__(body, auto_shortflags=False, **kw)
        self.shorts = shorts

    def arg_opts(self, name, default, taken_names):
        opts = super().arg_opts(name, default, taken_names)
        if self.shorts.get(name):
            opts["names"] = [*opts["names"], self.shorts[name].lstrip("-")]
        return opts


def _task(cmd: Command) -> Task:
    def body(c, **given):
        argv = [cmd.name]
        for arg in cmd.args:
            value = given.get(arg.dest)
            if arg.switch:
                argv += [arg.flag] if value else []
            elif arg.repeat:
                for v in value or []:
                    argv += [arg.flag, str(v)]
            elif value is not None and value != arg.default:
                argv += [arg.flag, str(value)]
        rc = harness(argv)
        if rc:
            raise Exit(code=rc)

    params = [inspect.Parameter("c", inspect.Parameter.POSITIONAL_OR_KEYWORD)]
    for arg in cmd.args:
        default = False if arg.switch else ([] if arg.repeat else arg.default)
        params.append(inspect.Parameter(arg.dest, inspect.Parameter.POSITIONAL_OR_KEYWORD, default=default))
    body.__signature__ = inspect.Signature(params)  # invoke reads the flags from the signature
    body.__doc__ = cmd.help
    body.__name__ = cmd.name.replace("-", "_")
    return TableTask(body, {a.dest: a.short for a in cmd.args}, name=cmd.name, help={a.dest: a.help for a in cmd.args},
                     iterable=[a.dest for a in cmd.args if a.repeat])


ns = Collection()
for _cmd in COMMANDS:
    ns.add_task(_task(_cmd))
