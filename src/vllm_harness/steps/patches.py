"""Patches to vLLM source trees, per vLLM version range (``patches/*.patch`` + a ``*.toml`` sidecar).

A sidecar says which releases the patch is for, why, and where upstream stands::

    patch = "0001-use-existing-torch-exact-match.patch"   # default: the sidecar's name with .patch
    versions = ">=0.6.2,<0.11.1"                           # a PEP 440 specifier (required)
    why = "..."                                            # required
    upstream = "..."                                       # required: the upstream fix / PR / issue
    needed_if = { file = "use_existing_torch.py", contains = "'torch' not in line.lower()" }   # optional

``prepare`` applies them in name order.  Each gets one status:

* ``applied``          -- it applied cleanly now (``git apply --check``, then ``git apply``);
* ``already-applied``  -- its reverse applies: the tree has it (a second prepare, or a hand-patched tree);
* ``not-needed``       -- the vLLM version is outside ``versions``, or ``needed_if`` does not hold;
* ``failed``           -- it claims this version but neither applies; the detail names the hunk.

``git apply`` runs through ``core.gitcmd`` (the tree's configured commands and filter drivers off, no
``safe.directory``: an ``in_place`` tree is the user's), inside the tree only (``GIT_CEILING_DIRECTORIES``);
without git, ``patch --dry-run`` / ``patch`` do the same.
``check_releases`` (``invoke patches``) tries every patch against every PyPI release its range claims.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import tarfile
import tempfile
from dataclasses import dataclass
from pathlib import Path

from packaging.specifiers import InvalidSpecifier, SpecifierSet
from packaging.version import InvalidVersion, Version

from vllm_harness.core import gitcmd, procs, safeio
from vllm_harness.core.errors import UsageError
from vllm_harness.core.fetcher import Fetcher, FetchError
from vllm_harness.steps.fetch import PYPI_SIMPLE, SDIST_MAX, get_json

STATUSES = ("applied", "already-applied", "not-needed", "failed")


@dataclass(frozen=True)
class Patch:
    name: str
    path: Path
    meta: Path
    versions: SpecifierSet
    why: str
    upstream: str
    needed_if: dict | None

    @property
    def files(self) -> list[str]:
        return patched_files(self.path.read_text(errors="replace"))

    def claims(self, version: str | None) -> bool:
        if version is None:
            return True
        try:
            return self.versions.contains(Version(version), prereleases=True)
        except InvalidVersion:
            return True


def patched_files(text: str) -> list[str]:
    out = []
    for m in re.finditer(r"^\+\+\+ (?:b/)?(\S+)", text, re.MULTILINE):
        if m.group(1) != "/dev/null" and m.group(1) not in out:
            out.append(m.group(1))
    return out


def _bad(meta: Path, key: str, problem: str, fix: str) -> UsageError:
    return UsageError(f"{meta}: key '{key}': {problem}.", fix)


def load_patch(meta: Path) -> Patch:
    data = safeio.load_toml(meta, "Patch record", fix="Correct the TOML syntax.")
    known = {"patch", "versions", "why", "upstream", "needed_if"}
    for k in data:
        if k not in known:
            raise _bad(meta, k, "is not a known key", f"use {', '.join(sorted(known))}")
    for k in ("versions", "why", "upstream"):
        if not isinstance(data.get(k), str) or not data[k].strip():
            raise _bad(meta, k, "is missing or empty", f'add {k} = "..."')
    try:
        spec = SpecifierSet(data["versions"])
    except InvalidSpecifier:
        raise _bad(
            meta,
            "versions",
            f"{data['versions']!r} is not a version specifier",
            "write e.g. '>=0.6.2,<0.11.1'",
        ) from None
    patch = meta.with_name(data.get("patch") or meta.stem + ".patch")
    if patch.parent != meta.parent or not patch.is_file():
        raise _bad(
            meta, "patch", f"{patch.name} does not exist beside it", "name the .patch file in patches/"
        )
    nif = data.get("needed_if")
    if nif is not None:
        if (
            not isinstance(nif, dict)
            or not isinstance(nif.get("file"), str)
            or not (isinstance(nif.get("contains"), str) or isinstance(nif.get("regex"), str))
        ):
            raise _bad(
                meta,
                "needed_if",
                "must be a table with file and contains (or regex)",
                'write needed_if = { file = "path", contains = "text" }',
            )
    if not patched_files(patch.read_text(errors="replace")):
        raise _bad(meta, "patch", f"{patch.name} names no file (+++ b/...)", "give a unified diff")
    return Patch(
        name=patch.stem,
        path=patch.resolve(),
        meta=meta.resolve(),
        versions=spec,
        why=data["why"].strip(),
        upstream=data["upstream"].strip(),
        needed_if=nif,
    )


def load_patches(folder: Path) -> list[Patch]:
    if not folder.is_dir():
        return []
    return [load_patch(m) for m in sorted(folder.glob("*.toml"))]


# ---------------------------------------------------------------------------------------------- apply


def _env(src: Path, env: dict[str, str]) -> dict[str, str]:
    """No safe.directory (an ``in_place`` tree is the user's: another user's stays refused by git), the
    tree's filter drivers emptied, never a repository around the tree."""
    out = gitcmd.tree_env(src, env) if _tool() == "git" else dict(env)
    out["GIT_CEILING_DIRECTORIES"] = str(src.resolve().parent)  # never patch a repository around the tree
    return out


