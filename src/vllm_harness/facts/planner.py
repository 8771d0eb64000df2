"""What can run on a machine: ``invoke plan`` (issue 16).

From a machine profile (``machine.probe`` / ``machine.load_profile``: driver, GPUs' compute capabilities,
Python interpreters, CUDA toolkits) and the compatibility data (``compat.load()``: hand facts + the index's),
one option per CUDA line of the data: the newest vLLM release that runs here on that line, with its torch,
the Python it needs and how it is installed (``wheel``: PyPI's vLLM wheel on PyPI's torch of that CUDA;
``source``: vLLM built from its sdist against torch from the PyTorch CUDA index, with the machine's toolkit),
or why nothing does (driver too old, GPU arch dropped, no wheel for this Python, no toolkit).  Then one
recommendation; ``write_variant`` turns it into an ``envs/NAME.toml`` that ``nox -s build-NAME`` builds.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from packaging.specifiers import InvalidSpecifier, SpecifierSet
from packaging.version import InvalidVersion, Version

from vllm_harness.core.errors import UsageError
from vllm_harness.facts.compat import CompatData, arch_list_runs_on, major_minor, parse_arch_list, parse_cc
from vllm_harness.facts.variants import load_variant_file

PYTORCH_WHL = "https://download.pytorch.org/whl"


@dataclass
class Option:
    cuda: str
    torch: str | None
    vllm: str | None
    python: str | None
    mode: str | None            # 'wheel' | 'source' | None (nothing runs)
    ok: bool
    why: str
    # not in the JSON: what write_variant needs
    extra: dict = field(default_factory=dict, repr=False)

    def to_dict(self) -> dict:
        d = asdict(self)
        d.pop("extra")
        return d


def _v(s: Any) -> Version | None:
    try:
        return Version(str(s))
    except (InvalidVersion, TypeError):
        return None


def _cuda_tag(cuda: str) -> str:
    return "cu" + cuda.replace(".", "")


def driver_supports(data: CompatData, cuda: str, driver: str | None, driver_cuda: str | None) -> tuple[bool, str]:
    """(runs, how): the driver's own minimum, else minor-version compatibility within the major."""
    cf = data.cuda(cuda)
    dv = _v(driver)
    if dv is not None:
        if dv >= Version(cf.driver_min.value):
            return True, f"driver {driver} >= {cf.driver_min.value}"
        cmin = _v(cf.compat_driver_min.value)
        dc = _v(driver_cuda)
        if cmin is not None and dv >= cmin and (dc is None or dc.major == Version(cuda).major):
            return True, (f"driver {driver} runs CUDA {cuda} only under minor-version compatibility "
                          f"(>= {cf.compat_driver_min.value}; no JIT of newer PTX)")
        return False, f"driver {driver} too old (CUDA {cuda} needs >= {cf.driver_min.value})"
    dc = _v(driver_cuda)
    if dc is not None:
        if dc >= Version(cuda):
            return True, f"driver's CUDA {driver_cuda} >= {cuda}"
        return False, f"driver too old (its CUDA {driver_cuda} < {cuda})"
    return True, "no NVIDIA driver in the profile: not checked"


def _pythons(profile: dict) -> list[Version]:
    out = []
    for p in (profile.get("machine") or {}).get("python") or []:
        v = _v(p)
        if v is not None:
            out.append(v)
    return sorted(out)


def _python_for(spec: str, pythons: list[Version], tags: list[str] | None = None) -> tuple[Version | None, str]:
    """The newest interpreter in ``spec`` (and covered by the wheel ``tags``), or (None, why)."""
    try:
        s = SpecifierSet(spec)
    except InvalidSpecifier:
        return None, f"bad Python range {spec!r}"
    fits = [p for p in pythons if s.contains(p, prereleases=True) and _tag_covers(tags, p)]
    if fits:
        return fits[-1], ""
    found = ", ".join(f"{p.major}.{p.minor}" for p in pythons) or "none"
    return None, f"no wheel for this Python (needs {spec}; found {found})"


