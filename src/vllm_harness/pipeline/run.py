"""The steps of a variant build, each one recorded in the variant's status so that reruns reuse what is good.

    fetch -> prepare -> env -> torch -> deps -> build -> post-install -> verify
    (fetch/prepare: source builds only; in wheel mode `build` installs the prebuilt wheel)

``build_variant`` (the ``build-<variant>`` nox session) runs doctor first and stops on an error finding
before anything slow, unless ``force``.  A single step (an invoke task) refuses to run before the step it
needs, with the command that fixes it.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from packaging.requirements import Requirement
from packaging.version import Version

from vllm_harness.core import locks
from vllm_harness.core.errors import HarnessError, StepFailed, UsageError
from vllm_harness.core.layout import Layout, venv_python
from vllm_harness.core.runner import explain_failure, run_commands, summary, write_json
from vllm_harness.core.status import DEPENDS, STEPS, Status, key_of
from vllm_harness.facts import pythons, toolkit
from vllm_harness.facts.variants import Variant
from vllm_harness.steps import fetch as fetch_mod
from vllm_harness.steps import prepare as prepare_mod
from vllm_harness.verify import checks as verify_mod


@dataclass
class Ctx:
    layout: Layout
    variant: Variant
    quiet: bool = False
    force: bool = False
    python: str | None = None            # --python override for the env step
    jobs: int | None = None
    arch: str | None = None
    no_wait: bool = False
    base_env: dict[str, str] = field(default_factory=lambda: dict(os.environ))
    profile: dict | None = None
    status: Status = field(init=False)

    def __post_init__(self):
        self.layout.ensure()
        self.status = Status(self.layout.status(self.variant.name), self.variant.name)

    @property
    def name(self) -> str:
        return self.variant.name

    @property
    def venv(self) -> Path:
        return self.layout.venv(self.name)

    @property
    def py(self) -> Path:
        return venv_python(self.venv)

    @property
    def device(self) -> str:
        return self.variant.build["env"].get("VLLM_TARGET_DEVICE", "cuda")

    def log(self, step: str) -> Path:
        return self.layout.logs(self.name) / f"{step}.log"

    def say(self, text: str) -> None:
        if not self.quiet:

            from vllm_harness.core.runner import console
            console().print(text)

    # ---- children's environment
    def env(self, cuda: bool = False, extra: dict[str, str] | None = None) -> dict[str, str]:
        home = Path(self.cuda_home()) if cuda else None
        scripts = (self.status.step("env") or {}).get("interpreter_scripts")
        return toolkit.child_env(self.base_env, self.venv, home, extra or {},
                                 drop_precompiled=self.variant.vllm["mode"] == "source",
                                 more_path=[scripts] if scripts else [])

    def cuda_home(self) -> str:
        if self.variant.build["toolkit"] == "pypi":  # the venv's own, installed by the deps step
            root = (self.status.step("deps") or {}).get("toolkit")
            if not root or not (Path(root) / "bin" / "nvcc").is_file():
                raise UsageError(f"Variant {self.name} takes its CUDA toolkit from PyPI ([build] toolkit = "
                                 f"\"pypi\"), and none is installed in {self.venv}.",
                                 f"Run `invoke deps --variant {self.name}` (or `nox -s build-{self.name}`).")
            return root
        toolkits = (self.profile or {}).get("machine", {}).get("cuda_toolkits") or toolkit.find_toolkits(self.base_env)
        if self.variant.cuda in toolkits:
            return toolkits[self.variant.cuda]
        have = ", ".join(f"{v} at {p}" for v, p in sorted(toolkits.items())) or "none"
        raise UsageError(f"No CUDA {self.variant.cuda} toolkit found for variant {self.name} (found: {have}).",
                         f"Install CUDA {self.variant.cuda} (e.g. /usr/local/cuda-{self.variant.cuda}) or set "
                         f"CUDA_HOME to its root.")

    # ---- installer
    def install_cmd(self, reqs: list[str], index_url: str | None = None, constraints: bool = True,
                    extra: list[str] | None = None) -> list[str]:
        if self.variant.installer == "uv" and _uv_bin():
            argv = [_uv_bin(), "pip", "install", "--python", str(self.py)]
        else:
            argv = [str(self.py), "-m", "pip", "install", "--progress-bar", "off"]
        if index_url:
            argv += ["--index-url", index_url]
        cfile = self.layout.constraints(self.name)
        if constraints and cfile.is_file():
            argv += ["--constraint", str(cfile)]
        return argv + (extra or []) + reqs


def _uv_bin() -> str | None:
    try:
        from uv import find_uv_bin
        return find_uv_bin()
    except Exception:
        return shutil.which("uv")


def installed_versions(py: Path, names: list[str], env: dict[str, str]) -> dict[str, str | None]:
    code = ("import json, importlib.metadata as m, sys\nout={}\nfor n in sys.argv[1:]:\n"
            "    try: out[n]=m.version(n)\n    except Exception: out[n]=None\nprint(json.dumps(out))")
    r = subprocess.run([str(py), "-c", code, *names], capture_output=True, text=True, env=env, timeout=120)
    if r.returncode != 0:
        return {n: None for n in names}
    return json.loads(r.stdout.strip().splitlines()[-1])


# ------------------------------------------------------------------------------------------- the steps

def _step_keys(ctx: Ctx, interp_key: str) -> dict[str, str]:
    v = ctx.variant
    keys = {}
    keys["fetch"] = key_of("fetch", v.vllm, _tree_stamp(v.source_path()) if v.vllm["source"] == "path" else "")
    keys["prepare"] = key_of(keys["fetch"], "prepare-1", _tree_stamp(ctx.layout.root / "patches"))  # patches too
    keys["env"] = key_of("env", 3, interp_key, v.torch["preinstalled"], v.installer)
    keys["torch"] = key_of(keys["env"], v.torch)
    # [build] toolkit = "pypi" installs the toolkit in deps; the default "system" leaves the keys as they were
    tk = [v.build["toolkit"]] if v.build["toolkit"] != "system" else []
    keys["deps"] = key_of(keys["torch"], keys["prepare"] if v.vllm["mode"] == "source" else "", v.deps, *tk)
    build = {k: x for k, x in v.build.items() if k != "toolkit" or tk}
    keys["build"] = key_of(keys["deps"], build, ctx.jobs, ctx.arch, v.vllm["mode"])
    keys["post-install"] = key_of(keys["build"], v.post_install)
    keys["verify"] = key_of(keys["post-install"], v.verify, time.time())  # verify always runs again
    return keys


def _tree_stamp(root: Path | None) -> str:
    """A cheap fingerprint of a local source tree (names, sizes, mtimes), so edits to it are fetched again."""
    if root is None or not root.is_dir():
        return ""
    items = []
    for dirpath, dirs, files in os.walk(root):
        dirs[:] = [d for d in dirs if d not in ("build", ".deps", ".git", "__pycache__") and not d.endswith(".egg-info")]
        for f in files:
            try:
                st = os.lstat(os.path.join(dirpath, f))
            except OSError:
                continue
            items.append((os.path.relpath(os.path.join(dirpath, f), root), st.st_size, st.st_mtime_ns))
    return key_of(sorted(items))


def steps_for(variant: Variant) -> list[str]:
    if variant.vllm["mode"] == "wheel":
        return [s for s in STEPS if s not in ("fetch", "prepare")]
    return list(STEPS)


def _run(ctx: Ctx, step: str, key: str, fn) -> None:
    if not ctx.force and ctx.status.is_done(step, key):
        s = ctx.status.step(step)
        ctx.say(f"[dim]· {step:<13} done earlier ({s.get('seconds', 0)}s), reused[/]")
        return
    ctx.status.start(step)
    log = ctx.log(step)
    t0 = time.monotonic()
    try:
        extra = fn(log) or {}
    except StepFailed as e:
        ctx.status.fail(step, e.log or str(log), e.message)
        summary(step, False, time.monotonic() - t0, Path(e.log) if e.log else None, quiet=ctx.quiet)
        if e.log:
            write_json(ctx.layout.last_failed, {"variant": ctx.name, "step": step, "log": e.log})
            report = explain_failure(Path(e.log), ctx.variant.fix_context(), quiet=ctx.quiet)
            if report and report["findings"] and not e.fix:
                e.fix = report["findings"][0]["fix"]
        raise
    except HarnessError as e:
        ctx.status.fail(step, None, e.message)
        raise
    except BaseException:  # Ctrl-C, SIGTERM, a bug: never leave the step looking done
        ctx.status.fail(step, str(log), "interrupted")
        raise
    secs = time.monotonic() - t0
    gone = _tree_gone(ctx, step)
    if gone:  # deleted under the step (by hand: clean waits for the variant's lock): never recorded as done
        ctx.status.fail(step, str(log) if log.exists() else None, f"{gone} disappeared during the step")
        raise StepFailed(f"{step}: {gone} disappeared while the step ran; the step is recorded as failed.",
                         f"Run it again (`nox -s build-{ctx.name}` resumes at this step).")
    ctx.status.finish(step, key, str(log) if log.exists() else None, secs, **extra)
    summary(step, True, secs, log if log.exists() else None, note=extra.get("note", ""), quiet=ctx.quiet)


def _tree_gone(ctx: Ctx, step: str) -> str | None:
    """The tree a step just made or used, when it is no longer there."""
    if step in ("fetch", "prepare"):
        s = ctx.status.step("fetch") or {}
        src = s.get("source") if step == "prepare" else None
        return src if src and not Path(src).is_dir() else None
    return None if ctx.py.exists() else str(ctx.py)


def do_env(ctx: Ctx, interp: pythons.Interpreter, log: Path) -> dict:
    v = ctx.variant
    if ctx.venv.exists():
        shutil.rmtree(ctx.venv)
    ctx.venv.parent.mkdir(parents=True, exist_ok=True)
    uv = _uv_bin()
    cmds = []
    if uv:
        # pip comes from the interpreter's own ensurepip: works offline (GPU servers often are)
        cmds = [[uv, "venv", "--python", interp.executable, str(ctx.venv)],
                [str(ctx.py), "-m", "ensurepip", "--default-pip"]]
    else:
        try:
            import virtualenv  # noqa: F401
            cmds = [[sys.executable, "-m", "virtualenv", "--python", interp.executable, str(ctx.venv)]]
        except ImportError:
            cmds = [[interp.executable, "-m", "venv", str(ctx.venv)]]
    env = toolkit.clean_env(ctx.base_env)
    try:
        try:
            run_commands("env", cmds, log, env, quiet=ctx.quiet)
        except StepFailed:
            if not (uv and ctx.py.exists()):
                raise
            # no ensurepip (Debian's python3 without python3-venv): let uv seed pip from the index
            run_commands("env", [[uv, "pip", "install", "--python", str(ctx.py), "pip"]], log, env,
                         quiet=ctx.quiet)
        scripts = _see_interpreter_packages(ctx, interp, env) if v.torch["preinstalled"] else None
    except BaseException:
        shutil.rmtree(ctx.venv, ignore_errors=True)
        raise
    return {"python": interp.executable, "python_version": interp.version, "interpreter_scripts": scripts,
            "note": f"Python {interp.version} ({interp.origin}: {interp.executable})"}


def _see_interpreter_packages(ctx: Ctx, interp: pythons.Interpreter, env: dict[str, str]) -> None:
    """preinstalled torch: the venv sees the interpreter's own site-packages (also when that interpreter is
    itself a venv or a conda env, where --system-site-packages would show the wrong ones), after its own."""
    code = "import json, sysconfig; p = sysconfig.get_paths(); print(json.dumps([p['scripts'], " \
           "sorted({p['purelib'], p['platlib']})]))"
    r = subprocess.run([interp.executable, "-c", code], capture_output=True, text=True, env=env, timeout=60)
    if r.returncode != 0:
        raise StepFailed(f"env: cannot read the site-packages of {interp.executable}.", "Pass another --python.")
    scripts, dirs = json.loads(r.stdout.strip().splitlines()[-1])
    site = subprocess.run([str(ctx.py), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                          capture_output=True, text=True, env=env, timeout=60).stdout.strip()
    Path(site, "_harness_interpreter_packages.pth").write_text("".join(d + "\n" for d in dirs))
    return scripts  # its tools (cmake, ninja from pip) go on the build's PATH after the venv's own


def _index_auth(url: str) -> tuple[str, str | None]:
    """(the URL without credentials, an Authorization header or None), found as pip and uv find them: the
    URL's own user information, else ~/.netrc (or $NETRC) for its host, else keyring where it is installed."""
    import base64
    from urllib.parse import urlsplit

    from vllm_harness.core.masking import strip_credentials
    bare, user, password = strip_credentials(url)
    host = urlsplit(bare).hostname or ""
    if user is not None and password is None:
        try:  # a token-only URL (https://token@host) is basic auth with an empty password, as pip sends it
            import keyring  # optional, as for pip's keyring support
            cred = keyring.get_credential(bare, user)
            password = cred.password if cred else None
        except Exception:  # noqa: BLE001 - no keyring, or a backend that fails: go on without it
            password = None
    if user is None and host:
        try:
            import netrc
            found = netrc.netrc(os.environ.get("NETRC") or None).authenticators(host)
            if found:
                user, password = found[0] or "", found[2] or ""
        except (OSError, netrc.NetrcParseError):
            pass
    if user is None:
        return bare, None
    token = base64.b64encode(f"{user}:{password or ''}".encode()).decode()
    return bare, f"Basic {token}"


