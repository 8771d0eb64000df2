"""Running the declared steps (``pipeline/steps``), each one recorded in the variant's status so that reruns
reuse what is good.

``build_variant`` (the ``build-<variant>`` nox session) runs doctor first and stops on an error finding
before anything slow, unless ``force``.  A single step (an invoke task) refuses to run before the step it
needs, with the command that fixes it.
"""

from __future__ import annotations

import functools
import sys
import time
from contextlib import contextmanager
from pathlib import Path

from vllm_harness import diagnose
from vllm_harness.core import locks, oserrors
from vllm_harness.core.errors import LOCK_HELD, STEP_ORDER, HarnessError, StepFailed, UsageError
from vllm_harness.core.masking import mask
from vllm_harness.core.runner import console, rel_path, summary, write_json
from vllm_harness.core.status import Status
from vllm_harness.facts import pythons
from vllm_harness.pipeline import preflight as doctor_run
from vllm_harness.pipeline.steps import BY_NAME, GRAPH, TASKS, Step, keys_of, needs, steps_for
from vllm_harness.steps import bundle
from vllm_harness.steps import verify as verify_step
from vllm_harness.steps.build import start_wheel_download
from vllm_harness.steps.context import Ctx

# ------------------------------------------------------------------------------------------- one step

def _run(ctx: Ctx, declared: Step, key: str, interp, **kw) -> None:
    """One declared step: reused when done with this key, else run, timed, recorded (failures diagnosed)."""
    step = declared.name
    if not ctx.options.force and ctx.status.is_done(step, key):
        s = ctx.status.step(step)
        ctx.say(f"[dim]· {step:<13} done earlier ({s.get('seconds', 0)}s), reused[/]")
        return
    ctx.status.start(step)
    log = ctx.log(step)
    t0 = time.monotonic()
    try:
        extra = declared.run(ctx, log, interp, **kw) or {}
    except StepFailed as e:
        if not e.log:  # failed before it ran a command: recorded with its message as for any other error
            record_failure(ctx, step, e, started=time.time() - (time.monotonic() - t0))
            raise
        ctx.status.fail(step, e.log or str(log), e.message)
        summary(step, False, time.monotonic() - t0, Path(e.log) if e.log else None, quiet=ctx.options.quiet)
        if e.log:
            write_json(ctx.layout.last_failed, {"variant": ctx.name, "step": step, "log": e.log})
            e.recorded = True
            report = explain_failure(Path(e.log), ctx.variant.fix_context(), quiet=ctx.options.quiet)
            if report and report["findings"] and not e.fix:
                e.fix = report["findings"][0]["fix"]
        raise
    except HarnessError as e:  # before the step had a log (an index, a toolkit, a bundle): still diagnosable
        record_failure(ctx, step, e, started=time.time() - (time.monotonic() - t0))
        raise
    except BaseException:  # Ctrl-C, SIGTERM, a bug: never leave the step looking done
        ctx.status.fail(step, str(log), "interrupted")
        raise
    secs = time.monotonic() - t0
    gone = _tree_gone(ctx, step)
    if gone:  # deleted under the step (by hand: clean waits for the variant's lock): never recorded as done
        ctx.status.fail(step, str(log) if log.exists() else None, f"{gone} disappeared during the step")
        raise StepFailed(
            f"{step}: {gone} disappeared while the step ran; the step is recorded as failed.",
            f"Run it again (`nox -s build-{ctx.name}` resumes at this step).",
        )
    ctx.status.finish(step, key, str(log) if log.exists() else None, secs, **extra)
    summary(step, True, secs, log if log.exists() else None, note=extra.get("note", ""),
            quiet=ctx.options.quiet)


def record_failure(ctx: Ctx, step: str, e: HarnessError, started: float | None = None) -> None:
    """A failure without a log of its own (an unreachable index, doctor's refusal, a missing toolkit, a lock
    held too long, a bundle that lacks a file): its message, the fix and any evidence line go into the step's
    log, the step is recorded as failed, and last-failed names that log, so `invoke diagnose` explains it."""
    if e.recorded:
        return
    log = ctx.log(step)
    log.parent.mkdir(parents=True, exist_ok=True)
    fresh = started is not None and log.exists() and log.stat().st_mtime >= started  # written by this attempt
    lines = [] if fresh else [f"# {step}: failed before it ran a command"]
    lines += [
        x
        for x in (e.evidence, f"ERROR: {e.message}", f"Fix: {e.fix}" if e.fix else None)
        if x
    ]
    refused = []  # a record the machine refused (a full disk): the failure stays the message, the step failed
    try:
        with open(log, "a" if fresh else "w") as fh:
            fh.write(mask("\n".join(lines)) + "\n")
    except OSError as err:
        refused.append(f"{log}: {err.strerror}")
    try:
        if step in BY_NAME:
            ctx.status.fail(step, str(log), e.message)
    except UsageError as err:  # the status file refused (core.status puts its record right first)
        refused.append(err.message)
    try:
        write_json(
            ctx.layout.last_failed,
            {
                "variant": ctx.name,
                "step": step,
                "log": str(log),
                "message": mask(e.message),
                "fix": mask(e.fix) if e.fix else None,
            },
        )
    except OSError as err:
        if not oserrors.refused(err):
            raise
        refused.append(f"{ctx.layout.last_failed}: {err.strerror}")
    if refused:  # the machine's refusal is the message (exit 2); the failure it was recording follows it
        err = UsageError(
            f"{'; '.join(r.rstrip('.') for r in refused)}. It was recording: {e.message}",
            f"Free space on the disk that holds {ctx.layout.state} (`df -h {ctx.layout.state}`) or make "
            "it writable, then run the command again.",
        )
        err.recorded = True  # as far as the machine lets it be
        raise err from None
    e.recorded = True


