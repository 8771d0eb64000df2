"""Get a vLLM source tree for a variant: a PyPI sdist (sha256 checked, cached), a git ref (clone cache), a
local sdist archive, or a local path.

The tree lands in ``.harness/src/<variant>/`` (a local path is copied there unless the variant says
``in_place = true``), so the harness never edits a checkout the user did not hand over.  Provenance
(where from, hash or commit, whether it came from the cache) is written beside it in ``provenance.json``.

Caches, all under ``.harness/cache/`` and safe to copy to another machine:

* ``sdist/vllm-<version>.tar.gz`` (+ ``.sha256``, written only after the hash matched PyPI's): a cached,
  verified sdist is used without asking PyPI again (release files never change).
* ``git/<name>-<hash>.git``: one bare repository per URL; each ref fetched is kept as
  ``refs/harness/<ref>``.  A tag or a commit id already in the cache is used without the network; a branch
  is fetched again, and the cached commit is used (and said so) when the remote cannot be reached.

Whatever cannot be reached gives one message: what, why, and how to supply it offline.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import re
import shutil
import subprocess
import tarfile
import time
from pathlib import Path

from vllm_harness.core import gitcmd, safeio
from vllm_harness.core.errors import StepFailed, UsageError
from vllm_harness.core.fetcher import Fetcher, FetchError
from vllm_harness.core.runner import write_json
from vllm_harness.facts.source_tree import git_env
from vllm_harness.steps.context import Ctx

PYPI_JSON = os.environ.get("VLLM_HARNESS_PYPI_JSON", "https://pypi.org/pypi/{name}/{version}/json")
PYPI_SIMPLE = os.environ.get("VLLM_HARNESS_PYPI_SIMPLE", "https://pypi.org/simple/{name}/")
COPY_IGNORE = shutil.ignore_patterns("build", "dist", ".deps", "*.egg-info", "*.so", "__pycache__", ".git")


# ------------------------------------------------------------------------------------- --source override

def parse_source(text: str) -> dict:
    """``invoke fetch --source``: what it names, as [vllm] keys that replace the variant's.

    ``sdist`` / ``sdist:0.8.5``  -> the PyPI sdist (of the variant's version, or the one given)
    ``URL@REF`` (https://, ssh://, git://, file://, git@host:path, git+https://) -> a git ref
    ``/path/vllm-0.8.5.tar.gz``  -> a local sdist archive (offline machines)
    ``/path/to/tree``            -> a local source tree (copied into .harness/src/)
    """
    s = text.strip()
    if not s:
        raise UsageError("--source is empty.", "Give a path, a git URL@ref, or 'sdist'.")
    m = re.fullmatch(r"(?:sdist|pypi|pypi-sdist)(?:[:=]=?(?P<version>[\w.+!-]+))?", s)
    if m:
        out = {"source": "pypi-sdist"}
        if m.group("version"):
            out["version"] = m.group("version")
        return out
    if s.startswith("git+"):
        s = s[4:]
    if re.match(r"^(https?|ssh|git|file)://", s) or re.match(r"^[\w.-]+@[\w.-]+:", s):
        url, ref = _split_ref(s)
        gitcmd.check_url(url, f"--source {text}")
        if ref is not None:
            gitcmd.check_ref(ref, f"--source {text}")
        return {"source": "git", "git": url, "ref": ref}
    p = Path(s).expanduser()
    if p.is_file() and (p.name.endswith((".tar.gz", ".tgz", ".tar"))):
        return {"source": "sdist-file", "path": str(p.resolve())}
    if p.is_dir():
        return {"source": "path", "path": str(p.resolve()), "in_place": False}
    raise UsageError(f"--source {text}: no such directory or sdist archive, and not a git URL.",
                     "Give a vLLM source folder, a vllm-X.tar.gz, a git URL with @ref "
                     "(https://github.com/vllm-project/vllm.git@v0.8.5), or 'sdist'.")


def _split_ref(s: str) -> tuple[str, str | None]:
    """``URL@REF`` -> (URL, REF); the '@' of ``git@host:`` or ``user@host/`` is not a ref separator."""
    i = s.rfind("@")
    if i > 0:
        left, ref = s[:i], s[i + 1:]
        complete = (re.match(r"^\w+://[^/]*/.+", left) or re.match(r"^[\w.-]+@[\w.-]+:.+", left))
        if complete and ref and not ref.startswith("/"):
            return left, ref
    return s, None


def override(variant, parsed: dict):
    """A copy of the (already validated) variant with a parsed ``--source`` as its source, for this run only;
    the variant itself is never edited."""
    vllm = {**variant.vllm, **parsed}
    if parsed["source"] == "git" and not parsed.get("ref"):
        vllm["ref"] = None  # fall back to v<version>
    return dataclasses.replace(variant, vllm=vllm)


# --------------------------------------------------------------------------------------- PyPI sdists

def _unreachable(what: str, reason, offline_fix: str) -> StepFailed:
    return StepFailed(f"fetch: cannot reach {what} ({reason}).", offline_fix)


def _sdist_offline_fix(name: str, version: str, cache: Path) -> str:
    return (f"Check the network/proxy, or supply it offline: on a machine with network run "
            f"`pip download {name}=={version} --no-deps --no-binary :all: -d DIR`, then copy "
            f"{name}-{version}.tar.gz into {cache}/ (or pass --source /path/to/{name}-{version}.tar.gz, "
            f"or --source <an unpacked vLLM tree>).")


JSON_MAX = 64 << 20      # a PyPI JSON answer (vllm's simple page is ~1 MB)
SDIST_MAX = 4 << 30      # a vLLM sdist is ~30 MB


def get_json(url: str, accept: str | None = None, timeout: int = 30):
    """One bounded GET (core.fetcher: http/https only, a deadline, a size cap) parsed as JSON."""
    fetcher = Fetcher(deadline_s=None, max_requests=8, timeout_s=timeout, request_deadline_s=4 * timeout)
    return json.loads(fetcher.get(url, max_bytes=JSON_MAX, headers={"Accept": accept} if accept else None))


def _reason(e: BaseException) -> str:
    return str(getattr(e, "reason", None) or e)


def sdist_info(name: str, version: str, cache: Path | None = None) -> dict:
    """{"url", "sha256", "filename"} of the sdist: PyPI's JSON API, else its simple index (PEP 691 JSON),
    which is what some mirrors and proxies serve when the JSON API is not there."""
    from packaging.utils import canonicalize_name, parse_sdist_filename
    from packaging.version import InvalidVersion, Version
    cache = cache or Path(".harness/cache/sdist")
    errors = []
    try:
        meta = get_json(PYPI_JSON.format(name=name, version=version))
        for f in meta.get("urls", []):
            if f.get("packagetype") == "sdist":
                return {"url": f["url"], "sha256": f["digests"]["sha256"], "filename": f["filename"]}
        raise UsageError(f"PyPI has no sdist for {name} {version}.", "Use source = 'git' with a ref.")
    except FetchError as e:
        errors.append(f"JSON API: {e.reason}")
    except (OSError, ValueError) as e:
        errors.append(f"JSON API: {_reason(e)}")
    url = PYPI_SIMPLE.format(name=canonicalize_name(name))
    try:
        index = get_json(url, accept="application/vnd.pypi.simple.v1+json")
    except FetchError as e:
        if e.status == 404:
            raise UsageError(f"PyPI has no project {name}.", "Check [vllm].package in the variant.") from None
        raise _unreachable(f"PyPI for {name} {version}", f"{'; '.join(errors)}; simple index: {e.reason}",
                           _sdist_offline_fix(name, version, cache)) from None
    except (OSError, ValueError) as e:
        raise _unreachable(f"PyPI for {name} {version}", f"{'; '.join(errors)}; simple index: {_reason(e)}",
                           _sdist_offline_fix(name, version, cache)) from None
    try:
        want = Version(version)
    except InvalidVersion:
        raise UsageError(f"{version!r} is not a version.", "Check [vllm].version.") from None
    for f in index.get("files", []):
        fn = f.get("filename", "")
        if not fn.endswith((".tar.gz", ".zip")):
            continue
        try:
            _, ver = parse_sdist_filename(fn)
        except ValueError:
            continue
        if ver == want and f.get("hashes", {}).get("sha256"):
            return {"url": f["url"], "sha256": f["hashes"]["sha256"], "filename": fn}
    versions = index.get("versions") or []
    if version not in versions:
        raise UsageError(f"PyPI has no {name} {version}.", "Check [vllm].version in the variant.")
    raise UsageError(f"PyPI has no sdist for {name} {version}.", "Use source = 'git' with a ref.")


_sha256_file = safeio.sha256_file


def _download(url: str, dest: Path, sha256: str | None, offline_fix: str = "") -> None:
    fetcher = Fetcher(deadline_s=None, max_requests=8, timeout_s=60, request_deadline_s=3600)
    try:   # streamed to a temporary file beside dest, sha256 checked, then renamed (core.fetcher)
        fetcher.download(url, dest, max_bytes=SDIST_MAX, sha256=sha256)
    except FetchError as e:
        if e.kind == "sha256":
            raise StepFailed(f"fetch: {e.url} has sha256 {e.digest}, PyPI says {sha256}.", e.fix) from None
        raise _unreachable(e.url, e.reason, offline_fix or "Check the network or proxy, or download the "
                           "sdist elsewhere and pass --source /path/to/it.") from None
    except OSError as e:
        raise _unreachable(url, _reason(e), offline_fix or "Check the network or proxy, or download the "
                           "sdist elsewhere and pass --source /path/to/it.") from None


def cached_sdist(cache: Path, name: str, version: str) -> tuple[Path | None, str | None]:
    """(archive, sha256 it was verified with) of a cached sdist; (archive, None) for one put there by hand."""
    for cand in (cache / f"{name}-{version}.tar.gz", cache / f"{name.replace('-', '_')}-{version}.tar.gz"):
        if cand.is_file():
            side = cand.with_name(cand.name + ".sha256")
            want = side.read_text().split()[0] if side.is_file() else None
            return cand, want
    return None, None


def fetch_sdist(name: str, version: str, cache: Path, force: bool = False) -> tuple[Path, dict]:
    """The sdist archive in the cache, downloaded and checked against PyPI's sha256 when needed."""
    cache.mkdir(parents=True, exist_ok=True)
    archive, verified = cached_sdist(cache, name, version)
    if archive and verified and not force:
        digest = _sha256_file(archive)
        if digest == verified:
            return archive, {"sha256": digest, "verified": True, "from_cache": True}
    try:
        info = sdist_info(name, version, cache)
    except StepFailed as e:
        if archive is None:
            raise
        digest = _sha256_file(archive)
        if verified and digest == verified:  # --force without network: the copy checked earlier
            return archive, {
                "sha256": digest,
                "verified": True,
                "from_cache": True,
                "note": f"PyPI unreachable ({e.message}); the cached copy was checked when downloaded",
            }
        # put there by hand for an offline machine: used, and said so
        return archive, {
            "sha256": digest,
            "verified": False,
            "from_cache": True,
            "note": f"PyPI unreachable ({e.message}); sha256 not checked against PyPI",
        }
    archive = cache / info["filename"]
    side = archive.with_name(archive.name + ".sha256")
    if force or not archive.is_file() or _sha256_file(archive) != info["sha256"]:
        _download(info["url"], archive, info["sha256"], _sdist_offline_fix(name, version, cache))
        from_cache = False
    else:
        from_cache = True
    side.write_text(info["sha256"] + "\n")
    return archive, {"url": info["url"], "sha256": info["sha256"], "verified": True, "from_cache": from_cache}


def _safe_extract(tar: tarfile.TarFile, dest: Path) -> None:
    dest = dest.resolve()
    for m in tar.getmembers():
        target = (dest / m.name).resolve()
        if not str(target).startswith(str(dest) + os.sep) and target != dest:
            raise StepFailed(
                f"fetch: archive member {m.name!r} points outside the source folder.",
                "Do not use this archive.",
            )
        if m.issym() or m.islnk():
            link = (target.parent / m.linkname).resolve()
            if not str(link).startswith(str(dest)):
                raise StepFailed(
                    f"fetch: archive link {m.name!r} points outside the source folder.",
                    "Do not use this archive.",
                )
        if m.isdev():
            raise StepFailed(
                f"fetch: archive member {m.name!r} is a device file.", "Do not use this archive."
            )
    if hasattr(tarfile, "data_filter"):
        tar.extractall(dest, filter="data")
    else:  # pragma: no cover - Python < 3.11.4
        tar.extractall(dest)


def unpack(archive: Path, base: Path) -> Path:
    if base.exists():
        shutil.rmtree(base)
    base.mkdir(parents=True)
    try:
        with tarfile.open(archive) as tar:
            _safe_extract(tar, base)
    except (tarfile.TarError, OSError, EOFError) as e:
        raise StepFailed(
            f"fetch: {archive} is not a readable sdist ({e}).", f"Delete {archive} and fetch again."
        ) from None
    dirs = [d for d in base.iterdir() if d.is_dir()]
    if len(dirs) != 1:
        raise StepFailed(f"fetch: {archive.name} did not unpack to one folder.", "Use source = 'path'.")
    return dirs[0]


# ------------------------------------------------------------------------------------------- git


def _git(
    args: list[str], env: dict[str, str], cwd: Path | None = None, timeout: int = gitcmd.GIT_TIMEOUT
) -> subprocess.CompletedProcess:
    return gitcmd.run(args, env, cwd=cwd, timeout=timeout)


def _last_line(r: subprocess.CompletedProcess) -> str:
    lines = [x for x in (r.stderr or "").strip().splitlines() if x.strip()]
    return lines[-1] if lines else f"exit {r.returncode}"


def _slug(url: str) -> str:
    tail = re.sub(r"\.git$", "", url.rstrip("/").rsplit("/", 1)[-1].rsplit(":", 1)[-1]) or "repo"
    tail = re.sub(r"[^A-Za-z0-9._-]", "_", tail)[:40]
    return f"{tail}-{hashlib.sha256(url.encode()).hexdigest()[:10]}"


def _ref_name(ref: str) -> str:
    return "refs/harness/" + re.sub(r"[^A-Za-z0-9._/-]", "_", ref).strip("/").replace("..", "_")


def _fetch_head(cache: Path) -> tuple[str | None, str]:
    """(object id, kind) from FETCH_HEAD: kind is tag, branch or commit."""
    try:
        line = (cache / "FETCH_HEAD").read_text().splitlines()[0]
    except (OSError, IndexError):
        return None, "commit"
    sha = line.split("\t", 1)[0].strip()
    kind = "tag" if "\ttag '" in line or "\t\ttag '" in line else "branch" if "branch '" in line else "commit"
    return sha, kind


def git_mirror_ref(url: str, ref: str, cache_root: Path, env: dict[str, str], force: bool = False) -> dict:
    """Make ``ref`` of ``url`` available in the bare clone cache; return {"cache", "commit", "kind", ...}."""
    gitcmd.check_url(url, "[vllm].git")
    gitcmd.check_ref(ref, "[vllm].ref")
    cache_root.mkdir(parents=True, exist_ok=True)
    cache = cache_root / f"{_slug(url)}.git"
    genv = git_env(env, [cache])
    if not (cache / "HEAD").is_file():
        tmp = cache.with_name(cache.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        r = _git(["init", "--bare", "-q", "--", str(tmp)], genv)
        if r.returncode != 0:
            raise StepFailed(f"fetch: cannot make the git cache {cache}: {_last_line(r)}", None)
        os.replace(tmp, cache)
    local = _ref_name(ref)
    meta_file = cache / "harness-refs.json"
    try:
        meta = json.loads(meta_file.read_text())
    except (OSError, ValueError):
        meta = {}
    have = _git(
        ["--git-dir", str(cache), "rev-parse", "--verify", "-q", "--end-of-options", local + "^{commit}"],
        genv,
    ).stdout.strip()
    known = meta.get(ref, {})
    immutable = known.get("kind") == "tag" or (gitcmd.HEX_RE.match(ref) and have.startswith(ref))
    if have and immutable and not force:
        return {
            "cache": str(cache),
            "commit": have,
            "kind": known.get("kind", "commit"),
            "from_cache": True,
            "local_ref": local,
        }
    r = _git(["--git-dir", str(cache), "fetch", "--depth", "1", "--no-tags", "--", url, ref], genv)
    if r.returncode != 0 and gitcmd.HEX_RE.match(ref):
        # a server that does not serve unadvertised commits: take its branches and tags, then look again
        r = _git(
            [
                "--git-dir",
                str(cache),
                "fetch",
                "--no-tags",
                "--",
                url,
                "+refs/heads/*:refs/harness-remote/heads/*",
                "+refs/tags/*:refs/harness-remote/tags/*",
            ],
            genv,
        )
        if r.returncode == 0:
            full = _git(
                [
                    "--git-dir",
                    str(cache),
                    "rev-parse",
                    "--verify",
                    "-q",
                    "--end-of-options",
                    ref + "^{commit}",
                ],
                genv,
            )
            if full.returncode != 0:
                raise UsageError(f"{url} has no commit {ref}.", "Check the ref.")
            (cache / "FETCH_HEAD").write_text(f"{full.stdout.strip()}\t\t{url}\n")
    if r.returncode != 0:
        err = _last_line(r)
        if have:
            return {
                "cache": str(cache),
                "commit": have,
                "kind": known.get("kind", "branch"),
                "from_cache": True,
                "local_ref": local,
                "note": f"{url} unreachable ({err}); using the cached commit fetched "
                f"{known.get('fetched_at', 'earlier')}",
            }
        if re.search(r"couldn't find remote ref|not our ref|no such ref|invalid refspec", err, re.I):
            raise UsageError(
                f"{url} has no ref {ref!r} ({err}).",
                "Check [vllm].ref (a tag like v0.8.5, a branch or a commit id).",
            )
        raise _unreachable(
            f"{url} for ref {ref}",
            err,
            f"Check the network/proxy (a mirror: GIT_CONFIG_COUNT with url.<mirror>.insteadOf), "
            f"or supply it offline: copy {cache_root} from a machine where `invoke fetch` of this "
            f"ref worked, or clone it there and pass --source <the clone>.",
        )
    sha, kind = _fetch_head(cache)
    commit = _git(
        ["--git-dir", str(cache), "rev-parse", "--verify", "-q", "--end-of-options", f"{sha}^{{commit}}"],
        genv,
    ).stdout.strip()
    _git(["--git-dir", str(cache), "update-ref", "--", local, commit], genv)
    meta[ref] = {"commit": commit, "kind": kind, "url": url, "fetched_at": time.strftime("%Y-%m-%dT%H:%M:%S")}
    meta_file.write_text(json.dumps(meta, indent=2))
    return {"cache": str(cache), "commit": commit, "kind": kind, "from_cache": False, "local_ref": local}


def checkout_from_cache(mirror: dict, ref: str, url: str, dest: Path, env: dict[str, str]) -> None:
    """A working tree at the cached commit (no network): init, fetch from the local cache, check out."""
    if dest.exists():
        shutil.rmtree(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    genv = git_env(env, [dest, Path(mirror["cache"])])
    for args in (
        ["init", "-q", "--", str(dest)],
        ["-C", str(dest), "fetch", "-q", "--no-tags", "--", mirror["cache"], mirror["local_ref"]],
        ["-C", str(dest), "checkout", "-q", "--detach", mirror["commit"]],
    ):
        r = _git(args, genv)
        if r.returncode != 0:
            raise StepFailed(
                f"fetch: git {args[2] if args[0] == '-C' else args[0]} in {dest} failed: {_last_line(r)}",
                f"Delete {mirror['cache']} and fetch again.",
            )
    _git(["-C", str(dest), "remote", "add", "--", "origin", url], genv)
    if mirror["kind"] == "tag":  # setuptools-scm reads the version from the tag (v0.8.5 -> 0.8.5)
        _git(["-C", str(dest), "tag", "--", ref, mirror["commit"]], genv)


def fetch_git(
    url: str, ref: str, dest: Path, cache_root: Path, env: dict[str, str], force: bool = False
) -> dict:
    mirror = git_mirror_ref(url, ref, cache_root, env, force=force)
    checkout_from_cache(mirror, ref, url, dest, env)
    prov = {
        "from": "git",
        "url": url,
        "ref": ref,
        "commit": mirror["commit"],
        "kind": mirror["kind"],
        "cache": mirror["cache"],
        "from_cache": mirror["from_cache"],
    }
    if mirror.get("note"):
        prov["note"] = mirror["note"]
    return prov


def _path_provenance(src: Path, env: dict[str, str]) -> dict:
    """The commit (and whether it is dirty) of a tree the user handed over, read with ``gitcmd.inspect``:
    no ``safe.directory`` for it, its configured commands off, and no git at all in a tree another user
    owns (git refuses it, and so does the harness: the copy is made without its ``.git``)."""
    out: dict = {}
    r = gitcmd.inspect(src, ["rev-parse", "--show-toplevel", "HEAD"], env, timeout=60)
    if r.returncode == 0 and len(r.stdout.split()) >= 2:
        top, head = r.stdout.split()[:2]
        out["git_commit"] = head
        dirty = gitcmd.inspect(src, ["status", "--porcelain", "--untracked-files=no"], env, timeout=120)
        out["git_dirty"] = bool(dirty.stdout.strip()) if dirty.returncode == 0 else None
        if Path(top).resolve() != src.resolve():
            out["git_toplevel"] = top
    elif gitcmd.DUBIOUS in (r.stderr or ""):
        out["git_not_read"] = (
            f"{_last_line(r)}; the harness adds no safe.directory for a tree it did not "
            "make and runs no git in it, so its commit was not read (a copy is made "
            "without its .git)"
        )
    return out


# ------------------------------------------------------------------------------------------- fetch


def _refuse_enclosing(src: Path, layout) -> None:
    """A ``path`` source is copied into the state folder (or built in place): one that is ``/`` or holds
    the state folder or the harness checkout would copy the copy into itself."""
    real = src.resolve()
    for what, inner in (
        ("the harness's state folder", layout.state.resolve()),
        ("the harness checkout", layout.root.resolve()),
    ):
        if real == Path(real.anchor) or real == inner or real in inner.parents:
            raise UsageError(
                f"vLLM source path {src} is / or contains {what} ({inner}): it cannot be the source tree.",
                "Point [vllm].path (or --source) at the vLLM checkout itself, e.g. path = '../vllm'.",
            )


def fetch(variant, layout, env: dict[str, str], force: bool = False) -> tuple[Path, dict]:
    """Return (source dir, provenance)."""
    v = variant.vllm
    base = layout.src(variant.name)
    when = time.strftime("%Y-%m-%dT%H:%M:%S")
    if v["source"] == "path":
        src = Path(v["path"]) if Path(v["path"]).is_absolute() else variant.source_path()
        if not src or not src.is_dir():
            raise UsageError(f"vLLM source path {src} is not a directory.", "Fix [vllm].path or --source.")
        _refuse_enclosing(src, layout)
        if v["in_place"]:
            prov = {"from": "path", "path": str(src), "in_place": True, **_path_provenance(src, env)}
            prov["fetched_at"] = when
            return src, prov
        dest = base / src.name
        if base.exists():
            shutil.rmtree(base)
        base.mkdir(parents=True, exist_ok=True)
        shutil.copytree(src, dest, symlinks=True, ignore=COPY_IGNORE)
        prov = {"from": "path", "path": str(src), "copied_to": str(dest), **_path_provenance(src, env)}
    elif v["source"] == "git":
        ref = v["ref"] or f"v{v['version']}"
        if base.exists():
            shutil.rmtree(base)
        dest = base / f"vllm-{re.sub(r'[^A-Za-z0-9._-]', '_', ref)}"
        prov = fetch_git(v["git"], ref, dest, layout.cache / "git", env, force=force)
    elif v["source"] == "sdist-file":
        archive = Path(v["path"])
        dest = unpack(archive, base)
        prov = {"from": "sdist-file", "path": str(archive), "sha256": _sha256_file(archive)}
    else:
        archive, info = fetch_sdist(v["package"], v["version"], layout.cache / "sdist", force=force)
        dest = unpack(archive, base)
        prov = {
            "from": "pypi-sdist",
            "package": v["package"],
            "version": v["version"],
            "archive": str(archive),
            **info,
        }
    prov["fetched_at"] = when
    write_json(base / "provenance.json", prov)
    return dest, prov


# ------------------------------------------------------------------------------------ git trust (env)


def do_fetch(ctx: Ctx, log: Path) -> dict:
    src, prov = fetch(ctx.variant, ctx.layout, ctx.base_env, force=ctx.options.force)
    log.parent.mkdir(parents=True, exist_ok=True)
    log.write_text(json.dumps(prov, indent=2) + "\n")
    where = prov.get("commit") or prov.get("sha256", "")[:16]
    return {
        "source": str(src),
        "provenance": prov,
        "note": f"{src} ({prov['from']}{', ' + where if where else ''}"
                f"{', cached' if prov.get('from_cache') else ''})",
    }
