"""What the user asked of this run, fixed once at the command-line boundary (``RunOptions``).

The CLI and the invoke tasks read their flags from the one command table (``commands/table``); the handler
turns the parsed flags into a frozen ``RunOptions`` at once (``RunOptions.from_args``) and passes it down: the
preflight (doctor) and every step read the same object, and nothing below the boundary can change it.  What a
run learns as it goes (the machine's profile, the bundle's environment, the status on disk) is the run
record, ``steps.context.Ctx``, owned by the pipeline.

Precedence of the build's settings, the same in doctor and in the build (``facts/build_policy``,
``facts/build_archs``, ``toolchain/compiler_cache``, ``toolchain/build_farm``):

=============  =====================================================================================
jobs           ``--jobs``, else the variant's ``[build] jobs``, else from memory and cores (a ``MAX_JOBS``
               in the shell is never used: the build sets it)
nvcc_threads   ``--nvcc-threads``, else ``[build] nvcc_threads``, else chosen with the jobs
arch           ``--arch``, else ``[build] arch_list``, else the machine's GPUs, else the source's own list
cache          ``--cache``, else ``VLLM_HARNESS_COMPILER_CACHE``, else ``auto``
farm           ``--farm``, else ``[build] farm``, else ``SCCACHE_CONF``'s ``[dist]``
bundle         ``--from-bundle``, else ``VLLM_HARNESS_BUNDLE``
=============  =====================================================================================
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from vllm_harness.core.errors import UsageError

CACHE_TOOLS = ("auto", "sccache", "ccache", "none")


@dataclass(frozen=True)
class RunOptions:
    quiet: bool = False                  # --json: the contract's object on stdout, nothing else
    force: bool = False                  # redo finished steps; build despite doctor's errors
    python: str | None = None            # --python: the interpreter for the env step
    jobs: int | None = None              # --jobs / -j: MAX_JOBS
    nvcc_threads: int | None = None      # --nvcc-threads: NVCC_THREADS
    arch: str | None = None              # --arch: TORCH_CUDA_ARCH_LIST
    cache: str | None = None             # --cache: auto, sccache, ccache, none or a path to the tool
    farm: str | None = None              # --farm: the sccache-dist scheduler URL, or off
    rebuild: bool = False                # --rebuild: compile even when the wheelhouse has this build's wheel
    no_wait: bool = False                # --no-wait: fail at once when another run holds the variant
    bundle: Path | None = None           # --from-bundle / VLLM_HARNESS_BUNDLE: install only from it
    reverify: bool = False               # --reverify: run verify's checks even when the proof is unchanged
    strict_verify: bool = False          # --strict-verify: fail when the GPU checks could not run
    skip_doctor: bool = False            # --skip-doctor: no preflight

    def __post_init__(self) -> None:
        for name in ("jobs", "nvcc_threads"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                flag = "--" + name.replace("_", "-")
                raise UsageError(f"{flag} {value!r}: not a positive whole number.",
                                 f"Pass {flag} N with N >= 1.")
        if self.cache is not None and self.cache not in CACHE_TOOLS and os.sep not in self.cache:
            raise UsageError(
                f"--cache {self.cache!r}: not a compiler cache.",
                f"Pass one of {', '.join(CACHE_TOOLS)}, or the path of an sccache or ccache binary.",
            )

    @classmethod
    def from_args(cls, a: Any, env: dict[str, str] | None = None) -> RunOptions:
        """The options of a parsed command line (argparse's namespace, or the invoke task's): every field
        whose flag the command has (``--json`` is ``quiet``); the rest keep their defaults."""
        env = os.environ if env is None else env
        given = {f.name: getattr(a, f.name) for f in dataclasses.fields(cls)
                 if getattr(a, f.name, None) is not None}
        given["quiet"] = bool(getattr(a, "json", False))
        bundle = getattr(a, "from_bundle", None)
        if bundle is None and hasattr(a, "from_bundle"):   # a command that installs: the variable too
            bundle = env.get("VLLM_HARNESS_BUNDLE")
        given["bundle"] = Path(bundle).expanduser().resolve() if bundle else None
        return cls(**given)

    def replace(self, **changes: Any) -> RunOptions:
        return dataclasses.replace(self, **changes)
