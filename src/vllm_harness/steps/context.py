"""The run context every step gets: the layout, the variant, the run's options (``Ctx``), the child
environment and the installer command, and the small checks steps share (the index answers, torch kept)."""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

from vllm_harness.core import procs
from vllm_harness.core.errors import StepFailed, UsageError
from vllm_harness.core.fetcher import Fetcher, FetchError
from vllm_harness.core.layout import Layout, venv_python
from vllm_harness.core.masking import strip_credentials
from vllm_harness.core.options import RunOptions
from vllm_harness.core.runner import console, mask
from vllm_harness.core.status import Status
from vllm_harness.facts import toolkit
from vllm_harness.facts.machine import uv_bin
from vllm_harness.facts.variants import Variant


@dataclass
class Ctx:
    """The run record: the options the user gave (frozen, ``core.options.RunOptions``) and what the run learns
    as it goes -- the machine's profile, the bundle's environment, the status on disk, verify's proof.  The
    pipeline owns it; steps read the options and add to the record."""
    layout: Layout
    variant: Variant
    options: RunOptions = field(default_factory=RunOptions)
    base_env: dict[str, str] = field(default_factory=lambda: dict(os.environ))
    profile: dict | None = None          # the machine (probed by doctor or the build, or --machine)
    bundle_env: dict[str, str] | None = None  # the offline install variables once the bundle was checked
    verify_proof: dict | None = None     # what verify would prove now (steps/verify.proof_of), once computed
    status: Status = field(init=False)

    def __post_init__(self):
        self.layout.ensure()
        # read here; the pipeline opens it with the step graph (pipeline/steps.GRAPH) under the lock,
        # before any step changes it (a record without the graph cannot clear steps)
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
        if not self.options.quiet:
            console().print(text)

    # ---- children's environment
    def env(self, cuda: bool = False, extra: dict[str, str] | None = None) -> dict[str, str]:
        home = Path(self.cuda_home()) if cuda else None
        scripts = (self.status.step("env") or {}).get("interpreter_scripts")
        return toolkit.child_env(
            self.base_env,
            self.venv,
            home,
            extra or {},
            drop_precompiled=self.variant.vllm["mode"] == "source",
            more_path=[scripts] if scripts else [],
        )

    def cuda_home(self) -> str:
        if self.variant.build["toolkit"] == "pypi":  # the venv's own, installed by the deps step
            root = (self.status.step("deps") or {}).get("toolkit")
            if not root or not (Path(root) / "bin" / "nvcc").is_file():
                raise UsageError(
                    f"Variant {self.name} takes its CUDA toolkit from PyPI ([build] toolkit = "
                    f'"pypi"), and none is installed in {self.venv}.',
                    f"Run `invoke deps --variant {self.name}` (or `nox -s build-{self.name}`).",
                )
            return root
        toolkits = (self.profile or {}).get("machine", {}).get("cuda_toolkits") or toolkit.find_toolkits(
            self.base_env
        )
        if self.variant.cuda in toolkits:
            return toolkits[self.variant.cuda]
        have = ", ".join(f"{v} at {p}" for v, p in sorted(toolkits.items())) or "none"
        raise UsageError(
            f"No CUDA {self.variant.cuda} toolkit found for variant {self.name} (found: {have}).",
            f"Install CUDA {self.variant.cuda} (e.g. /usr/local/cuda-{self.variant.cuda}) or set "
            f"CUDA_HOME to its root.",
        )

    # ---- installer
    def install_cmd(
        self,
        reqs: list[str],
        index_url: str | None = None,
        constraints: bool = True,
        extra: list[str] | None = None,
        local: bool = False,
    ) -> list[str]:
        """The installer's argv.  ``local`` (a bundle, or find-links that hold the wheels): no index at all,
        only the find-links folders (uv: --offline too)."""
        uv = self.variant.installer == "uv" and uv_bin()
        if uv:
            argv = [uv_bin(), "pip", "install", "--python", str(self.py)]
        else:
            argv = [str(self.py), "-m", "pip", "install", "--progress-bar", "off"]
        if local or self.options.bundle is not None:
            argv += (["--offline"] if uv else []) + ["--no-index"]
            for folder in find_links(self.env()):
                argv += ["--find-links", folder]
        elif index_url:
            argv += ["--index-url", index_url]
        cfile = self.layout.constraints(self.name)
        if constraints and cfile.is_file():
            argv += ["--constraint", str(cfile)]
        return argv + (extra or []) + reqs


def installed_versions(py: Path, names: list[str], env: dict[str, str]) -> dict[str, str | None]:
    code = (
        "import json, importlib.metadata as m, sys\nout={}\nfor n in sys.argv[1:]:\n"
        "    try: out[n]=m.version(n)\n    except Exception: out[n]=None\nprint(json.dumps(out))"
    )
    r = procs.run([str(py), "-c", code, *names], capture_output=True, text=True, env=env, timeout=120)
    if r.returncode != 0:
        return {n: None for n in names}
    return json.loads(r.stdout.strip().splitlines()[-1])


def _index_auth(url: str) -> tuple[str, str | None]:
    """(the URL without credentials, an Authorization header or None), found as pip and uv find them: the
    URL's own user information, else ~/.netrc (or $NETRC) for its host, else keyring where it is installed."""
    import base64
    from urllib.parse import urlsplit

    bare, user, password = strip_credentials(url)
    host = urlsplit(bare).hostname or ""
    if user is not None and password is None:
        try:  # a token-only URL (https://token@host) is basic auth with an empty password, as pip sends it
            import keyring  # optional, as for pip's keyring support

            cred = keyring.get_credential(bare, user)
            password = cred.password if cred else None
        except Exception:  # no keyring, or a backend that fails: go on without it
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


