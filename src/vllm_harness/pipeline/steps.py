"""The steps of a variant build, each declared once: its name, the steps whose results it uses, the modes it
runs in, what its input key is made of, the function that runs it, and the invoke task that runs it alone.

    fetch -> prepare -> env -> torch -> deps -> build -> post-install -> verify
    (fetch/prepare: source builds only; in wheel mode `build` installs the prebuilt wheel)

``pipeline.run`` iterates ``STEPS`` (the whole flow, a single task, the order check); the status file
(``core.status``) clears a step's dependents from ``GRAPH``; the invoke tasks that run steps
(``commands/table``, ``commands/steps``) are ``TASKS``.  A key chains the keys of the steps it depends on,
so a change to the variant's torch re-runs everything after torch, and a change to its post-install packages
re-runs only post-install and verify.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from vllm_harness.core.status import key_of
from vllm_harness.steps.build import do_build
from vllm_harness.steps.context import Ctx
from vllm_harness.steps.deps import do_deps
from vllm_harness.steps.env import do_env
from vllm_harness.steps.fetch import do_fetch
from vllm_harness.steps.post_install import do_post_install
from vllm_harness.steps.prepare import do_prepare
from vllm_harness.steps.torch_install import do_torch
from vllm_harness.steps.verify import do_verify

Keys = dict[str, str]


@dataclass(frozen=True)
class Step:
    name: str
    depends: tuple[str, ...]                   # the steps whose results it uses
    modes: tuple[str, ...]                     # the variant modes ([vllm] mode) it runs in
    key: Callable[[Ctx, Keys, str], str]       # (ctx, the earlier steps' keys, the interpreter) -> its key
    run: Callable[..., dict | None]            # (ctx, log, interpreter, **options) -> what it records
    task: str                                  # the invoke task running it (`invoke deps`: env, torch, deps)

    def applies_to(self, mode: str) -> bool:
        return mode in self.modes


def tree_stamp(root: Path | None) -> str:
    """A cheap fingerprint of a local source tree (names, sizes, mtimes), so edits to it are fetched again."""
    if root is None or not root.is_dir():
        return ""
    items = []
    for dirpath, dirs, files in os.walk(root):
        dirs[:] = [d for d in dirs
                   if d not in ("build", ".deps", ".git", "__pycache__") and not d.endswith(".egg-info")]
        for f in files:
            try:
                st = os.lstat(os.path.join(dirpath, f))
            except OSError:
                continue
            items.append((os.path.relpath(os.path.join(dirpath, f), root), st.st_size, st.st_mtime_ns))
    return key_of(sorted(items))


def _toolkit(ctx: Ctx) -> list[str]:
    """[build] toolkit = "pypi" installs the toolkit in deps; the default "system" leaves the keys as they
    were."""
    return [ctx.variant.build["toolkit"]] if ctx.variant.build["toolkit"] != "system" else []


def _fetch_key(ctx: Ctx, keys: Keys, interp: str) -> str:
    v = ctx.variant
    return key_of("fetch", v.vllm, tree_stamp(v.source_path()) if v.vllm["source"] == "path" else "")


def _prepare_key(ctx: Ctx, keys: Keys, interp: str) -> str:
    return key_of(keys["fetch"], "prepare-1", tree_stamp(ctx.layout.root / "patches"))  # patches too


def _env_key(ctx: Ctx, keys: Keys, interp: str) -> str:
    return key_of("env", 3, interp, ctx.variant.torch["preinstalled"], ctx.variant.installer)


def _torch_key(ctx: Ctx, keys: Keys, interp: str) -> str:
    return key_of(keys["env"], ctx.variant.torch)


def _deps_key(ctx: Ctx, keys: Keys, interp: str) -> str:
    v = ctx.variant
    return key_of(keys["torch"], keys.get("prepare", "") if v.vllm["mode"] == "source" else "", v.deps,
                  *_toolkit(ctx))


def _build_key(ctx: Ctx, keys: Keys, interp: str) -> str:
    v = ctx.variant
    build = {k: x for k, x in v.build.items() if k != "toolkit" or _toolkit(ctx)}
    return key_of(keys["deps"], build, ctx.options.jobs, ctx.options.arch, v.vllm["mode"])


def _post_install_key(ctx: Ctx, keys: Keys, interp: str) -> str:
    return key_of(keys["build"], ctx.variant.post_install)


def _verify_key(ctx: Ctx, keys: Keys, interp: str) -> str:
    return key_of(keys["post-install"], ctx.variant.verify)  # + what it proves: pipeline.run._verify_key


def _plain(fn: Callable[[Ctx, Path], dict | None]) -> Callable[..., dict | None]:
    """A step function of (ctx, log) as a Step's run."""
    return lambda ctx, log, interp, **kw: fn(ctx, log)


BOTH = ("source", "wheel")
STEPS: tuple[Step, ...] = (
    Step("fetch", (), ("source",), _fetch_key, _plain(do_fetch), "fetch"),
    Step("prepare", ("fetch",), ("source",), _prepare_key, _plain(do_prepare), "prepare"),
    Step("env", (), BOTH, _env_key, lambda ctx, log, interp, **kw: do_env(ctx, interp, log), "deps"),
    Step("torch", ("env",), BOTH, _torch_key, _plain(do_torch), "deps"),
    Step("deps", ("torch", "prepare"), BOTH, _deps_key, _plain(do_deps), "deps"),
    Step("build", ("deps",), BOTH, _build_key, _plain(do_build), "build"),
    Step("post-install", ("build",), BOTH, _post_install_key, _plain(do_post_install), "post-install"),
    Step("verify", ("post-install",), BOTH, _verify_key,
         lambda ctx, log, interp, **kw: do_verify(ctx, log, **kw), "verify"),
)
BY_NAME: dict[str, Step] = {s.name: s for s in STEPS}
GRAPH: dict[str, tuple[str, ...]] = {s.name: s.depends for s in STEPS}   # for core.status: what a step clears
TASKS: dict[str, list[str]] = {}                                          # invoke task -> the steps it runs
for _s in STEPS:
    TASKS.setdefault(_s.task, []).append(_s.name)


def steps_for(mode: str) -> list[Step]:
    """The steps a variant of this mode runs, in order."""
    return [s for s in STEPS if s.applies_to(mode)]


def keys_of(ctx: Ctx, interp: str) -> Keys:
    """Every step's input key for this run (each chains the keys of the steps before it)."""
    keys: Keys = {}
    for s in STEPS:
        keys[s.name] = s.key(ctx, keys, interp)
    return keys


def needs(step: str, mode: str) -> list[str]:
    """The steps ``step`` needs done first (its dependencies, and theirs), in order, for a variant of
    ``mode``."""
    order = [s.name for s in steps_for(mode)]
    found, todo = set(), list(GRAPH[step])
    while todo:
        d = todo.pop()
        if d in order and d not in found:
            found.add(d)
            todo += GRAPH[d]
    return [s for s in order if s in found]
