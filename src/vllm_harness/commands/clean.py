"""clean: remove what the harness made, and nothing else.

Per variant: its build leftovers (``build/``, ``dist/``, ``*.egg-info``, ``.deps`` in its source tree -- the
source document's "stale build state"), its venv, status, logs and source copy.  ``--all``: every variant
and the download cache.  Never follows a symlink out of a managed tree, never deletes a path outside
``.harness/``, touches the user's pip cache only with ``--pip-cache`` (and then through ``pip cache purge``).
"""

from __future__ import annotations

import os
import shutil
import sys
from contextlib import ExitStack, contextmanager
from pathlib import Path

from vllm_harness.commands.common import layout_of, print_json, variant_of
from vllm_harness.core import locks, procs
from vllm_harness.core.errors import EXIT_OK, UsageError
from vllm_harness.core.layout import Layout
from vllm_harness.facts.machine import uv_bin
from vllm_harness.steps import wheelhouse as wheelhouse_mod

STALE = ("build", "dist", ".deps")


def _inside(path: Path, trees: list[Path]) -> bool:
    # resolve the parent, not the path itself: a symlink in a managed tree is removed as a link
    p = path.parent.resolve() / path.name
    return any(p == t or t in p.parents for t in (x.resolve() for x in trees))


def _size(path: Path) -> int:
    if path.is_symlink() or path.is_file():
        try:
            return path.lstat().st_size
        except OSError:
            return 0
    total = 0
    for root, _dirs, files in os.walk(path, followlinks=False):
        for f in files:
            try:
                total += (Path(root) / f).lstat().st_size
            except OSError:
                pass
    return total


def plan(layout: Layout, variant: str | None, everything: bool, wheelhouse: bool = False) -> list[Path]:
    """What clean removes.  The wheelhouse (built wheels), the compiler cache and the recorded peak RSS are
    kept by a per-variant clean; ``wheelhouse`` adds the variant's wheels (every wheel without a variant),
    ``everything`` (--all) takes them all."""
    st = layout.state
    layout.check()  # refuses /, home, the checkout, and any folder the harness did not make
    if not st.exists():
        return []
    if not layout.is_state_folder():
        raise UsageError(
            f"{st} is not a harness state folder (no {Layout.MARKER} record): clean deletes nothing there.",
            "Point VLLM_HARNESS_STATE at the folder the harness made, or unset it.",
        )
    if everything:
        return [
            p
            for p in [
                st / "envs",
                st / "src",
                st / "logs",
                st / "status",
                st / "cache",
                st / "wheelhouse",
                st / "buildspeed",
                layout.last_failed,
                layout.last_built,
            ]
            if p.exists() or p.is_symlink()
        ]
    if wheelhouse and not variant:
        return wheelhouse_mod.paths_of_variant(st, None)
    if not variant:
        raise UsageError(
            "clean needs --variant NAME or --all.", "Pass one of them (add --dry-run to look first)."
        )
    out = []
    src = layout.src(variant)
    if src.is_dir() and not src.is_symlink():
        for tree in [d for d in src.iterdir() if d.is_dir() and not d.is_symlink()]:
            for name in STALE:
                if (tree / name).exists() or (tree / name).is_symlink():
                    out.append(tree / name)
            out += [p for p in tree.glob("*.egg-info")]
    out += [
        p
        for p in (
            layout.venv(variant),
            layout.constraints(variant),
            layout.status(variant),
            layout.logs(variant),
            src,
        )
        if p.exists() or p.is_symlink()
    ]
    if wheelhouse:
        out += wheelhouse_mod.paths_of_variant(st, variant)
    # drop children of folders already listed
    out = [p for p in out if not any(q != p and q in p.parents for q in out)]
    return out