def check_index(url: str | None, what: str, timeout: float = 15.0) -> None:
    """An index the variant names must answer before anything is installed from it (exit 2 otherwise).
    Credentials are sent as pip/uv send them (urllib alone would put them in the host name and fail)."""
    if not url or url.startswith("file://"):
        return
    import urllib.error
    import urllib.request

    from vllm_harness.core.runner import mask
    bare, auth = _index_auth(url)
    req = urllib.request.Request(bare.rstrip("/") + "/", headers={"Authorization": auth} if auth else {})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            r.read(1)
    except urllib.error.HTTPError as e:
        if e.code in (401, 403) and auth is None:
            return  # it answered; pip/uv may hold credentials this check does not (a keyring provider)
        if e.code in (401, 403):
            raise UsageError(f"The index {mask(url)} for {what} refused the credentials (HTTP {e.code}).",
                             "Check the user and token in the URL, ~/.netrc or the keyring.") from None
        if e.code < 500:
            return  # it answered: a 404 on the index root says nothing about the packages
        raise UsageError(f"The index {mask(url)} for {what} answered HTTP {e.code}.",
                         "Retry later or point index_url at a mirror.") from None
    except (urllib.error.URLError, OSError, ValueError) as e:
        raise UsageError(f"Cannot reach the index {mask(url)} for {what} ({mask(str(getattr(e, 'reason', e)))}).",
                         "Check the network or proxy (HTTPS_PROXY); offline, download the wheels elsewhere and set "
                         "UV_FIND_LINKS/PIP_FIND_LINKS to their folder, or set index_url to a reachable mirror.") from None