def _tree_gone(ctx: Ctx, step: str) -> str | None:
    """The tree a step just made or used, when it is no longer there."""
    if step in ("fetch", "prepare"):
        s = ctx.status.step("fetch") or {}
        src = s.get("source") if step == "prepare" else None
        return src if src and not Path(src).is_dir() else None
    return None if ctx.py.exists() else str(ctx.py)


# ------------------------------------------------------------------------------------------ drivers


@contextmanager
def _locked(ctx: Ctx):
    """The variant's lock: a second run waits for it (naming the holder), or fails at once with --no-wait.
    The status is read again once the lock is held: the run we waited for has changed it."""
    with locks.held(ctx.layout.lock(ctx.name), f"variant {ctx.name}", wait=not ctx.options.no_wait,
                    say=ctx.say):
        ctx.status = Status(ctx.layout.status(ctx.name), ctx.name, GRAPH)
        yield


@contextmanager
def _recorded(ctx: Ctx, what: str):
    """Failures outside a step (waiting for the lock, doctor's refusal) recorded for diagnose too."""
    started = time.time()
    try:
        yield
    except HarnessError as e:
        if what == "lock" and e.kind != LOCK_HELD:
            what = "start"  # no interpreter, a bundle refused, ...; a step run out of order is not recorded
        if not e.recorded and e.kind != STEP_ORDER:
            record_failure(ctx, what, e, started=started)
        raise


def _use_bundle(ctx: Ctx) -> None:
    """--from-bundle: the bundle checked (variant, target, every file's sha256) before anything is installed;
    pip and uv then see only its wheels (steps/bundle.use)."""
    if ctx.options.bundle is None or ctx.bundle_env is not None:
        return
    with _recorded(ctx, "bundle"):
        ctx.bundle_env = bundle.use(ctx, ctx.options.bundle)["env"]
    ctx.base_env.update(ctx.bundle_env)
    ctx.say(f"[dim]· bundle        {ctx.options.bundle}: pip and uv use only its wheels (no index, no "
            "network)[/]")


def require(ctx: Ctx, step: str) -> None:
    """Refuse a single step whose inputs have not been made (a step run out of order)."""
    mode = ctx.variant.vllm["mode"]
    if not BY_NAME[step].applies_to(mode):
        raise UsageError(
            f"Step '{step}' does not apply to variant {ctx.name} (mode = '{mode}').",
            f"Its steps are: {', '.join(s.name for s in steps_for(mode))}.", kind=STEP_ORDER,
        )
    for prev in needs(step, mode):
        st = ctx.status.step(prev)
        if not st or st.get("status") != "ok":
            raise UsageError(
                f"Step '{step}' needs step '{prev}' first for variant {ctx.name}.",
                f"Run `invoke {BY_NAME[prev].task} --variant {ctx.name}` or `nox -s build-{ctx.name}`.",
                kind=STEP_ORDER,
            )


def _interpreter(ctx: Ctx) -> pythons.Interpreter:
    """The recorded interpreter of a good env, or a newly discovered one."""
    env_step = ctx.status.step("env")
    if (
        ctx.options.force
        or not env_step
        or env_step.get("status") != "ok"
        or not ctx.py.exists()
        or ctx.options.python
        or not ctx.variant.python_spec.contains(env_step.get("python_version", "0"))
    ):
        return pythons.find(ctx.variant.python, ctx.options.python, ctx.base_env, what=f"variant {ctx.name}")
    return pythons.Interpreter(
        path=env_step["python"],
        version=env_step["python_version"],
        executable=env_step["python"],
        origin="recorded",
        has_headers=True,
    )


def run_single(ctx: Ctx, step: str, **kw) -> dict:
    """One step, as an invoke task runs it: checked for order, locked, recorded."""
    with _recorded(ctx, "lock"), _locked(ctx):
        _use_bundle(ctx)
        if not ctx.py.exists():  # env deleted (by hand, or cleaned): nothing recorded in it can be trusted
            ctx.status.invalidate("env")
        group = TASKS[BY_NAME[step].task] if step in BY_NAME else [step]
        require(ctx, group[0])
        interp = _interpreter(ctx) if "env" in group else None
        keys = keys_of(ctx, _interp_key(ctx, interp))
        for s in group:
            _run(ctx, BY_NAME[s], keys[s], interp, **(kw if s == step else {}))
        return ctx.status.step(step) or {}


