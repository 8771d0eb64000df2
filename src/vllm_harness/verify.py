"""verify: prove an env runs -- imports, compiled extensions, and kernels against torch references.

The checks run inside the env's own interpreter (``data/verify_env.py``); this side turns the result into
the contract's JSON, a table, and a verdict.  Without a GPU the GPU checks are skips with the reason, and
the verdict is NOT VERIFIED (exit 1) unless ``--allow-no-gpu``.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

from .errors import StepFailed

SCRIPT = Path(__file__).parent / "data" / "verify_env.py"


def run_verify(python: Path, device: str, imports: list[str], extensions: list[str], ops: list[str],
               env: dict[str, str], log: Path | None = None, timeout: float = 600) -> dict:
    argv = [str(python), str(SCRIPT), "--device", device, "--imports", ",".join(imports),
            "--extensions", ",".join(extensions), "--ops", ",".join(ops)]
    try:
        r = subprocess.run(argv, capture_output=True, text=True, env=env, timeout=timeout,
                           stdin=subprocess.DEVNULL)
    except subprocess.TimeoutExpired:
        raise StepFailed(f"verify: the checks did not finish in {timeout:.0f}s.", "Look at the GPU's state "
                         "(nvidia-smi) and rerun.") from None
    except OSError as e:
        raise StepFailed(f"verify: cannot run {python} ({e.strerror}).", "Build the env first.") from None
    if log is not None:
        log.parent.mkdir(parents=True, exist_ok=True)
        log.write_text(f"$ {' '.join(argv)}\n{r.stdout}\n{r.stderr}\n# exit status {r.returncode}\n")
    lines = [ln for ln in r.stdout.splitlines() if ln.startswith("{")]
    if not lines:
        raise StepFailed(f"verify: {python} crashed before reporting (exit {r.returncode}).", None,
                         log=str(log) if log else None)
    return json.loads(lines[-1])


def verdict(result: dict, device: str, allow_no_gpu: bool) -> tuple[str, int]:
    checks = result["checks"]
    failed = [c for c in checks if c["status"] == "fail"]
    skipped_gpu = device == "cuda" and not result.get("gpus")
    if failed:
        return f"FAILED ({len(failed)} of {len(checks)} checks)", 1
    if skipped_gpu:
        label = "NOT VERIFIED on a GPU: no GPU visible; the GPU checks were skipped"
        return label, 0 if allow_no_gpu else 1
    return f"VERIFIED ({sum(c['status'] == 'pass' for c in checks)} checks passed)", 0


def render(result: dict, verdict_text: str) -> None:
    from rich.table import Table

    from .runner import console
    con = console()
    gpus = ", ".join(f"{g['name']} (sm {g['compute_capability']})" for g in result.get("gpus", [])) or "none"
    con.print(f"python {result.get('python_version')} at {result.get('python')}; torch {result.get('torch')} "
              f"(CUDA {result.get('torch_cuda')}); numpy {result.get('numpy')}; GPUs: {gpus}")
    t = Table(show_lines=False)
    for col in ("check", "status", "detail"):
        t.add_column(col)
    colour = {"pass": "green", "fail": "red", "skip": "yellow"}
    for c in result["checks"]:
        m = c.get("metrics", {})
        detail = c.get("reason") or ""
        if "max_abs_err" in m and c["status"] == "pass":
            detail = f"max abs err {m['max_abs_err']:.2e} over {m.get('cases')} shapes"
        elif m.get("version"):
            detail = m["version"]
        t.add_row(c["name"], f"[{colour[c['status']]}]{c['status']}[/]", detail)
    con.print(t)
    con.print(f"[bold]{verdict_text}[/]")