def do_torch(ctx: Ctx, log: Path) -> dict:
    v = ctx.variant
    env = ctx.env()
    names = [Requirement(r).name for r in v.torch["packages"]]
    if not v.torch["preinstalled"]:
        check_index(v.torch["index_url"], f"{ctx.variant.path.name} [torch]")
        cmd = ctx.install_cmd(v.torch["packages"], v.torch["index_url"], constraints=False)
        run_commands("torch", [cmd], log, env, quiet=ctx.quiet)
    have = installed_versions(ctx.py, names, env)
    if not have.get("torch"):
        raise StepFailed(f"torch: no torch in {ctx.venv} after this step.",
                         "The interpreter has no torch; set preinstalled = false." if v.torch["preinstalled"]
                         else None, log=str(log) if log.exists() else None)
    base = have["torch"].split("+")[0]
    if base != v.torch["version"]:
        raise StepFailed(f"torch: {have['torch']} is installed, the variant names torch {v.torch['version']}.",
                         "Give the interpreter the variant's torch or fix [torch].version.")
    pins = [f"{n}=={ver}" for n, ver in have.items() if ver]
    pins += [r for r in v.deps["packages"] if Requirement(r).name.lower() == "numpy"]
    cfile = ctx.layout.constraints(ctx.name)
    cfile.write_text("# written by the harness: every later install in this env keeps these\n" + "\n".join(pins) + "\n")
    return {"versions": have, "note": ", ".join(pins)}


