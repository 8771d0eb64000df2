"""`invoke list`: the variants in envs/; the machine banner of `nox -s build-<variant>`."""
from __future__ import annotations

import os
import platform

from vllm_harness.commands.common import layout_of, print_json
from vllm_harness.core.errors import EXIT_OK, UsageError
from vllm_harness.facts import toolkit
from vllm_harness.facts.variants import load_variant_file, variant_files


def machine_banner() -> str:
    """The machine facts printed at the start of a session (urllib3's noxfile does the same)."""
    import shutil

    tk = toolkit.find_toolkits()
    gpu = "unknown"
    try:
        import pynvml
        pynvml.nvmlInit()
        n = pynvml.nvmlDeviceGetCount()
        gpu = f"{n} GPU(s), driver {pynvml.nvmlSystemGetDriverVersion()}" if n else "no GPU"
    except Exception:
        gpu = "no GPU (NVML not available)"
    return (f"{platform.system()} {platform.machine()}, {len(os.sched_getaffinity(0))} cores, {gpu}; "
            f"CUDA toolkits: {', '.join(f'{v} ({p})' for v, p in sorted(tk.items())) or 'none'}; "
            f"cmake on PATH: {shutil.which('cmake') or 'none'}; python {platform.python_version()}")


def cmd_list(a) -> int:
    layout = layout_of(a)
    rows = []
    for f in variant_files(layout.root / "envs"):
        try:
            v = load_variant_file(f)
            rows.append({"variant": v.name, "cuda": v.cuda, "python": v.python, "torch": v.torch["version"],
                         "vllm": v.vllm["version"], "mode": v.vllm["mode"], "description": v.description})
        except UsageError as e:
            rows.append({"variant": f.stem, "error": str(e)})
    if a.json:
        print_json(a, {"variants": rows})
    else:
        from rich.console import Console
        from rich.table import Table
        t = Table()
        for c in ("variant", "cuda", "python", "torch", "vllm", "mode", "description"):
            t.add_column(c)
        for r in rows:
            t.add_row(
                *(
                    str(r.get(c, r.get("error", "")))
                    for c in ("variant", "cuda", "python", "torch", "vllm", "mode", "description")
                )
            )
        Console().print(t)
    return EXIT_OK