def _tag_covers(tags: list[str] | None, py: Version) -> bool:
    if not tags:
        return True
    for t in tags:
        interp, abi, _plat = (t.split("-", 2) + ["", ""])[:3]
        if interp.startswith("py3") or interp == f"cp{py.major}{py.minor}":
            return True
        if abi == "abi3" and interp.startswith("cp3") and int(interp[3:] or 99) <= py.minor:
            return True
    return False


def _x86_64(tags: list[str]) -> list[str]:
    return [t for t in tags if "x86_64" in t or t.endswith("-any")]


def _gpu_ccs(profile: dict) -> list[tuple[str, tuple[int, int]]]:
    out = []
    for g in profile.get("gpu") or []:
        cc = g.get("compute_capability")
        if cc:
            out.append((g.get("name", "GPU"), parse_cc(cc)))
    return out


def _sass_covers(arch_list: str, cc: tuple[int, int]) -> bool:
    return any(a[0] == cc[0] and a[1] <= cc[1] for a, _ptx in parse_arch_list(arch_list))


def _judge(data: CompatData, v: str, cuda: str, mode: str, profile: dict, pythons: list[Version]) -> tuple[bool, str, dict]:
    """Whether vLLM ``v`` runs here on ``cuda`` in ``mode``: (ok, why-not or note, details)."""
    vf = data.vllm(v)
    if vf is None or vf.torch is None:
        return False, f"vLLM {v}: no torch pin in the data", {}
    tv = str(vf.torch.value)
    tf = data.torch(tv)
    if tf is None:
        return False, f"vLLM {v}: torch {tv} not in the data", {}
    gpus = _gpu_ccs(profile)
    det: dict = {"torch": tv, "vf": vf, "tf": tf}
    if mode == "wheel":
        wc = vf.wheel_cuda.value if vf.wheel_cuda is not None else None
        if wc is None or major_minor(str(wc)) != cuda:
            return False, "", {}
        tags = _x86_64(list(vf.wheels.value) if vf.wheels is not None else [])
        if vf.wheels is not None and not tags:
            return False, f"vLLM {v}: no Linux x86_64 wheel", {}
        torch_arch = tf.arch.get(cuda)
    else:
        if vf.sdist is not None and not vf.sdist.value:
            return False, f"vLLM {v}: no sdist to build", {}
        if cuda not in tf.cuda_variants.value:
            return False, "", {}
        toolkits = {major_minor(k) for k in ((profile.get("machine") or {}).get("cuda_toolkits") or {})}
        if cuda not in toolkits:
            return False, f"vLLM {v} from source: no CUDA {cuda} toolkit on this machine", {}
        tags = None
        torch_arch = tf.arch.get(cuda)
    # Python: vLLM's range, torch's, and the wheel's tags
    spec = SpecifierSet(str(vf.python.value) if vf.python is not None else "") & SpecifierSet(str(tf.python.value))
    py, why = _python_for(str(spec), pythons, tags)
    if pythons and py is None:
        return False, f"vLLM {v} (torch {tv}): {why}", {}
    det["python"] = f"{py.major}.{py.minor}" if py is not None else _newest_minor(spec)
    # GPU archs: vLLM's kernels, torch's, nvcc's
    vb = vf.build_archs(cuda)
    for name, cc in gpus:
        ccs = f"{cc[0]}.{cc[1]}"
        if vb is None:
            return False, f"vLLM {v}: its CUDA {cuda} archs are not in the data", {}
        if not _sass_covers(vb.value, cc):
            return False, f"vLLM {v}: arch dropped (builds {vb.value}; {name} is {ccs})", {}
        if torch_arch is None:
            return False, f"torch {tv}+{_cuda_tag(cuda)}: its arch list is not in the data", {}
        if not arch_list_runs_on(torch_arch.value, cc):
            return False, f"torch {tv}+{_cuda_tag(cuda)}: arch dropped ({torch_arch.value}; {name} is {ccs})", {}
        if mode == "source":
            cf = data.cuda(cuda)
            if not any(a[0] == cc[0] and a[1] <= cc[1] for a in cf.sm_real()):
                return False, f"nvcc {cuda} cannot build for {name} ({ccs})", {}
    return True, "", det


def _older_or_same(why: str, chosen: str) -> bool:
    """A reason about a release no newer than the one chosen (it explains nothing)."""
    import re
    m = re.match(r"vLLM (\S+?)[: ]", why)
    return bool(m) and _v(m.group(1)) is not None and Version(m.group(1)) <= Version(chosen)