def do_fetch(ctx: Ctx, log: Path) -> dict:
    src, prov = fetch_mod.fetch(ctx.variant, ctx.layout, ctx.base_env, force=ctx.force)
    log.parent.mkdir(parents=True, exist_ok=True)
    log.write_text(json.dumps(prov, indent=2) + "\n")
    where = prov.get("commit") or prov.get("sha256", "")[:16]
    return {"source": str(src), "provenance": prov,
            "note": f"{src} ({prov['from']}{', ' + where if where else ''}{', cached' if prov.get('from_cache') else ''})"}


def source_dir(ctx: Ctx) -> Path:
    s = ctx.status.step("fetch")
    if not s or s.get("status") != "ok":
        raise UsageError(f"Variant {ctx.name} has no fetched source yet.",
                         f"Run `invoke fetch --variant {ctx.name}` (or `nox -s build-{ctx.name}`).")
    return Path(s["source"])


def do_prepare(ctx: Ctx, log: Path, src: Path | None = None) -> dict:
    src = src or source_dir(ctx)
    if log.exists():
        log.unlink()
    env = toolkit.clean_env(ctx.base_env)
    result = prepare_mod.prepare(src, Path(sys.executable), log, env, version=ctx.variant.vllm["version"],
                                 patches_dir=ctx.layout.root / "patches")
    n = len(result["changed"])
    result["note"] = f"{result['how']}: {n} file(s) changed" if n else f"{result['how']}: nothing to change"
    applied = [p["name"] + (" (already applied)" if p["status"] == "already-applied" else "")
               for p in result["patches"] if p["status"] in ("applied", "already-applied")]
    if applied:
        result["note"] += f"; patches: {', '.join(applied)}"
    return result