def find_links(env: dict[str, str]) -> list[str]:
    """The find-links folders pip and uv are given (UV_FIND_LINKS, PIP_FIND_LINKS), in that order."""
    import re

    out: list[str] = []
    for key in ("UV_FIND_LINKS", "PIP_FIND_LINKS"):
        for item in re.split(r"[\s,]+", env.get(key, "")):
            if item and item not in out:
                out.append(item)
    return out


def held_locally(reqs: list[str], env: dict[str, str]) -> bool:
    """Every requirement has a wheel or sdist in a local find-links folder (the offline fix: wheels downloaded
    elsewhere, UV_FIND_LINKS/PIP_FIND_LINKS pointed at them)."""
    from packaging.requirements import InvalidRequirement, Requirement
    from packaging.utils import canonicalize_name, parse_sdist_filename, parse_wheel_filename

    have: list[tuple[str, object]] = []
    for f in find_links(env):
        folder = Path(f[7:] if f.startswith("file://") else f)
        if not folder.is_dir():
            continue
        for p in folder.iterdir():
            try:
                n, ver = (
                    parse_wheel_filename(p.name)[:2]
                    if p.name.endswith(".whl")
                    else parse_sdist_filename(p.name)
                    if p.name.endswith((".tar.gz", ".zip"))
                    else (None, None)
                )
            except ValueError:
                continue
            if n:
                have.append((n, ver))
    if not reqs or not have:
        return False
    try:
        wanted = [Requirement(r) for r in reqs]
    except InvalidRequirement:
        return False
    return all(
        any(n == canonicalize_name(r.name) and r.specifier.contains(ver, prereleases=True) for n, ver in have)
        for r in wanted
    )


def offline_configured(env: dict[str, str]) -> bool:
    """pip/uv are told to use no index (a bundle build sets these)."""
    return env.get("UV_OFFLINE", "").lower() in ("1", "true") or env.get("PIP_NO_INDEX", "").lower() in (
        "1",
        "true",
    )


def index_or_local(url: str | None, what: str, reqs: list[str], env: dict[str, str]) -> bool:
    """Before installing ``reqs`` from ``url``: True when they are to come from local files only, with no
    index
    asked: a bundle build (UV_OFFLINE / PIP_NO_INDEX), or an index that does not answer while the find-links
    folders hold every requirement (the offline fix).  An index that does not answer otherwise: check_index's
    UsageError (exit 2).  False: install from the index as usual."""
    if offline_configured(env):
        return True
    try:
        check_index(url, what)
    except UsageError:
        if held_locally(reqs, env):
            return True
        raise
    return False


def check_index(url: str | None, what: str, timeout: float = 15.0) -> None:
    """An index the variant names must answer before anything is installed from it (exit 2 otherwise).
    Credentials are sent as pip/uv send them (urllib alone would put them in the host name and fail)."""
    if not url or url.startswith("file://"):
        return
    bare, auth = _index_auth(url)
    fetcher = Fetcher(deadline_s=None, max_requests=8, timeout_s=timeout, request_deadline_s=2 * timeout)
    try:  # core.fetcher: http/https only (redirects too), a deadline; only the first chunk is read
        with fetcher.stream(
            bare.rstrip("/") + "/", max_bytes=1 << 40, headers={"Authorization": auth} if auth else None
        ) as r:
            r.read(1)
    except FetchError as e:
        code = e.status
        if code in (401, 403) and auth is None:
            return  # it answered; pip/uv may hold credentials this check does not (a keyring provider)
        if code in (401, 403):
            raise UsageError(
                f"The index {mask(url)} for {what} refused the credentials (HTTP {code}).",
                "Check the user and token in the URL, ~/.netrc or the keyring.",
            ) from None
        if code is not None and code < 500:
            return  # it answered: a 404 on the index root says nothing about the packages
        if code is not None:
            raise UsageError(
                f"The index {mask(url)} for {what} answered HTTP {code}.",
                "Retry later or point index_url at a mirror.",
            ) from None
        if e.kind in ("scheme", "url"):
            raise UsageError(f"The index {mask(url)} for {what} cannot be read: {e.reason}.", e.fix) from None
        reason = mask(e.reason)
        err = UsageError(
            f"Cannot reach the index {mask(url)} for {what} ({reason}).",
            "Check the network or proxy (HTTPS_PROXY); offline, download the wheels elsewhere and set "
            "UV_FIND_LINKS/PIP_FIND_LINKS to their folder, or make a bundle on a connected machine "
            "(`invoke bundle --variant NAME --out DIR`) and build with --from-bundle DIR; or set "
            "index_url to a reachable mirror.",
        )
        # the log line diagnose reads (pip's own wording for the same event): index-unreachable
        err.evidence = f"Could not fetch URL {mask(bare.rstrip('/') + '/')}: connection error: {reason}"
        raise err from None


def source_dir(ctx: Ctx) -> Path:
    s = ctx.status.step("fetch")
    if not s or s.get("status") != "ok":
        raise UsageError(
            f"Variant {ctx.name} has no fetched source yet.",
            f"Run `invoke fetch --variant {ctx.name}` (or `nox -s build-{ctx.name}`).",
        )
    return Path(s["source"])


def torch_kept(ctx: Ctx, log: Path) -> None:
    want = (ctx.status.step("torch") or {}).get("versions", {}).get("torch")
    have = installed_versions(ctx.py, ["torch"], ctx.env()).get("torch")
    if want and have != want:
        raise StepFailed(
            f"torch-replaced: torch {want} was replaced by {have} in {ctx.venv}.",
            "Rebuild the env (`nox -s build-" + ctx.name + "`); pin the torch the variant names.",
            log=str(log) if log.exists() else None,
        )
