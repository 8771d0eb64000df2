"""Offline sources for what vLLM's CMake would download (CUTLASS, vllm-flash-attn, FlashMLA, QuTLASS,
triton_kernels, DeepGEMM, oneDNN, ...).

The list is read from the tree itself -- ``CMakeLists.txt`` and ``cmake/**/*.cmake``: every
``FetchContent_Declare(name ... GIT_REPOSITORY url GIT_TAG rev ...)`` and multi-argument
``FetchContent_Populate(name ... GIT_REPOSITORY ...)``, with ``${VAR}`` resolved from the files' ``set()``s
(``CUTLASS_REVISION``...), and the local-copy override each release reads (``VLLM_CUTLASS_SRC_DIR``,
``VLLM_FLASH_ATTN_SRC_DIR``, ``FLASH_MLA_SRC_DIR``, ``QUTLASS_SRC_DIR``, ``TRITON_KERNELS_SRC_DIR``,
``DEEPGEMM_SRC_DIR``, ``FETCHCONTENT_SOURCE_DIR_ONEDNN``, ``ACL_ROOT_DIR``...).

``fill`` clones each (name, revision) once into the cache -- ``.harness/cache/deps/<name>-<rev>/`` with its
submodules, plus ``manifest.json`` (relative paths only, so the folder can be copied to an air-gapped
machine, or pointed at with ``VLLM_HARNESS_DEPS_CACHE``).  ``build_env`` gives the build the cached copies:
the tree's own environment override where it has one; otherwise CMake's
``FETCHCONTENT_SOURCE_DIR_<NAME>``, through ``CMAKE_ARGS`` when the tree's setup.py passes it on, else
through a generated ``CMAKE_TOOLCHAIN_FILE`` (CMake >= 3.21 reads it from the environment).
"""

from __future__ import annotations

import json
import os
import platform
import re
import shutil
import subprocess
import time
from dataclasses import asdict
from pathlib import Path

from vllm_harness.core import gitcmd
from vllm_harness.core.errors import StepFailed
from vllm_harness.facts.source_tree import Dep, git_env, parse_deps, submodule_dirs

GIT_TIMEOUT = 3600


# ---------------------------------------------------------------------------------------------- parse


# ---------------------------------------------------------------------------------------------- cache

def cache_root(layout, env: dict[str, str] | None = None) -> Path:
    env = os.environ if env is None else env
    return Path(env.get("VLLM_HARNESS_DEPS_CACHE") or (layout.cache / "deps")).resolve()


def read_deps_manifest(root: Path) -> dict:
    try:
        return json.loads((root / "manifest.json").read_text())
    except (OSError, ValueError):
        return {}


def save_deps_manifest(root: Path, data: dict) -> None:
    root.mkdir(parents=True, exist_ok=True)
    tmp = root / "manifest.json.tmp"
    tmp.write_text(json.dumps(data, indent=2, sort_keys=True))
    os.replace(tmp, root / "manifest.json")


def cached_dir(root: Path, dep: Dep) -> Path | None:
    entry = read_deps_manifest(root).get(dep.key)
    if entry:
        d = root / entry["dir"]
        if d.is_dir():
            return d
    return None


def _git(args: list[str], env: dict[str, str], cwd: Path | None = None) -> subprocess.CompletedProcess:
    return gitcmd.run(args, env, cwd=cwd, timeout=GIT_TIMEOUT)


def _err(r: subprocess.CompletedProcess) -> str:
    lines = [x for x in (r.stderr or "").strip().splitlines() if x.strip()]
    return lines[-1] if lines else f"exit {r.returncode}"