def do_deps(ctx: Ctx, log: Path) -> dict:
    v = ctx.variant
    cmds = []
    reqs = list(v.deps["packages"])
    if v.vllm["mode"] == "source":
        src = source_dir(ctx)
        files = prepare_mod.build_requirement_files(src)
        build_args = [a for f in files for a in ("-r", str(f))]
        if not files:
            reqs += prepare_mod.build_system_requires(src)
        runtime = prepare_mod.runtime_requirement_files(src, ctx.device)
        build_args += [a for f in runtime for a in ("-r", str(f))]
        cmds.append(ctx.install_cmd(reqs, v.deps["index_url"], extra=build_args))
    elif reqs:
        cmds.append(ctx.install_cmd(reqs, v.deps["index_url"]))
    tk_reqs, tk_why = [], ""
    if v.vllm["mode"] == "source" and v.build["toolkit"] == "pypi":
        # NVIDIA's toolkit wheels at the CUDA release the venv's torch pins (toolkit.pypi_requirements)
        torch_version, requires = toolkit.torch_requires(ctx.py, ctx.env())
        tk_reqs, tk_why = toolkit.pypi_requirements(v.cuda, requires, torch_version)
        cmds.append(ctx.install_cmd(tk_reqs, v.deps["index_url"]))
    if cmds:
        run_commands("deps", cmds, log, ctx.env(), quiet=ctx.quiet)
    tk = _pypi_toolkit(ctx, log, tk_reqs, tk_why) if tk_reqs else {}
    _torch_kept(ctx, log)
    return {"note": f"{len(reqs)} extra requirement(s)" + tk.pop("note", ""), **tk}


def _pypi_toolkit(ctx: Ctx, log: Path, reqs: list[str], why: str) -> dict:
    """[build] toolkit = "pypi", after its wheels are installed: where they landed (the build's CUDA_HOME), the
    links a build needs there (inside the venv only), and a check that nothing a build needs is missing."""
    root = toolkit.pypi_root(ctx.py, ctx.env(), ctx.variant.cuda)
    from vllm_harness.facts.machine import toolkit_missing
    if root is None:
        raise StepFailed(f"deps: {' '.join(reqs)} installed no nvidia/cu{ctx.variant.cuda.split('.')[0]}/bin/nvcc "
                         f"in {ctx.venv}.", "Read the log; set toolkit = \"system\" to use an installed toolkit.",
                         log=str(log))
    links = toolkit.link_pypi_toolkit(root, ctx.venv)
    missing = toolkit_missing(root, ctx.variant.cuda)
    with open(log, "a") as fh:
        fh.write(f"# CUDA toolkit from PyPI: {' '.join(reqs)} ({why}) at {root}; links made: {', '.join(links) or 'none'}; "
                 f"missing: {', '.join(missing) or 'nothing'}\n")
    if missing:
        raise StepFailed(f"deps: the CUDA toolkit from PyPI at {root} lacks {', '.join(missing)}.",
                         "Set toolkit = \"system\" and install the CUDA toolkit (`invoke doctor` names how).",
                         log=str(log))
    return {"toolkit": str(root), "toolkit_requirements": reqs, "note": f"; CUDA toolkit from PyPI: {reqs[0]}"}


def _torch_kept(ctx: Ctx, log: Path) -> None:
    want = (ctx.status.step("torch") or {}).get("versions", {}).get("torch")
    have = installed_versions(ctx.py, ["torch"], ctx.env()).get("torch")
    if want and have != want:
        raise StepFailed(f"torch-replaced: torch {want} was replaced by {have} in {ctx.venv}.",
                         "Rebuild the env (`nox -s build-" + ctx.name + "`); pin the torch the variant names.",
                         log=str(log) if log.exists() else None)


def auto_jobs(ctx: Ctx, n_archs: int = 1) -> tuple[int, str]:
    """MAX_JOBS and why: --jobs, [build] jobs, else from available RAM / the measured per-job peak RSS and
    cores (buildspeed.jobs_for, which also picks NVCC_THREADS)."""
    from vllm_harness.steps.buildspeed import jobs_for
    c = jobs_for(ctx, n_archs)
    return c.jobs, c.why