def _newest_minor(spec: SpecifierSet) -> str:
    for m in range(15, 7, -1):
        if spec.contains(f"3.{m}.0", prereleases=True):
            return f"3.{m}"
    return "3"


def plan(profile: dict, data: CompatData, machine_name: str = "this machine") -> dict:
    """``{machine, options: [...], recommendation}`` (cli.md's plan JSON)."""
    m = profile.get("machine") or {}
    driver, driver_cuda = m.get("driver"), m.get("driver_cuda")
    pythons = _pythons(profile)
    releases = sorted(data.vllm_releases(), key=Version, reverse=True)
    if not releases:
        raise UsageError("The compatibility data has no per-release vLLM facts (data/compat.lock.toml is missing).",
                         "Run `invoke compat --refresh` with PyPI reachable.")
    options: list[Option] = []
    for cuda in sorted(data.cuda_versions(), key=Version, reverse=True):
        runs, how = driver_supports(data, cuda, driver, driver_cuda)
        if not runs:
            options.append(Option(cuda, None, None, None, None, False, how))
            continue
        found = None
        excluded: dict[str, str] = {}     # reason (without the release) -> newest release it excluded
        for mode in ("wheel", "source"):   # a prebuilt wheel first; a source build only when none runs
            for v in releases:
                ok, why, det = _judge(data, v, cuda, mode, profile, pythons)
                if ok:
                    found = (v, mode, det)
                    break
                if why:
                    key = why.split(": ", 1)[1] if why.startswith(("vLLM ", "torch ")) else why
                    excluded.setdefault(key, why)
            if found is not None:
                break
        reasons = [w for w in excluded.values() if found is None or not _older_or_same(w, found[0])]
        reasons = [w for w in reasons if "no torch pin" not in w] or reasons   # old releases: noise
        if found is None:
            options.append(Option(cuda, None, None, None, None, False,
                                  "; ".join(reasons[:3]) or f"no vLLM release in the data is built for CUDA {cuda}"))
            continue
        v, mode, det = found
        why = "; ".join(([how] if "minor-version" in how else []) + reasons[:3]) or how
        options.append(Option(cuda, det["torch"], v, det["python"], mode, True, why,
                              extra={"vf": det["vf"], "tf": det["tf"], "driver_note": how}))
    good = [o for o in options if o.ok]
    rec = None
    if good:
        full = [o for o in good if "minor-version" not in o.extra.get("driver_note", "")] or good
        best = max(full, key=lambda o: (o.mode == "wheel", Version(o.vllm), Version(o.cuda)))
        rec = {"variant": f"{_cuda_tag(best.cuda)}-vllm{best.vllm.replace('.', '')}", "cuda": best.cuda,
               "torch": best.torch, "vllm": best.vllm, "python": best.python, "mode": best.mode}
    gpus = ", ".join(f"{g.get('name', '?')} ({g.get('compute_capability', '?')})" for g in profile.get("gpu") or [])
    return {"machine": {"name": machine_name, "driver": driver, "driver_cuda": driver_cuda, "gpus": gpus or "none",
                        "python": [str(p) for p in pythons],
                        "cuda_toolkits": sorted((m.get("cuda_toolkits") or {}), key=Version)},
            "options": [o.to_dict() for o in options], "recommendation": rec,
            "_options": options}


def public(report: dict) -> dict:
    return {k: v for k, v in report.items() if not k.startswith("_")}