def fetch_one(dep: Dep, root: Path, env: dict[str, str], log=None, variant: str | None = None) -> Path:
    """Clone dep.url at dep.rev (with its submodules) into the cache; return its folder."""
    have = cached_dir(root, dep)
    if have:
        return have
    if not dep.url or not dep.rev or dep.unresolved:
        raise StepFailed(f"deps: {dep.name} ({dep.file}:{dep.line}) has no resolvable URL/revision "
                         f"(unresolved: {', '.join(dep.unresolved) or 'GIT_TAG'}).",
                         "Fetch it by hand into the cache and pass its override variable.")
    root.mkdir(parents=True, exist_ok=True)
    final = root / dep.dirname
    tmp = root / (dep.dirname + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    genv = git_env(env, [tmp, final], extra=[tmp / s for s in (dep.submodules or [])])
    gitcmd.check_url(dep.url, f"{dep.file}:{dep.line} ({dep.name})")
    gitcmd.check_ref(dep.rev, f"{dep.file}:{dep.line} ({dep.name})")
    steps = [["init", "-q", "--", str(tmp)], ["-C", str(tmp), "remote", "add", "--", "origin", dep.url]]
    for args in steps:
        r = _git(args, genv)
        if r.returncode != 0:
            raise StepFailed(f"deps: git {' '.join(args[:1])} for {dep.name} failed: {_err(r)}", None)
    r = _git(["-C", str(tmp), "fetch", "-q", "--depth", "1", "--", "origin", dep.rev], genv)
    if r.returncode != 0:  # a server that does not serve unadvertised commits: fetch everything, then look
        r = _git(
            ["-C", str(tmp), "fetch", "-q", "--tags", "--", "origin", "+refs/heads/*:refs/remotes/origin/*"],
            genv,
        )
        target = dep.rev
    else:
        target = "FETCH_HEAD"
    if r.returncode != 0:
        shutil.rmtree(tmp, ignore_errors=True)
        raise StepFailed(
            f"fetch: cannot reach {dep.url} for {dep.name} {dep.rev} ({_err(r)}).",
            f"This machine cannot fetch vLLM's CMake dependencies. On a machine that reaches GitHub "
            f"run `invoke fetch --variant {variant or '<name>'} --deps` and copy its {root} here (same "
            f"path, or "
            f"set VLLM_HARNESS_DEPS_CACHE to the copy).",
        )
    for args in (["-C", str(tmp), "checkout", "-q", "--detach", target],):
        r = _git(args, genv)
        if r.returncode != 0:
            shutil.rmtree(tmp, ignore_errors=True)
            raise StepFailed(
                f"deps: {dep.url} has no revision {dep.rev} ({_err(r)}).", "Check the tree's CMake pin."
            )
    if dep.submodules is None or dep.submodules:
        sub = ["-C", str(tmp), "submodule", "update", "--init", "--depth", "1"]
        sub += ["--recursive"] if dep.submodules is None else ["--", *dep.submodules]
        if (tmp / ".gitmodules").is_file():
            r = _git(sub, git_env(genv, [], extra=_all_submodule_paths(tmp)))
            if r.returncode != 0:
                r = _git(
                    [a for a in sub if a not in ("--depth", "1")],
                    git_env(genv, [], extra=_all_submodule_paths(tmp)),
                )
            if r.returncode != 0:
                shutil.rmtree(tmp, ignore_errors=True)
                raise StepFailed(
                    f"fetch: submodules of {dep.name} could not be fetched ({_err(r)}).",
                    "Check the network to GitHub, or copy a filled deps cache here.",
                )
    commit = _git(["-C", str(tmp), "rev-parse", "HEAD"], genv).stdout.strip()
    if re.fullmatch(r"[0-9a-f]{40}", dep.rev) and commit != dep.rev:
        shutil.rmtree(tmp, ignore_errors=True)
        raise StepFailed(f"deps: {dep.name} checked out {commit}, the tree pins {dep.rev}.", "Fetch again.")
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)
    man = read_deps_manifest(root)
    man[dep.key] = {
        "name": dep.name,
        "url": dep.url,
        "rev": dep.rev,
        "commit": commit,
        "dir": final.name,
        "submodules": dep.submodules,
        "fetched_at": time.strftime("%Y-%m-%dT%H:%M:%S"),
    }
    save_deps_manifest(root, man)
    if log:
        log(f"deps: {dep.name} {dep.rev} -> {final}")
    return final


def _all_submodule_paths(repo: Path) -> list[Path]:
    return submodule_dirs(repo, depth=3)


def select(deps: list[Dep], device: str = "cuda", every: bool = False) -> list[Dep]:
    """The dependencies a build for ``device`` uses: cmake/cpu_extension.cmake's for "cpu", the others for
    GPU builds; one declaration per name for this machine's arch unless ``every`` (a cache for others)."""
    cpu = [d for d in deps if d.file.endswith("cpu_extension.cmake")]
    mine = cpu if device == "cpu" else [d for d in deps if d not in cpu]
    return mine if every else _choose(mine)


def fill(
    src: Path,
    root: Path,
    env: dict[str, str],
    device: str = "cuda",
    every: bool = False,
    **fetch: object,
) -> dict:
    """Fetch the tree's dependencies into the cache (each once); {"cached": [...], "fetched": [...]}.
    ``fetch``: the keywords of :func:`fetch_one` (``log``, ``variant``)."""
    deps = select(parse_deps(src), device, every)
    out: dict = {"cache": str(root), "cached": [], "fetched": [], "deps": [asdict(d) for d in deps]}
    seen = set()
    for d in deps:
        if d.key in seen:
            continue
        seen.add(d.key)
        if cached_dir(root, d):
            out["cached"].append(d.key)
            continue
        fetch_one(d, root, env, **fetch)
        out["fetched"].append(d.key)
    return out