def arch_list(ctx: Ctx) -> tuple[str | None, str]:
    """TORCH_CUDA_ARCH_LIST and why: --arch, [build] arch_list (both checked against what the variant's nvcc
    builds), else this machine's GPUs (mapped onto the toolkit's archs), else unset: the source's own list."""
    from vllm_harness.facts.compat import parse_arch_list
    from vllm_harness.steps.buildspeed import check_archs, default_archs
    if ctx.device != "cuda":
        return None, "CPU build: no CUDA archs"
    given = [(ctx.arch, "--arch"), (ctx.variant.build["arch_list"], "variant build.arch_list")]
    for value, where in given:
        if value:
            chk = check_archs(ctx.variant.cuda, [a for a in value.replace(",", ";").replace(" ", ";").split(";")
                                                 if a], from_gpu=False)
            if chk.error:
                raise UsageError(f"{where} '{value}': {chk.error}.", chk.fix)
            return chk.archs, where
    gpus = (ctx.profile or {}).get("gpu")
    if gpus is None:
        from vllm_harness.facts.machine import probe_gpus
        gpus = probe_gpus(ctx.base_env)[0]
    caps = sorted({g["compute_capability"] for g in gpus if g.get("compute_capability")}, key=parse_arch_list)
    if caps:
        chk = check_archs(ctx.variant.cuda, caps, from_gpu=True)
        if chk.error:
            raise UsageError(f"TORCH_CUDA_ARCH_LIST from this machine's GPUs: {chk.error}.", chk.fix)
        return chk.archs, "the GPUs of this machine" + (f" ({'; '.join(chk.notes)})" if chk.notes else "")
    default = default_archs(ctx.variant.vllm["version"], ctx.variant.cuda)
    return None, (f"no GPU found: unset, so vLLM {ctx.variant.vllm['version']}'s CMake builds every arch it "
                  f"supports with CUDA {ctx.variant.cuda}: {default or 'its list (not in the compat data)'}; "
                  f"--arch '8.9' builds for one GPU only")


def host_compiler_env(ctx: Ctx) -> dict[str, str]:
    """CC/CXX/CUDAHOSTCXX = the newest installed gcc-N the variant's CUDA accepts, when the default gcc is
    too new for it (gcc 12 with CUDA 11.8) and the user named no compiler.  Prevents 'unsupported GNU
    version' instead of diagnosing it after the fact."""
    if ctx.profile is None:  # a single `invoke build`: no doctor ran before it
        from vllm_harness.facts import machine
        ctx.profile = machine.probe(ctx.layout.state, env=ctx.base_env)
    m = ctx.profile.get("machine", {})
    if any(k in ctx.variant.build["env"] or k in ctx.base_env for k in ("CC", "CXX", "CUDAHOSTCXX")):
        return {}
    try:
        from vllm_harness.facts import compat
        limit = int(compat.load().cuda(ctx.variant.cuda).gcc_max.value)
    except Exception:  # noqa: BLE001 - CUDA version not in the data: leave the compiler alone
        return {}
    if not m.get("gcc") or Version(m["gcc"]).major <= limit:
        return {}
    usable = [a for a in m.get("gcc_alternatives", []) if Version(a).major <= limit]
    if not usable:
        return {}
    n = Version(usable[-1]).major
    return {"CC": f"gcc-{n}", "CXX": f"g++-{n}", "CUDAHOSTCXX": f"g++-{n}"}


def install_checked_wheel(ctx: Ctx, log: Path) -> dict:
    """Wheel mode: download the prebuilt vLLM wheel, refuse it before install when its CUDA major, torch pin
    or device code does not fit the variant (the source document's libcudart.so.12-in-an-11.8-env case),
    then install that very file with the env's pins kept."""
    v = ctx.variant
    dest = ctx.layout.cache / "wheels"
    dest.mkdir(parents=True, exist_ok=True)
    before = set(dest.glob("*.whl"))
    dl = [str(ctx.py), "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--progress-bar", "off",
          "-d", str(dest), v.vllm_requirement]
    if v.vllm["index_url"]:
        dl += ["--index-url", v.vllm["index_url"]]
    run_commands("build", [dl], log, ctx.env(), quiet=ctx.quiet)
    name = Requirement(v.vllm_requirement).name.replace("-", "_").lower()
    wheels = sorted(p for p in dest.glob("*.whl") if p.name.lower().startswith(name + "-")
                    and Requirement(v.vllm_requirement).specifier.contains(p.name.split("-")[1], prereleases=True))
    new = [p for p in wheels if p not in before] or wheels
    if not new:
        raise StepFailed(f"build: pip downloaded no wheel for {v.vllm_requirement}.", None, log=str(log))
    wheel = max(new, key=lambda p: p.stat().st_mtime)
    res = verify_mod.verify_wheel(wheel, v, ctx.env(), ctx.py)
    text, _code = verify_mod.wheel_verdict(res, allow_no_gpu=True)
    with open(log, "a") as fh:
        for c in res["checks"]:
            fh.write(f"# wheel check: {c['status']}: {c['name']}: {c.get('reason', '')}\n")
        fh.write(f"# {text}\n")
    if text.startswith("REFUSED"):
        raise StepFailed(f"build: {wheel.name} {text}.", "Use a variant whose CUDA and torch fit this wheel, or "
                         "build from source (mode = 'source').", log=str(log))
    with open(log, "ab") as fh:
        fh.write(b"\n")
    cmd = ctx.install_cmd([str(wheel)], v.vllm["index_url"])
    run_commands("build", [cmd], log.with_name("build-install.log"), ctx.env(), quiet=ctx.quiet)
    _torch_kept(ctx, log)
    return {"note": f"installed {wheel.name} (prebuilt wheel; {text.split(':')[0]})", "wheel": str(wheel)}


