"""The structure stays as designed: imports flow one way, modules stay readable, one command table serves the
CLI and invoke, and failures.toml is the only list of failure ids."""

from __future__ import annotations

import argparse
import ast
import sys

import pytest
from conftest import ROOT
from import_graph import PKG, cycles, graph, modules

from vllm_harness.cli import parser
from vllm_harness.commands.table import COMMANDS
from vllm_harness.core.safeio import tomllib  # the one TOML shim (tomli on 3.10)

MAX_LINES = 650                      # "no module over ~600 lines"
LAYERS = ["core", "facts", "toolchain", "diagnose", "verify", "doctor", "steps", "pipeline", "commands", "cli", "__main__"]


def test_no_import_cycles():
    found = cycles(graph())
    assert not found, "import cycles: " + "; ".join(" <-> ".join(c) for c in found)


def _layer(mod: str) -> int | None:
    parts = mod.split(".")
    return LAYERS.index(parts[1]) if len(parts) > 1 and parts[1] in LAYERS else None


def test_packages_import_only_downward():
    """core < facts < diagnose < verify < steps < doctor < pipeline < commands < cli: never upward."""
    bad = []
    for mod, targets in graph().items():
        lm = _layer(mod)
        for t in targets:
            lt = _layer(t)
            if lm is not None and lt is not None and lt > lm:
                bad.append(f"{mod} -> {t}")
    assert not bad, bad


def test_no_module_is_too_long():
    long = {m: n for m, p in modules().items() if (n := len(p.read_text().splitlines())) > MAX_LINES}
    assert not long, long


def _cli_flags() -> dict[str, dict[str, str]]:
    out: dict[str, dict[str, str]] = {}
    sub = next(a for a in parser()._actions if isinstance(a, argparse._SubParsersAction))
    for name, p in sub.choices.items():
        out[name] = {opt: (a.help or "") for a in p._actions for opt in a.option_strings
                     if opt.startswith("--") and opt != "--help"}
    return out


def _invoke_flags() -> dict[str, dict[str, str]]:
    sys.path.insert(0, str(ROOT))
    import tasks
    out = {}
    for name, task in tasks.ns.tasks.items():
        args = task.get_arguments()
        out[name] = {"--" + a.name.replace("_", "-"): (a.help or "") for a in args}
    return out


def test_every_cli_flag_is_an_invoke_flag_with_the_same_help():
    cli, inv = _cli_flags(), _invoke_flags()
    assert set(cli) == set(inv) == {c.name for c in COMMANDS}
    for name in cli:
        assert cli[name] == inv[name], name


def _emitted_ids() -> dict[str, set[str]]:
    """Every failure id that doctor, verify (host side and the scripts it runs) and diagnose can emit, read
    from the source: Finding/add() calls, {"id": ...} results and classify()'s table."""
    out: dict[str, set[str]] = {}
    files = list((PKG / "doctor").glob("*.py")) + list((PKG / "verify").glob("*.py")) + \
        [PKG / "data" / "verify_env.py", PKG / "data" / "verify_dist.py"]
    for f in files:
        tree = ast.parse(f.read_text())
        for node in ast.walk(tree):
            ids: list[str] = []
            if isinstance(node, ast.Call):
                fn = node.func.attr if isinstance(node.func, ast.Attribute) else getattr(node.func, "id", "")
                if fn in ("add", "Finding") and node.args and isinstance(node.args[0], ast.Constant):
                    ids.append(node.args[0].value)
                if fn == "skipped":
                    ids.append("check-skipped")
                if fn == "unknown":
                    ids.append("compat-unknown")
            elif isinstance(node, ast.Dict):
                for k, v in zip(node.keys, node.values, strict=True):
                    if isinstance(k, ast.Constant) and k.value == "id" and isinstance(v, ast.Constant) and v.value:
                        ids.append(v.value)
            elif isinstance(node, ast.FunctionDef) and node.name == "classify":
                for t in ast.walk(node):
                    if isinstance(t, ast.Tuple) and len(t.elts) == 2 and isinstance(t.elts[1], ast.Constant):
                        ids.append(t.elts[1].value)
            for i in ids:
                if isinstance(i, str):
                    out.setdefault(i, set()).add(f.name)
    return out


def test_every_emitted_failure_id_is_in_failures_toml():
    known = {f["id"] for f in tomllib.loads((PKG / "data" / "failures.toml").read_text())["failure"]}
    emitted = _emitted_ids()
    assert len(emitted) > 20  # the scan finds the ids (a scan that finds none proves nothing)
    missing = {i: sorted(w) for i, w in emitted.items() if i not in known}
    assert not missing, missing


@pytest.mark.parametrize("cmd", COMMANDS, ids=lambda c: c.name)
def test_every_handler_in_the_table_exists(cmd):
    assert callable(cmd.load())


def test_short_flags_are_chosen_in_the_table_the_same_in_cli_and_invoke():
    """`-j N` is --jobs (make, ninja, cmake --build), `-h` is help: invoke generated -j for --json and -o for
    --jobs ("No idea what '8' is!") and -h for --cache before the table named them."""
    sys.path.insert(0, str(ROOT))
    from invoke.parser import Parser

    import tasks
    sub = next(a for a in parser()._actions if isinstance(a, argparse._SubParsersAction))
    for cmd in COMMANDS:
        cli_short = {o: a.dest for a in sub.choices[cmd.name]._actions for o in a.option_strings
                     if not o.startswith("--") and o != "-h"}
        inv_short = {"-" + n: a.attr_name or a.name for a in tasks.ns.tasks[cmd.name].get_arguments()
                     for n in a.names if len(n) == 1}
        assert cli_short == inv_short == {a.short: a.dest for a in cmd.args if a.short}, cmd.name
        assert "-h" not in inv_short
    assert {a.short for c in COMMANDS for a in c.args if a.dest == "jobs"} == {"-j"}
    # invoke parses `build -j 8` as --jobs 8
    got = Parser(contexts=tasks.ns.to_contexts()).parse_argv(["build", "-j", "8"])
    assert got[-1].name == "build" and str(got[-1].args["jobs"].value) == "8"  # the CLI parses it as int
    # and the CLI the same
    ns = parser().parse_args(["build", "--variant", "x", "-j", "8"])
    assert ns.jobs == 8