# ---------------------------------------------------------------------------------------- build env


def _arch_words() -> tuple[str, ...]:
    m = platform.machine().lower()
    return ("aarch64", "asimd", "arm") if m in ("aarch64", "arm64") else ("x86", "avx", "amd64")


def _choose(deps: list[Dep]) -> list[Dep]:
    """One declaration per name: the one whose if() names this machine's arch, else the first without one."""
    by: dict[str, list[Dep]] = {}
    for d in deps:
        by.setdefault(d.name.lower(), []).append(d)
    words = _arch_words()
    every = ("aarch64", "asimd", "arm", "x86", "avx", "amd64")
    out = []
    for group in by.values():
        conds = [d.condition.lower() for d in group]
        mine = [
            d for d, c in zip(group, conds, strict=True) if any(w in c for w in words) and "not (" not in c
        ]
        neutral = [d for d, c in zip(group, conds, strict=True) if not any(w in c for w in every)]
        out.append(mine[0] if mine else neutral[-1] if neutral else group[-1])
    return out


def setup_passes_cmake_args(src: Path) -> bool:
    try:
        return "CMAKE_ARGS" in (src / "setup.py").read_text(errors="replace")
    except OSError:
        return False


def build_env(src: Path, root: Path, workdir: Path, env: dict[str, str], device: str = "cuda") -> dict:
    """The build's environment additions that hand the cached copies to vLLM's CMake.

    Returns {"env": {...}, "from_cache": [names], "missing": [{name, url, rev}], "via": [...]}."""
    add: dict[str, str] = {}
    cmake_vars: dict[str, str] = {}
    used, missing = [], []
    for d in select(parse_deps(src), device):
        path = cached_dir(root, d)
        if path is None:
            missing.append({"name": d.name, "url": d.url, "rev": d.rev})
            continue
        used.append(d.name)
        target = path / d.subdir if (d.subdir and d.env_override) else path
        if d.env_override:
            add[d.env_override] = str(target)
        elif d.cmake_override:
            cmake_vars[d.cmake_override] = str(target)
        else:
            cmake_vars[f"FETCHCONTENT_SOURCE_DIR_{d.name.upper()}"] = str(path)
    via = ["environment"] if add else []
    if cmake_vars:
        if setup_passes_cmake_args(src):
            extra = " ".join(f"-D{k}={v}" for k, v in cmake_vars.items())
            add["CMAKE_ARGS"] = (env.get("CMAKE_ARGS", "") + " " + extra).strip()
            via.append("CMAKE_ARGS")
        else:  # setup.py of this release does not pass CMAKE_ARGS on: CMake reads a toolchain file from env
            workdir.mkdir(parents=True, exist_ok=True)
            tc = workdir / "harness-fetchcontent.cmake"
            lines = ["# written by vllm-harness: local sources for FetchContent (offline builds)\n"]
            if env.get("CMAKE_TOOLCHAIN_FILE"):
                lines.append(f'include("{env["CMAKE_TOOLCHAIN_FILE"]}")\n')
            lines += [f'set({k} "{v}")\n' for k, v in cmake_vars.items()]
            tc.write_text("".join(lines))
            add["CMAKE_TOOLCHAIN_FILE"] = str(tc)
            via.append("CMAKE_TOOLCHAIN_FILE")
    return {"env": add, "from_cache": used, "missing": missing, "via": via, "cache": str(root)}


def apply(ctx, src: Path, env: dict[str, str]) -> dict[str, str]:
    """The build step's environment with the cached dependency sources (and git trusting them)."""
    root = cache_root(ctx.layout, ctx.base_env)
    plan = build_env(src, root, ctx.layout.src(ctx.name), env, device=ctx.device)
    out = dict(env)
    out.update(plan["env"])
    if plan["from_cache"] or plan["missing"]:
        ctx.say(
            f"  deps: {len(plan['from_cache'])} from {root} ({', '.join(plan['from_cache']) or 'none'}"
            f"{'; via ' + ', '.join(plan['via']) if plan['via'] else ''})"
            + (
                f"; {len(plan['missing'])} fetched by CMake from the network: "
                f"{', '.join(m['name'] for m in plan['missing'])} (`invoke fetch --deps` caches them)"
                if plan["missing"]
                else ""
            )
        )
    dirs = [root / e["dir"] for e in read_deps_manifest(root).values()]
    return git_env(out, [], extra=dirs) if dirs else out