def do_build(ctx: Ctx, log: Path) -> dict:
    v = ctx.variant
    if v.vllm["mode"] == "wheel":
        return install_checked_wheel(ctx, log)
    src = source_dir(ctx)
    from vllm_harness.facts.compat import parse_arch_list
    from vllm_harness.steps.buildspeed import default_archs, jobs_for, run_source_build
    archs, why_arch = arch_list(ctx)
    n_archs = len(parse_arch_list(archs or default_archs(v.vllm["version"], v.cuda) or "")) or 1
    choice = jobs_for(ctx, n_archs)
    extra = {"MAX_JOBS": str(choice.jobs), "NVCC_THREADS": str(choice.nvcc_threads), "NINJA_STATUS": "[%f/%t] "}
    if archs:
        extra["TORCH_CUDA_ARCH_LIST"] = archs
    if not (src / ".git").exists() and not (src / "PKG-INFO").exists():
        extra["SETUPTOOLS_SCM_PRETEND_VERSION"] = (ctx.status.step("prepare") or {}).get("vllm_version") \
            or v.vllm["version"]
    if ctx.device == "cuda":
        extra.update(host_compiler_env(ctx))
    extra.update(v.build["env"])
    cuda = ctx.device == "cuda"
    env = fetch_mod.git_env(ctx.env(cuda=cuda, extra=extra), [src])
    from vllm_harness.steps import deps_cache, probe
    env = deps_cache.apply(ctx, src, env)   # cached FetchContent sources (offline builds)
    # wheelhouse reuse, compiler cache, peak-RSS record, the wheel: src/vllm_harness/buildspeed.py.  The probe
    # (~20 s syntax check against the env's torch) runs before a compile, unless a wheel with this build's key
    # exists (that source already compiled against this torch)
    return run_source_build(ctx, src, log, env, choice, archs, why_arch,
                            before_compile=lambda: probe.before_build(ctx, src, env))


def do_post_install(ctx: Ctx, log: Path) -> dict:
    pk = ctx.variant.post_install
    if pk["packages"]:
        check_index(pk["index_url"], f"{ctx.variant.path.name} [post_install]")
        run_commands("post-install", [ctx.install_cmd(pk["packages"], pk["index_url"])], log, ctx.env(),
                     quiet=ctx.quiet)
        _torch_kept(ctx, log)
    return {"note": ", ".join(pk["packages"]) or "nothing to install"}


def do_verify(ctx: Ctx, log: Path, allow_no_gpu: bool = True, as_json: bool = False, **opts) -> dict:
    vv = ctx.variant.verify
    result = verify_mod.run_verify(ctx.py, vv["device"], vv["imports"], vv["extensions"], vv["ops"],
                                   ctx.env(), log=log, **opts)
    text, code = verify_mod.verdict(result, vv["device"], allow_no_gpu)
    result["variant"] = ctx.name
    result["verdict"] = text
    if not ctx.quiet and not as_json:
        verify_mod.render(result, text)
    if code:
        failed = [c for c in result["checks"] if c["status"] == "fail"]
        fix = ("Read the table above; `invoke diagnose` reads the log." if failed else
               f"Run `nox -s verify -- --variant {ctx.name}` on a machine with the GPU, or pass --allow-no-gpu.")
        err = StepFailed(f"verify: {text}" + (f": {failed[0]['name']}: {failed[0]['reason']}" if failed else ""),
                         fix, log=str(log) if failed else None)
        err.result = result
        raise err
    return {"note": text, "result": result}


# ------------------------------------------------------------------------------------------ drivers

