"""nox sessions: one `build-<variant>` per envs/*.toml, plus verify, doctor, tests and lint.

Thin on purpose: each session runs `python -m vllm_harness <command>` (src/vllm_harness) in a small tool venv;
the variant's own isolated venv is made by the harness under .harness/envs/<variant>/.
`nox -R -s build-cu118` reuses the tool venv and every build step already done with the same inputs.
"""

from __future__ import annotations

import sys
from pathlib import Path

import nox

ROOT = Path(__file__).parent
sys.path.insert(0, str(ROOT / "src"))
from vllm_harness.core.layout import NAME_RE  # noqa: E402  (the package's one variant-name rule)

nox.needs_version = ">=2024.4.15"
nox.options.default_venv_backend = "uv|virtualenv"
nox.options.sessions = ["tests", "lint"]
# the daily loop: a session's tool venv is kept between runs (`nox --reuse-venv=no` makes it anew), and the
# harness is installed into it again only when what the install depends on changed (_install)
nox.options.reuse_venv = "yes"


def _install(session: nox.Session, spec: str) -> None:
    """``pip install -e SPEC`` unless this venv already has it from the same pyproject.toml: an editable
    install reads the code from src/, so only the project's metadata (dependencies, entry points) asks for
    a new install.  ``--reuse-venv=no`` or a changed pyproject.toml installs again."""
    import hashlib
    venv = getattr(session, "virtualenv", None)
    location = getattr(venv, "location", None)
    if not location or not Path(location).is_dir():  # venv_backend="none": nothing of ours to keep
        session.install("-e", spec)
        return
    stamp = Path(location) / ".vllm-harness-install"
    want = hashlib.sha256((ROOT / "pyproject.toml").read_bytes() + spec.encode() + str(ROOT).encode()).hexdigest()
    if stamp.is_file() and stamp.read_text() == want:
        session.log(f"{spec}: unchanged since it was installed in this venv, not installed again")
        return
    session.install("-e", spec)  # skipped with -R / --no-install
    runner = getattr(session, "_runner", None)  # -R / --no-install on a reused venv skipped the install
    if not getattr(getattr(runner, "global_config", None), "no_install", False):
        stamp.write_text(want)


def _harness(session: nox.Session, *args: str) -> None:
    _install(session, ".")
    session.run("python", "-m", "vllm_harness", *args)


def _description(path: Path) -> str:
    try:  # the session validates the whole file; the list only needs its one line
        text = nox.project.load_toml(path).get("description")
    except Exception:  # a broken file still gets its session, which says what is wrong
        return "(unreadable variant file: `nox -s build-NAME` says why)"
    return str(text) if text else "(no description)"


def _make_build_session(variant: str, path: Path) -> None:
    def build(session: nox.Session) -> None:
        _harness(session, "build-variant", "--variant", variant, *session.posargs)

    build.__doc__ = f"Build {variant}: {_description(path)}"
    nox.session(name=f"build-{variant}")(build)


for _path in sorted((ROOT / "envs").glob("*.toml")):
    if NAME_RE.match(_path.stem):
        _make_build_session(_path.stem, _path)


@nox.session
def verify(session: nox.Session) -> None:
    """GPU kernel smoke tests in a variant's env (-- --variant NAME; default: the variant built last)."""
    _harness(session, "verify", *session.posargs)


@nox.session
def doctor(session: nox.Session) -> None:
    """Preflight report for this machine (-- --variant NAME [--json])."""
    _harness(session, "doctor", *session.posargs)


def _pytest(session: nox.Session, marks: str) -> None:
    _install(session, ".[test]")
    # pytest-xdist: one worker per core (the tests wait on subprocesses, pip and the network as much as on
    # the CPU); `-- -n 0` runs them in this process; `-- -m ...` picks other tests
    given = session.posargs
    parallel = [] if any(a.startswith(("-n", "--numprocesses")) for a in given) else ["-n", "auto"]
    select = [] if any(a == "-m" or a.startswith("-m") for a in given) else ["-m", marks]
    session.run("pytest", *parallel, *select, *given)


@nox.session
def tests(session: nox.Session) -> None:
    """The test suite without the heavy end-to-end cases (marked slow: real builds), in parallel: a few
    minutes, run it before every commit.  .ci/run runs it, then tests-slow."""
    _pytest(session, "not slow")


@nox.session(name="tests-slow")
def tests_slow(session: nox.Session) -> None:
    """The heavy end-to-end cases (real builds of the fixture, interrupted and concurrent runs, the PyPI CUDA
    toolkit build), in parallel; CI runs them after `tests`."""
    _pytest(session, "slow")


@nox.session
def variants(session: nox.Session) -> None:
    """Every variant in envs/ built here as a user would (`build-variant`), one after another: wheel mode end to
    end (without a GPU, verify's CPU-side layers); each env is removed once verified, uv's cache is shared.
    A source-mode variant is not compiled here (an hour of nvcc): it is named as not built.  CI runs this, so a
    variant whose release no longer fits cannot land.  `-- NAME ...` picks variants."""
    names = session.posargs or [p.stem for p in sorted((ROOT / "envs").glob("*.toml")) if NAME_RE.match(p.stem)]
    not_built = []
    for name in names:
        mode = nox.project.load_toml(ROOT / "envs" / f"{name}.toml").get("vllm", {}).get("mode", "source")
        if mode != "wheel":
            not_built.append(f"{name} (mode = {mode!r}: a source build is not run here)")
            continue
        _harness(session, "build-variant", "--variant", name)
        session.run("python", "-m", "vllm_harness", "clean", "--variant", name)
    for line in not_built:
        session.log(f"NOT BUILT: {line}")


@nox.session
def lint(session: nox.Session) -> None:
    """ruff over the package, tests, noxfile and tasks."""
    session.install("ruff==0.17.6")  # the version the rules were checked with: a new release adds findings
    session.run("ruff", "check", "src", "tests", "noxfile.py", "tasks.py", "benchmarks")


@nox.session
def compat(session: nox.Session) -> None:
    """Refresh the compatibility data from the package index (-- --json; see `invoke compat --help`)."""
    _harness(session, "compat", "--refresh", *session.posargs)


@nox.session(name="tests-gpu", venv_backend="none")
def tests_gpu(session: nox.Session) -> None:
    """The GPU test set on a GPU machine, with the interpreter that has a CUDA torch (VLLM_HARNESS_GPU_LIBS:
    a real vLLM wheel's libraries for verify --libs)."""
    session.run(sys.executable, "-m", "pytest", "-m", "gpu", "tests/test_gpu.py", *session.posargs)