def _tool() -> str:
    if shutil.which("git"):
        return "git"
    if shutil.which("patch"):
        return "patch"
    raise UsageError("Neither git nor patch is installed: patches cannot be applied.", "Install git.")


def _try(
    patch: Path, src: Path, env: dict[str, str], reverse: bool, check: bool
) -> subprocess.CompletedProcess:
    if _tool() == "git":
        args = (
            ["apply", "-p1", "--whitespace=nowarn"]
            + (["--reverse"] if reverse else [])
            + (["--check"] if check else [])
            + ["--", str(patch)]
        )
        return gitcmd.run(args, env, cwd=src, timeout=120)
    argv = (
        ["patch", "-p1", "--batch", "--silent", "--no-backup-if-mismatch", "-i", str(patch)]
        + (["--reverse"] if reverse else ["--forward"])
        + (["--dry-run"] if check else [])
    )
    return procs.run(argv, cwd=src, env=env, capture_output=True, text=True, timeout=120)


def failing_hunks(patch_text: str, errors: str) -> str:
    """The hunks git/patch names as failing (``patch failed: FILE:LINE``), else every hunk of the files."""
    hunks: list[tuple[str, int, str]] = []
    cur_file = None
    parts = re.split(r"(?m)^(?=@@ |--- )", patch_text)
    for part in parts:
        m = re.match(r"--- (?:a/)?(\S+)", part)
        if m:
            cur_file = re.search(r"^\+\+\+ (?:b/)?(\S+)", part, re.MULTILINE)
            cur_file = cur_file.group(1) if cur_file else m.group(1)
            continue
        h = re.match(r"@@ -(\d+)", part)
        if h and cur_file:
            hunks.append((cur_file, int(h.group(1)), part.rstrip("\n")))
    named = re.findall(r"patch failed: (\S+):(\d+)", errors)
    picked = [t for f, n, t in hunks if (f, str(n)) in {(a, b) for a, b in named}]
    if not picked:
        files = set(re.findall(r"error: (\S+): patch does not apply", errors)) or {f for f, _, _ in hunks}
        picked = [t for f, n, t in hunks if f in files]
    return "\n".join(picked)


def needed(patch: Patch, src: Path) -> tuple[bool, str]:
    nif = patch.needed_if
    if not nif:
        return True, ""
    f = src / nif["file"]
    if not f.is_file():
        return False, f"{nif['file']} is not in this tree"
    text = f.read_text(errors="replace")
    if "contains" in nif and nif["contains"] not in text:
        return False, f"{nif['file']} does not contain {nif['contains']!r}"
    if "regex" in nif and not re.search(nif["regex"], text, re.MULTILINE):
        return False, f"{nif['file']} does not match {nif['regex']!r}"
    return True, ""


def status(patch: Patch, src: Path, version: str | None, env: dict[str, str], apply: bool = True) -> dict:
    """Apply one patch to the tree (or only check it, ``apply=False``); the contract's status dict."""
    out = {"name": patch.name, "versions": str(patch.versions)}
    if not patch.claims(version):
        return {**out, "status": "not-needed", "reason": f"vLLM {version} is outside {patch.versions}"}
    genv = _env(src, env)
    is_needed, why_not = needed(patch, src)
    if not is_needed:
        rev = _try(patch.path, src, genv, reverse=True, check=True)
        if rev.returncode == 0:
            return {**out, "status": "already-applied", "reason": "its reverse applies"}
        return {**out, "status": "not-needed", "reason": why_not}
    fwd = _try(patch.path, src, genv, reverse=False, check=True)
    if fwd.returncode == 0:
        if apply:
            done = _try(patch.path, src, genv, reverse=False, check=False)
            if done.returncode != 0:
                return {
                    **out,
                    "status": "failed",
                    "reason": (done.stderr or done.stdout).strip(),
                    "hunk": failing_hunks(patch.path.read_text(errors="replace"), done.stderr or ""),
                }
            return {**out, "status": "applied", "files": patch.files}
        return {**out, "status": "applied", "files": patch.files, "dry_run": True}
    rev = _try(patch.path, src, genv, reverse=True, check=True)
    if rev.returncode == 0:
        return {**out, "status": "already-applied", "reason": "its reverse applies"}
    err = (fwd.stderr or fwd.stdout).strip()
    return {
        **out,
        "status": "failed",
        "reason": err.splitlines()[-1] if err else "does not apply",
        "errors": err,
        "hunk": failing_hunks(patch.path.read_text(errors="replace"), err),
    }