def uv_cache(dry_run: bool) -> tuple[str, int]:
    """uv's own cache (outside the state folder: UV_CACHE_DIR, else ~/.cache/uv): its path and size, cleared
    with ``uv cache clean`` unless ``dry_run``.  Only with ``--uv-cache``."""
    uv = uv_bin()
    if not uv:
        return "uv cache (no uv found: nothing to clear)", 0
    r = procs.run([uv, "cache", "dir"], capture_output=True, text=True, timeout=60)
    where = Path(r.stdout.strip()) if r.returncode == 0 and r.stdout.strip() else None
    size = _size(where) if where is not None and where.exists() else 0
    if not dry_run:
        procs.run([uv, "cache", "clean"], capture_output=True, timeout=1800)
    return f"uv cache ({where or 'uv cache dir failed'}; uv cache clean)", size


def clean(
    layout: Layout,
    variant: str | None = None,
    everything: bool = False,
    dry_run: bool = False,
    pip_cache: bool = False,
    python: str | None = None,
    wheelhouse: bool = False,
    uv: bool = False,
) -> dict:
    targets = plan(layout, variant, everything, wheelhouse)
    removed, kept, total = [], [], 0
    for p in targets:
        if not _inside(p, layout.managed_trees()):
            kept.append(str(p))  # never reached in practice: plan() only lists managed paths
            continue
        total += _size(p)
        removed.append(str(p))
        if dry_run:
            continue
        if p.is_symlink() or p.is_file():
            p.unlink()
        else:
            shutil.rmtree(p)
    if pip_cache:
        cmd = [python or "python3", "-m", "pip", "cache", "purge"]
        removed.append("pip cache (pip cache purge)")
        if not dry_run:
            procs.run(cmd, capture_output=True, timeout=600)
    if uv:
        what, size = uv_cache(dry_run)
        removed.append(what)
        total += size
    return {"removed": removed, "kept": kept, "bytes": total, "dry_run": dry_run}


@contextmanager
def locked(layout: Layout, variant: str | None, everything: bool, wait: bool, say):
    """Every lock clean needs, all of them taken before anything is deleted; with ``wait=False`` a held one is
    a refusal (StepFailed) and nothing is deleted.  ``--all``: the state folder's gate exclusively (no harness
    run inside a lock, none entering one: a variant started while clean waited is waited for, never deleted
    under it), then every lock file there (a holder outside the harness).  A variant: its bundle's lock (the
    bundle reads its source tree; bundle takes it first, so clean does too), then the variant's."""
    locks_dir = layout.state / "locks"  # where layout.lock() puts them
    with ExitStack() as held:
        if everything:
            held.enter_context(
                locks.everything(
                    locks_dir, "the state folder (every variant, the caches)", wait=wait, say=say
                )
            )
            for lock in sorted(locks_dir.glob("*.lock")):
                what = (
                    lock.stem.replace(locks.BUNDLE_PREFIX, "bundle of variant ", 1)
                    if lock.stem.startswith(locks.BUNDLE_PREFIX)
                    else f"variant {lock.stem}"
                )
                held.enter_context(locks.held(lock, what, wait=wait, say=say))
        elif variant:
            held.enter_context(
                locks.held(
                    locks.bundle_lock(locks_dir, variant), f"bundle of variant {variant}", wait=wait, say=say
                )
            )
            held.enter_context(locks.held(layout.lock(variant), f"variant {variant}", wait=wait, say=say))
        yield


def cmd_clean(a) -> int:
    layout = layout_of(a)
    name = None
    if a.variant and not a.all:
        name = variant_of(layout, a.variant).name  # a name or a path; an unknown one is an error, not a no-op
    with ExitStack() as held:
        if layout.is_state_folder():
            held.enter_context(
                locked(layout, name, a.all, wait=not a.no_wait, say=lambda t: print(t, file=sys.stderr))
            )
        res = clean(
            layout,
            name,
            a.all,
            a.dry_run,
            a.pip_cache,
            wheelhouse=getattr(a, "wheelhouse", False),
            uv=getattr(a, "uv_cache", False),
        )
    if a.json:
        print_json(a, res)
    else:
        verb = "would remove" if a.dry_run else "removed"
        for p in res["removed"]:
            print(f"{verb}: {p}")
        print(f"{verb} {len(res['removed'])} path(s), {res['bytes'] / 2**20:.1f} MiB")
    return EXIT_OK