def _interp_key(ctx: Ctx, interp: pythons.Interpreter | None) -> str:
    if interp is not None:
        return f"{interp.executable}:{interp.version}"
    s = ctx.status.step("env") or {}
    return f"{s.get('python')}:{s.get('python_version')}"


def build_variant(ctx: Ctx, allow_no_gpu: bool = True, skip_doctor: bool = False) -> dict:
    """The whole flow of ``nox -s build-<variant>``; steps that are done with the same inputs are reused."""
    with _recorded(ctx, "lock"), _locked(ctx):
        _use_bundle(ctx)
        # every step's key, once per interpreter (the walk of a path source and of patches/ is not free): the
        # recorded interpreter's keys decide whether doctor runs and are the build's when it is kept
        keys_for = functools.cache(lambda interp_key: keys_of(ctx, interp_key))
        if not skip_doctor and not _nothing_to_build(ctx, keys_for):
            with _recorded(ctx, "doctor"):
                doctor_run.preflight(ctx)
        interp = _interpreter(ctx)
        if not ctx.py.exists():  # env deleted by hand: nothing in it can be trusted
            ctx.status.invalidate("env")
        keys = keys_for(_interp_key(ctx, interp))
        for declared in steps_for(ctx.variant.vllm["mode"]):
            step = declared.name
            kw = {"allow_no_gpu": allow_no_gpu} if step == "verify" else {}
            key = _verify_key(ctx, allow_no_gpu) if step == "verify" else keys[step]
            if key is None:  # verified earlier with these very inputs
                continue
            if step == "torch" and (ctx.options.force or not ctx.status.is_done(step, key)):
                start_wheel_download(ctx)  # wheel mode: vLLM's wheel downloads beside torch (build checks it)
            _run(ctx, declared, key, interp, **kw)
            if step == "post-install":
                ctx.status.set_built(True)
                ctx.layout.last_built.parent.mkdir(parents=True, exist_ok=True)
                ctx.layout.last_built.write_text(
                    f"{ctx.name}\n{ctx.variant.path}\n"
                )  # a file given by path too
        return ctx.status.data


def _nothing_to_build(ctx: Ctx, keys_for) -> bool:
    """Every step before verify is done with today's inputs (the recorded interpreter, the same keys): the
    preflight guards slow work and there is none, so doctor is skipped (said so; --force runs it).  verify
    still compares the GPUs and driver with those it proved."""
    env = ctx.status.step("env") or {}
    if ctx.options.force or ctx.options.python or env.get("status") != "ok" or not ctx.py.exists():
        return False
    keys = keys_for(_interp_key(ctx, None))
    if not all(ctx.status.is_done(s.name, keys[s.name]) for s in steps_for(ctx.variant.vllm["mode"])
               if s.name != "verify"):
        return False
    ctx.say(
        f"[dim]· {'doctor':<13} skipped: every step is done with these inputs (`invoke doctor --variant "
        f"{ctx.name}` runs it; a step to redo runs it first)[/]"
    )
    return True


def _verify_key(ctx: Ctx, allow_no_gpu: bool) -> str | None:
    """verify's key from what it proves (the env's distributions, GPUs, driver, checks:
    steps/verify.proof_of),
    None when the recorded result proved the same inputs (printed as such; --reverify runs it again)."""
    proof = verify_step.proof_of(ctx, {})
    ctx.verify_proof = proof
    s = verify_step.reusable(ctx, proof, allow_no_gpu)
    if s is None:
        return proof["key"]
    from rich.markup import escape

    ctx.say(f"[dim]· {'verify':<13} {escape(verify_step.reused_line(s))}[/]")
    return None


def explain_failure(log: Path, context: dict | None, quiet: bool = False) -> dict | None:
    """Run diagnose on a failed step's log and print its top finding.  Returns the report dict."""
    try:
        report = diagnose.diagnose_path(str(log), context=context)
    except Exception as e:  # diagnose must never hide the real failure
        print(f"  (diagnose could not read the log: {e})", file=sys.stderr)
        return None
    data = report.to_dict()
    if quiet:
        return data
    con = console()
    if data["findings"]:
        top = data["findings"][0]
        con.print(f"  [red bold]{top['id']}[/] (log line {top['line']}): {mask(top['evidence'])}")
        con.print(f"  cause: {top['cause']}")
        con.print(f"  [bold]fix:[/] {top['fix']}")
        more = len(data["findings"]) - 1
        if more:
            con.print(f"  (+{more} more: invoke diagnose --log {rel_path(log)})")
    else:
        con.print("  diagnose: no known failure recognised; the first error lines:")
        for n, line in (data.get("first_error_lines") or [])[:8]:
            con.print(f"  {n:>6}: {mask(line)[:160]}", markup=False)
    return data