def render_variant(report: dict, data: CompatData) -> str:
    """The recommendation as an ``envs/*.toml`` variant."""
    rec = report.get("recommendation")
    if rec is None:
        raise UsageError("plan: nothing runs on this machine, so there is no variant to write.",
                         "See the options' reasons (driver, GPU arch, Python) and fix the machine first.")
    opt = next(o for o in report["_options"] if o.ok and o.cuda == rec["cuda"] and o.vllm == rec["vllm"])
    vf = opt.extra["vf"]
    cuda, tag, tv = rec["cuda"], _cuda_tag(rec["cuda"]), rec["torch"]
    mach = report["machine"]
    py = rec["python"]
    lo = Version(py)
    pkgs = [f"torch=={tv}"]
    for k in ("torchvision", "torchaudio"):
        f = getattr(vf, k, None)
        if f is not None:
            pkgs.append(f"{k}=={f.value}")
    lines = [f"# Written by `invoke plan` for {mach['name']}: {mach['gpus']}, driver {mach['driver'] or 'none'}.",
             f"# For machines like it: a driver that runs CUDA {cuda} and GPUs these wheels cover.",
             f"description = \"CUDA {cuda}: vLLM {rec['vllm']} "
             + ("prebuilt wheel" if rec["mode"] == "wheel" else "built from source")
             + f" on torch {tv} (planned for {mach['name']})\"",
             f"cuda = \"{cuda}\"", f"python = \">={lo.major}.{lo.minor},<{lo.major}.{lo.minor + 1}\"", "", "[torch]",
             f"version = \"{tv}\""]
    if rec["mode"] == "wheel":
        lines.append("packages = [" + ", ".join(f'"{p}"' for p in pkgs) + "]")
        lines.append(f"# no index_url: PyPI's Linux wheels of torch {tv} are the CUDA {cuda} build")
    else:
        lines.append("packages = [" + ", ".join(f'"{p}+{tag}"' for p in pkgs) + "]")
        lines.append(f"index_url = \"{PYTORCH_WHL}/{tag}\"")
    lines += ["", "[vllm]", f"version = \"{rec['vllm']}\"", f"mode = \"{rec['mode']}\""]
    if rec["mode"] == "source":
        lines.append("source = \"pypi-sdist\"")
    deps = []
    if vf.numpy is not None and vf.numpy.value in ("<2", "1-runtime"):
        deps.append("numpy<2")
    if rec["mode"] == "source":
        deps += [f"cmake>={vf.cmake_min.value}" if vf.cmake_min is not None else "cmake>=3.26", "ninja"]
    if deps:
        lines += ["", "[deps]", "packages = [" + ", ".join(f'"{d}"' for d in deps) + "]"]
    imports = ["vllm"]
    if rec["mode"] == "source" and vf.xformers is not None:
        lines += ["", "[post_install]", f"packages = [\"xformers=={vf.xformers.value}\"]",
                  f"index_url = \"{PYTORCH_WHL}/{tag}\""]
        imports.append("xformers")
    lines += ["", "[verify]", "imports = [" + ", ".join(f'"{i}"' for i in imports) + "]",
              "extensions = [\"vllm._C\"]", ""]
    return "\n".join(lines)


def write_variant(report: dict, data: CompatData, path: Path) -> Path:
    path = Path(path)
    if path.suffix != ".toml":
        raise UsageError(f"--write {path}: a variant file ends in .toml.", "Write it as envs/NAME.toml.")
    text = render_variant(report, data)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    tmp.replace(path)
    load_variant_file(path)   # the file it wrote must load as a variant (raises UsageError otherwise)
    return path


def render_table(report: dict, console: Any = None) -> None:
    from rich.console import Console
    from rich.markup import escape
    from rich.table import Table
    mach = report["machine"]
    t = Table(title=escape(f"plan: {mach['name']} -- {mach['gpus']}, driver {mach['driver'] or 'none'}, Python "
                           f"{', '.join(mach['python']) or '?'}, toolkits {', '.join(mach['cuda_toolkits']) or 'none'}"),
              show_lines=True)
    for c in ("cuda", "vllm", "torch", "python", "mode", "ok", "why"):
        t.add_column(c, overflow="fold")
    for o in report["options"]:
        t.add_row(*(escape(str(o[c] if o[c] is not None else "-")) for c in ("cuda", "vllm", "torch", "python", "mode")),
                  "[green]yes[/]" if o["ok"] else "[red]no[/]", escape(o["why"]))
    console = console or Console()
    console.print(t)
    rec = report.get("recommendation")
    if rec:
        console.print(escape(f"recommendation: {rec['variant']}: vLLM {rec['vllm']} ({rec['mode']}) on torch "
                             f"{rec['torch']}, CUDA {rec['cuda']}, Python {rec['python']}"))
    else:
        console.print("recommendation: none -- nothing in the data runs on this machine")