def apply_all(
    patches: list[Patch], src: Path, version: str | None, env: dict[str, str], apply: bool = True
) -> list[dict]:
    return [status(p, src, version, env, apply=apply) for p in patches]


# --------------------------------------------------------------------------- check against releases


def release_versions(name: str = "vllm") -> list[tuple[str, str]]:
    """(version, sdist URL) of every non-pre-release sdist on PyPI (the simple index, PEP 691 JSON)."""
    from packaging.utils import parse_sdist_filename

    index = get_json(PYPI_SIMPLE.format(name=name), accept="application/vnd.pypi.simple.v1+json")
    out = {}
    for f in index.get("files", []):
        fn = f.get("filename", "")
        if not fn.endswith(".tar.gz"):
            continue
        try:
            _, ver = parse_sdist_filename(fn)
        except ValueError:
            continue
        if not ver.is_prerelease and not ver.is_devrelease:
            out[str(ver)] = f["url"]
    return sorted(out.items(), key=lambda kv: Version(kv[0]))


def release_files(url: str, version: str, wanted: list[str], cache: Path) -> Path:
    """The files ``wanted`` (tree-relative) of one sdist, streamed out of it (the rest is not kept)."""
    dest = cache / version
    done = dest / ".complete"
    if done.is_file():
        return dest
    shutil.rmtree(dest, ignore_errors=True)
    dest.mkdir(parents=True)
    left = set(wanted)
    fetcher = Fetcher(deadline_s=None, max_requests=8, timeout_s=60, request_deadline_s=1800)
    try:  # core.fetcher: http/https only, a deadline, the sdist's size capped while streaming
        with fetcher.stream(url, max_bytes=SDIST_MAX) as r, tarfile.open(fileobj=r, mode="r|gz") as tar:
            for m in tar:
                rel = m.name.split("/", 1)[1] if "/" in m.name else ""
                if rel in left and m.isfile():
                    target = dest / rel
                    target.parent.mkdir(parents=True, exist_ok=True)
                    target.write_bytes(tar.extractfile(m).read())
                    left.discard(rel)
                    if not left:
                        break
    except FetchError as e:
        raise UsageError(
            f"patch check: cannot read the vLLM {version} sdist at {e.url} ({e.reason}).", e.fix
        ) from None
    done.write_text("\n".join(sorted(set(wanted) - left)) + "\n")
    return dest


def check_releases(patches: list[Patch], cache: Path, env: dict[str, str], versions=None, log=print) -> dict:
    """Try every patch against every release it claims (network: PyPI).  A claimed release where the
    patch neither applies nor is already there is a failure; one where ``needed_if`` does not hold is
    reported as a range that claims too much."""
    releases = versions if versions is not None else release_versions()
    results = []
    for p in patches:
        wanted = sorted(set(p.files) | ({p.needed_if["file"]} if p.needed_if else set()))
        for ver, url in releases:
            if not p.claims(ver):
                continue
            files = release_files(url, ver, wanted, cache)
            with tempfile.TemporaryDirectory(prefix="patch-check-") as tmp:
                tree = Path(tmp) / f"vllm-{ver}"
                shutil.copytree(files, tree, ignore=shutil.ignore_patterns(".complete"))
                st = status(p, tree, ver, env, apply=True)
                if st["status"] == "applied":  # and a second run finds it there
                    st["second_run"] = status(p, tree, ver, env, apply=True)["status"]
            results.append({"patch": p.name, "version": ver, **{k: v for k, v in st.items() if k != "name"}})
            log(
                f"{p.name:<48} {ver:<12} {st['status']}"
                + (f"  ({st.get('reason')})" if st.get("reason") else "")
            )
    bad = [
        r
        for r in results
        if r["status"] == "failed" or r.get("second_run", "already-applied") != "already-applied"
    ]
    over = [r for r in results if r["status"] == "not-needed"]
    return {
        "results": results,
        "failed": bad,
        "claims_too_much": over,
        "ok": not bad,
        "releases_checked": len({r["version"] for r in results}),
    }