# ------------------------------------------------------------------------- one declaration of each step

def test_a_step_is_declared_once_and_the_step_tasks_come_from_it():
    """pipeline/steps.STEPS is the one list: its tasks are the table's step commands (verify has its own), and
    no other module spells out the steps' order (a literal naming three or more of them)."""
    from vllm_harness.commands.table import STEPS as STEP_HANDLER
    from vllm_harness.pipeline.steps import STEPS, TASKS
    by_handler = {c.name for c in COMMANDS if c.handler == STEP_HANDLER}
    assert set(TASKS) - {"verify"} <= by_handler
    assert by_handler - set(TASKS) == {"probe", "patches"}        # steps that are no part of the record
    names = {s.name for s in STEPS}
    spelled = []
    for mod, path in modules().items():
        if mod.endswith("pipeline.steps"):
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.List, ast.Tuple, ast.Set)):
                consts = {e.value for e in node.elts if isinstance(e, ast.Constant) and isinstance(e.value, str)}
                if len(consts & names) >= 3:
                    spelled.append(f"{mod}:{node.lineno}")
    assert not spelled, spelled


def test_run_options_are_frozen_and_each_is_a_flag_of_the_table():
    """core/options.RunOptions: built once at the boundary; every field is a flag some command has."""
    import dataclasses

    from vllm_harness.core.options import RunOptions
    opts = RunOptions(jobs=4)
    with pytest.raises(dataclasses.FrozenInstanceError):
        opts.jobs = 8
    dests = {a.dest for c in COMMANDS for a in c.args} | {"quiet", "bundle"}   # --json, --from-bundle
    assert {f.name for f in dataclasses.fields(RunOptions)} <= dests


def test_doctor_takes_the_build_options_of_build_variant():
    """doctor judges what the build will use: it has every build option build-variant has."""
    from vllm_harness.commands.table import BUILD_OPTIONS, BY_NAME
    for name in ("doctor", "build", "build-variant"):
        flags = {a.flag for a in BY_NAME[name].args}
        assert {a.flag for a in BUILD_OPTIONS} <= flags, name


def test_callers_branch_on_an_errors_kind_not_its_text():
    """A caller that must tell errors apart reads ``e.kind`` (core/errors.KINDS), never the message's words."""
    import re

    from vllm_harness.core.errors import KINDS, UsageError
    bad = [f"{mod}:{n}" for mod, path in modules().items()
           for n, line in enumerate(path.read_text().splitlines(), 1)
           if re.search(r"\bin \w+\.message\b|\.message\.(?:startswith|endswith)\(|\.message ==", line)]
    assert not bad, bad
    with pytest.raises(ValueError):
        UsageError("x", kind="not-declared")
    assert {UsageError("x", kind=k).kind for k in KINDS} == set(KINDS)


def test_run_options_from_the_command_line_keep_the_documented_precedence(tmp_path):
    """--from-bundle over VLLM_HARNESS_BUNDLE (only for a command that installs); --json is quiet; a flag the
    command does not have keeps its default."""
    from types import SimpleNamespace

    from vllm_harness.core.options import RunOptions
    env = {"VLLM_HARNESS_BUNDLE": str(tmp_path / "from-env")}
    a = SimpleNamespace(json=True, jobs=8, from_bundle=None)
    opts = RunOptions.from_args(a, env)
    assert opts.quiet and opts.jobs == 8 and opts.bundle == (tmp_path / "from-env").resolve()
    a.from_bundle = str(tmp_path / "given")
    assert RunOptions.from_args(a, env).bundle == (tmp_path / "given").resolve()
    assert RunOptions.from_args(SimpleNamespace(json=False), env).bundle is None    # doctor: no --from-bundle
    assert RunOptions.from_args(SimpleNamespace(json=False), env) == RunOptions()


def test_no_private_name_is_used_across_modules():
    """A helper another module needs is public: no ``from x import _name`` between the package's modules, and
    no ``module._name`` on an imported module of the package (a class's own ``self._x`` is fine)."""
    own = {m.rsplit(".", 1)[-1] for m in modules()}
    bad = []
    for mod, path in modules().items():
        tree = ast.parse(path.read_text())
        aliases = {a.asname or a.name.rsplit(".", 1)[-1] for n in ast.walk(tree) if isinstance(n, ast.Import)
                   for a in n.names if a.name.startswith("vllm_harness")}
        for n in ast.walk(tree):
            if isinstance(n, ast.ImportFrom) and (n.module or "").startswith("vllm_harness"):
                aliases |= {a.asname or a.name for a in n.names if a.name in own or a.asname}
                bad += [f"{mod}: from {n.module} import {a.name}" for a in n.names
                        if a.name.startswith("_") and not a.name.startswith("__")]
            if (isinstance(n, ast.Attribute) and isinstance(n.value, ast.Name) and n.value.id in aliases
                    and n.attr.startswith("_") and not n.attr.startswith("__")):
                bad.append(f"{mod}:{n.lineno}: {n.value.id}.{n.attr}")
    assert not bad, bad
