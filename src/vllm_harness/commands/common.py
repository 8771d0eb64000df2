"""What every command handler shares: the state folder, the variant, the run context, the JSON printer."""
from __future__ import annotations

import json
from pathlib import Path

from vllm_harness.core.errors import UsageError
from vllm_harness.core.layout import Layout
from vllm_harness.core.masking import mask
from vllm_harness.facts.variants import load_variant
from vllm_harness.steps.context import Ctx


def layout_of(a) -> Layout:
    """The state folder, made (with its marker) if it is not there; a folder the harness did not make is
    refused by every command before anything touches it.  ``clean`` only checks: it never makes one."""
    layout = Layout.default(Path(a.root) if getattr(a, "root", None) else None)
    if getattr(a, "command", None) == "clean":
        layout.check()
    else:
        layout.ensure()
    return layout


def variant_of(layout: Layout, name: str | None, required: bool = True):
    if not name:
        name = layout.read_last_built()
        if not name and required:
            raise UsageError(
                "No variant given and none was built yet.",
                "Pass --variant NAME (see `invoke --list` or `nox -l`).",
            )
        if not name:
            return None
    return load_variant(name, layout.envs_dirs)


def context_of(a, layout=None, variant=None):
    layout = layout or layout_of(a)
    variant = variant or variant_of(layout, a.variant)
    return Ctx(
        layout=layout,
        variant=variant,
        quiet=getattr(a, "json", False),
        force=getattr(a, "force", False),
        python=getattr(a, "python", None),
        jobs=getattr(a, "jobs", None),
        arch=getattr(a, "arch", None),
        no_wait=getattr(a, "no_wait", False),
        rebuild=getattr(a, "rebuild", False),
        cache=getattr(a, "cache", None),
        farm=getattr(a, "farm", None),
        nvcc_threads=getattr(a, "nvcc_threads", None),
        bundle=bundle_of(a) if hasattr(a, "from_bundle") else None,
    )


def print_json(a, data: dict) -> None:
    """The one JSON printer of every command (``--json``): credentials masked, as on every other output."""
    if getattr(a, "json", False):
        print(mask(json.dumps(data, indent=2, default=str)))


def bundle_of(a) -> Path | None:
    """--from-bundle DIR, else VLLM_HARNESS_BUNDLE (commands/bundle, steps/bundle)."""
    import os

    given = getattr(a, "from_bundle", None) or os.environ.get("VLLM_HARNESS_BUNDLE")
    return Path(given).expanduser().resolve() if given else None