@contextmanager
def _locked(ctx: Ctx):
    """The variant's lock: a second run waits for it (naming the holder), or fails at once with --no-wait.
    The status is read again once the lock is held: the run we waited for has changed it."""
    with locks.held(ctx.layout.lock(ctx.name), f"variant {ctx.name}", wait=not ctx.no_wait, say=ctx.say):
        ctx.status = Status(ctx.layout.status(ctx.name), ctx.name)
        yield


def require(ctx: Ctx, step: str) -> None:
    """Refuse a single step whose inputs have not been made (a step run out of order)."""
    order = steps_for(ctx.variant)
    if step not in order:
        raise UsageError(f"Step '{step}' does not apply to variant {ctx.name} (mode = "
                         f"'{ctx.variant.vllm['mode']}').", f"Its steps are: {', '.join(order)}.")
    needed, todo = [], list(DEPENDS[step])
    while todo:
        d = todo.pop()
        if d in order and d not in needed:
            needed.append(d)
            todo += DEPENDS[d]
    for prev in [s for s in order if s in needed]:
        st = ctx.status.step(prev)
        if not st or st.get("status") != "ok":
            task = "deps" if prev in ("env", "torch") else prev
            raise UsageError(f"Step '{step}' needs step '{prev}' first for variant {ctx.name}.",
                             f"Run `invoke {task} --variant {ctx.name}` or `nox -s build-{ctx.name}`.")


TASK_STEPS = {"deps": ["env", "torch", "deps"]}  # `invoke deps` also makes the env and installs torch


def _interpreter(ctx: Ctx) -> pythons.Interpreter:
    """The recorded interpreter of a good env, or a newly discovered one."""
    env_step = ctx.status.step("env")
    if (ctx.force or not env_step or env_step.get("status") != "ok" or not ctx.py.exists() or ctx.python
            or not ctx.variant.python_spec.contains(env_step.get("python_version", "0"))):
        return pythons.find(ctx.variant.python, ctx.python, ctx.base_env, what=f"variant {ctx.name}")
    return pythons.Interpreter(path=env_step["python"], version=env_step["python_version"],
                               executable=env_step["python"], origin="recorded", has_headers=True)


def run_single(ctx: Ctx, step: str, **kw) -> dict:
    """One step, as an invoke task runs it: checked for order, locked, recorded."""
    with _locked(ctx):
        if not ctx.py.exists():  # env deleted (by hand, or cleaned): nothing recorded in it can be trusted
            ctx.status.invalidate("env")
        group = TASK_STEPS.get(step, [step])
        require(ctx, group[0])
        interp = _interpreter(ctx) if "env" in group else None
        keys = _step_keys(ctx, _interp_key(ctx, interp))
        for s in group:
            _run(ctx, s, keys[s], _step_fn(ctx, s, interp, **(kw if s == step else {})))
        return ctx.status.step(step) or {}


def _interp_key(ctx: Ctx, interp: pythons.Interpreter | None) -> str:
    if interp is not None:
        return f"{interp.executable}:{interp.version}"
    s = ctx.status.step("env") or {}
    return f"{s.get('python')}:{s.get('python_version')}"


def _step_fn(ctx: Ctx, step: str, interp, **kw):
    return {
        "env": lambda log: do_env(ctx, interp, log),
        "torch": lambda log: do_torch(ctx, log),
        "fetch": lambda log: do_fetch(ctx, log),
        "prepare": lambda log: do_prepare(ctx, log),
        "deps": lambda log: do_deps(ctx, log),
        "build": lambda log: do_build(ctx, log),
        "post-install": lambda log: do_post_install(ctx, log),
        "verify": lambda log: do_verify(ctx, log, **kw),
    }[step]


def build_variant(ctx: Ctx, allow_no_gpu: bool = True, skip_doctor: bool = False) -> dict:
    """The whole flow of ``nox -s build-<variant>``; steps that are done with the same inputs are reused."""
    from vllm_harness.pipeline import preflight as doctor_run
    with _locked(ctx):
        if not skip_doctor:
            doctor_run.preflight(ctx)
        interp = _interpreter(ctx)
        if not ctx.py.exists():  # env deleted by hand: nothing in it can be trusted
            ctx.status.invalidate("env")
        keys = _step_keys(ctx, _interp_key(ctx, interp))
        for step in steps_for(ctx.variant):
            kw = {"allow_no_gpu": allow_no_gpu} if step == "verify" else {}
            _run(ctx, step, keys[step], _step_fn(ctx, step, interp, **kw))
            if step == "post-install":
                ctx.status.set_built(True)
                ctx.layout.last_built.parent.mkdir(parents=True, exist_ok=True)
                ctx.layout.last_built.write_text(ctx.name + "\n")
        return ctx.status.data
