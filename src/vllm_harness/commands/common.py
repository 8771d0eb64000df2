"""What every command handler shares: the state folder, the variant, the run context, the JSON printer."""
from __future__ import annotations

import json
from pathlib import Path

from vllm_harness.core.errors import UsageError
from vllm_harness.core.layout import Layout
from vllm_harness.core.masking import mask
from vllm_harness.core.options import RunOptions
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
    """The run record of a command: the variant, and the options of its command line, frozen here
    (``RunOptions.from_args``) and read unchanged by doctor and every step."""
    layout = layout or layout_of(a)
    variant = variant or variant_of(layout, a.variant)
    return Ctx(layout=layout, variant=variant, options=RunOptions.from_args(a))


def print_json(a, data: dict) -> None:
    """The one JSON printer of every command (``--json``): credentials masked, as on every other output."""
    if getattr(a, "json", False):
        print(mask(json.dumps(data, indent=2, default=str)))
