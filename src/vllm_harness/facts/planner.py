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

from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from packaging.specifiers import InvalidSpecifier, SpecifierSet
from packaging.version import Version

from vllm_harness.core import writer
from vllm_harness.core.errors import UsageError
from vllm_harness.core.layout import NAME_RE
from vllm_harness.facts import feasibility
from vllm_harness.facts.compat import CompatData, major_minor
from vllm_harness.facts.feasibility import Candidate, version_or_none
from vllm_harness.facts.variants import parse_variant

PYTORCH_WHL = "https://download.pytorch.org/whl"
#: the first words of every variant file ``plan --write`` writes: how a file the harness may replace is known
PLAN_MARK = "# Written by `invoke plan`"


@dataclass
class Option:
    cuda: str
    torch: str | None
    vllm: str | None
    python: str | None
    mode: str | None            # 'wheel' | 'source' | None (nothing runs)
    ok: bool
    why: str
    tier: str = "cannot"        # feasibility.TIERS
    fixes: list = field(default_factory=list)
    # not in the JSON: what write_variant needs
    extra: dict = field(default_factory=dict, repr=False)

    def to_dict(self) -> dict:
        d = asdict(self)
        d.pop("extra")
        return d


def cuda_tag(cuda: str) -> str:
    return "cu" + cuda.replace(".", "")


def driver_supports(
    data: CompatData, cuda: str, driver: str | None, driver_cuda: str | None
) -> tuple[bool, str]:
    """(runs, how): the judge's driver rule (facts/feasibility.py), as a yes/no."""
    state, how = feasibility.driver_status(data, cuda, driver, driver_cuda)
    if state == "none":
        return True, how
    return state in ("ok", "minor-compat"), how


def machine_pythons(profile: dict) -> list[Version]:
    out = []
    for p in (profile.get("machine") or {}).get("python") or []:
        v = version_or_none(p)
        if v is not None:
            out.append(v)
    return sorted(out)


def _python_for(
    spec: str, pythons: list[Version], tags: list[str] | None = None
) -> tuple[Version | None, str]:
    """The newest interpreter in ``spec`` (and covered by the wheel ``tags``), or (None, why)."""
    try:
        s = SpecifierSet(spec)
    except InvalidSpecifier:
        return None, f"bad Python range {spec!r}"
    fits = [p for p in pythons if s.contains(p, prereleases=True) and tag_covers(tags, p)]
    if fits:
        return fits[-1], ""
    found = ", ".join(f"{p.major}.{p.minor}" for p in pythons) or "none"
    return None, f"no wheel for this Python (needs {spec}; found {found})"


def tag_covers(tags: list[str] | None, py: Version) -> bool:
    if not tags:
        return True
    for t in tags:
        interp, abi, _plat = (t.split("-", 2) + ["", ""])[:3]
        if interp.startswith("py3") or interp == f"cp{py.major}{py.minor}":
            return True
        if abi == "abi3" and interp.startswith("cp3") and int(interp[3:] or 99) <= py.minor:
            return True
    return False


def for_arch(tags: list[str], arch: str | None) -> list[str]:
    arch = arch or "x86_64"
    return [t for t in tags if t.endswith(arch) or t.endswith("-any")]


#: a judge's failure id, as a few words in plan's reasons
_LABEL = {
    "no-kernel-image": "arch dropped",
    "arch-unsupported-by-nvcc": "nvcc cannot build for this GPU",
    "driver-too-old": "driver too old",
    "cuda-forward-compat": "forward compatibility",
    "torch-cpu-only": "PyPI's torch has no CUDA on this platform",
    "torch-wheel-not-found": "platform",
    "cuda-home-missing": "no CUDA toolkit",
    "nvcc-not-found": "no nvcc",
    "cuda-torch-version-mismatch": "toolkit of another CUDA",
    "compat-unknown": "not in the data",
    "python-unsupported": "no interpreter for it",
    "python-headers-missing": "no Python.h",
    "host-compiler-unsupported": "host compiler",
    "cmake-too-old": "cmake too old",
    "disk-full": "disk space",
}


def _reason(issue: feasibility.Issue) -> str:
    f = issue.finding
    return f"{_LABEL.get(f.id, f.id)}: {f.subject} ({f.evidence})"


def _candidate(
    data: CompatData, v: str, cuda: str, mode: str, profile: dict, pythons: list[Version]
) -> tuple[Candidate | None, str, dict]:
    """The candidate vLLM ``v`` on ``cuda`` in ``mode`` is on this machine (how torch comes, which Python), or
    (None, why) when the data rules it out before any machine rule: no such build, no Python for it."""
    vf = data.vllm(v)
    if vf is None or vf.torch is None:
        return None, f"vLLM {v}: no torch pin in the data", {}
    tv = str(vf.torch.value)
    tf = data.torch(tv)
    if tf is None:
        return None, f"vLLM {v}: torch {tv} not in the data", {}
    arch, jetson = feasibility.cpu_arch(profile), feasibility.is_jetson(profile)
    tag = cuda_tag(cuda)
    if mode == "wheel":
        wc = vf.wheel_cuda.value if vf.wheel_cuda is not None else None
        if wc is None or major_minor(str(wc)) != cuda:
            return None, "", {}
        tags = for_arch(list(vf.wheels.value) if vf.wheels is not None else [], arch)
        pypi_cuda, _f = feasibility.pypi_torch_cuda(data, tf, arch)
        # PyPI's torch where it is this CUDA's build; else the PyTorch index of this platform
        index = (
            None
            if pypi_cuda == cuda or not feasibility.index_has_torch(data, tf, cuda, arch)
            else f"{PYTORCH_WHL}/{tag}"
        )
        if index is not None and cuda not in tf.cuda_variants.value:
            return None, "", {}
        cand = Candidate(cuda, tv, v, "wheel", f"{tag}-vllm{v.replace('.', '')}", torch_index=index)
    else:
        if vf.sdist is not None and not vf.sdist.value:
            return None, f"vLLM {v}: no sdist to build", {}
        if cuda not in tf.cuda_variants.value:
            return None, "", {}
        tags = None
        cand = Candidate(
            cuda,
            tv,
            v,
            "source",
            f"{tag}-vllm{v.replace('.', '')}",
            torch_index=None if jetson else f"{PYTORCH_WHL}/{tag}",
            torch_preinstalled=jetson,
        )
    spec = SpecifierSet(str(vf.python.value) if vf.python is not None else "") & SpecifierSet(
        str(tf.python.value)
    )
    py, why = _python_for(str(spec), pythons, tags or None)
    # none of the machine's interpreters fits: the newest Python the release has wheels for, which the judge
    # says how to install (`uv python install`): a fix, not a reason to pass over the release
    minor = f"{py.major}.{py.minor}" if py is not None else _newest_minor(spec, tags or None)
    if minor is None:
        return None, f"vLLM {v} (torch {tv}): {why}", {}
    lo = Version(minor)
    rng = f">={lo.major}.{lo.minor},<{lo.major}.{lo.minor + 1}"   # the range render_variant writes
    cand = replace(cand, python=rng, deps=tuple(_deps(vf, mode)))
    return cand, "", {"vf": vf, "tf": tf, "python": minor}


def _newest_minor(spec: SpecifierSet, tags: list[str] | None = None) -> str | None:
    """The newest Python minor in ``spec`` that the wheel ``tags`` cover (None: no such minor)."""
    for m in range(15, 7, -1):
        if spec.contains(f"3.{m}.0", prereleases=True) and tag_covers(tags, Version(f"3.{m}")):
            return f"3.{m}"
    return None


def _deps(vf: Any, mode: str) -> list[str]:
    """The [deps] packages the variant plan writes installs (a source build's cmake and ninja from PyPI)."""
    deps = []
    if vf.numpy is not None and vf.numpy.value in ("<2", "1-runtime"):
        deps.append("numpy<2")
    if mode == "source":
        deps += [f"cmake>={vf.cmake_min.value}" if vf.cmake_min is not None else "cmake>=3.26", "ninja"]
    return deps


_GOOD = ("runs", "runs with warnings")


def _line(data: CompatData, cuda: str, profile: dict, pythons: list[Version], releases: list[str]) -> Option:
    """The best candidate on one CUDA line: a prebuilt wheel that runs, else a source build that runs, else
    what runs after fixes; else why nothing does.  Its ``why`` names what ruled out newer releases."""
    m = profile.get("machine") or {}
    state, how = feasibility.driver_status(
        data, cuda, m.get("driver"), m.get("driver_cuda"), feasibility.is_jetson(profile)
    )
    best: dict[tuple[str, str], tuple[Candidate, feasibility.Verdict, dict]] = {}
    reasons: dict[str, tuple[str, str, str]] = {}  # what (without the release) -> (mode, newest release, why)
    mode = "wheel"

    def note(key: str, v: str, why: str) -> None:
        reasons.setdefault(key, (mode, v, why))

    for mode in ("wheel", "source"):
        for v in releases:
            cand, why, det = _candidate(data, v, cuda, mode, profile, pythons)
            if cand is None:
                if why:
                    note(why.split(": ", 1)[-1], v, why)
                continue
            verdict = feasibility.judge(data, profile, cand, det["vf"], det["tf"])
            gaps = [i for i in verdict.issues if i.finding.id == "compat-unknown"]
            if gaps:  # plan proposes only what the data vouches for (doctor warns of the same gap)
                note(f"unknown {gaps[0].finding.subject}", v, f"vLLM {v}: {_reason(gaps[0])}")
                continue
            group = "good" if verdict.tier in _GOOD else verdict.tier
            if (mode, group) not in best:
                best[(mode, group)] = (cand, verdict, det)
            if group == "cannot":
                for i in verdict.issues:
                    if i.finding.severity == "error" and not i.fixable:
                        note(
                            f"{i.finding.id} {i.finding.subject.split(' ', 2)[-1]}",
                            v,
                            f"vLLM {v}: {_reason(i)}",
                        )
            if (mode, "good") in best:
                break
    driver_ids = ("driver-too-old", "cuda-forward-compat")
    for key in (
        ("wheel", "good"),
        ("source", "good"),
        ("wheel", "runs after fixes"),
        ("source", "runs after fixes"),
    ):
        if key in best:
            cand, verdict, det = best[key]
            shown = [
                i
                for i in verdict.issues
                if i.finding.severity in ("warning", "error")
                and i.finding.id not in ("bf16-unsupported", "flash-attn-unsupported-gpu") + driver_ids
            ]
            newer = [
                w
                for md, rv, w in reasons.values()
                if md == cand.mode and Version(rv) > Version(cand.vllm) and "no torch pin" not in w
            ]
            notes = ([how] if state != "none" else []) + [_reason(i) for i in shown] + newer
            return Option(
                cuda,
                cand.torch,
                cand.vllm,
                det["python"],
                cand.mode,
                verdict.tier in _GOOD,
                "; ".join(notes[:4]) or "runs as is",
                tier=verdict.tier,
                fixes=verdict.fixes,
                extra={"vf": det["vf"], "tf": det["tf"], "cand": cand, "verdict": verdict},
            )
    every = [w for _m, _v, w in reasons.values()]
    noise = (
        "no torch pin",
        "no sdist",
        "not in the data",
    )  # old releases, gaps: only when nothing else is said
    rs = (
        [w for w in every if not any(n in w for n in noise)]
        or [w for w in every if "no torch pin" not in w]
        or every
    )
    head = [how] if state in ("too-old", "other") else []
    return Option(
        cuda,
        None,
        None,
        None,
        None,
        False,
        "; ".join(head + rs[:3]) or f"no vLLM release in the data is built for CUDA {cuda}",
        tier="cannot",
    )


def _summary(o: Option) -> dict:
    return {
        "cuda": o.cuda,
        "vllm": o.vllm,
        "torch": o.torch,
        "python": o.python,
        "mode": o.mode,
        "variant": f"{cuda_tag(o.cuda)}-vllm{o.vllm.replace('.', '')}",
        "why": o.why,
        "fixes": o.fixes,
    }


def _rank(o: Option) -> tuple:
    return (o.mode == "wheel", Version(o.vllm), Version(o.cuda))


def plan(profile: dict, data: CompatData, machine_name: str = "this machine") -> dict:
    """``{machine, options: [...], tiers, recommendation}`` (cli.md's plan JSON): one option per CUDA line of
    the data, each judged by facts/feasibility.py; the tiers (the newest vLLM that runs as is, with warnings,
    after fixes) and one recommendation with its reason."""
    m = profile.get("machine") or {}
    driver, driver_cuda = m.get("driver"), m.get("driver_cuda")
    pythons = machine_pythons(profile)
    releases = sorted(data.vllm_releases(), key=Version, reverse=True)
    if not releases:
        raise UsageError(
            "The compatibility data has no per-release vLLM facts (data/compat.lock.toml is missing).",
            "Run `invoke compat --refresh` with PyPI reachable.",
        )
    options = [
        _line(data, cuda, profile, pythons, releases)
        for cuda in sorted(data.cuda_versions(), key=Version, reverse=True)
    ]
    tiers: dict[str, dict | None] = {}
    for t in feasibility.TIERS[:3]:
        pool = [o for o in options if o.tier == t]
        tiers[t.replace(" ", "_")] = (
            _summary(max(pool, key=lambda o: (Version(o.vllm), o.mode == "wheel"))) if pool else None
        )
    rec = None
    for t in feasibility.TIERS[:3]:
        pool = [o for o in options if o.tier == t]
        if not pool:
            continue
        best = max(pool, key=_rank) if t != "runs after fixes" else max(pool, key=_fix_rank)
        rec = {**_rec(best), "reason": _why_recommended(best, t, options)}
        break
    gpus = ", ".join(
        f"{g.get('name', '?')} ({g.get('compute_capability', '?')})" for g in profile.get("gpu") or []
    )
    return {
        "machine": {
            "name": machine_name,
            "driver": driver,
            "driver_cuda": driver_cuda,
            "gpus": gpus or "none",
            "python": [str(p) for p in pythons],
            "arch": feasibility.cpu_arch(profile),
            "glibc": m.get("glibc"),
            "jetson": feasibility.is_jetson(profile),
            "cuda_toolkits": sorted((m.get("cuda_toolkits") or {}), key=Version),
        },
        "options": [o.to_dict() for o in options],
        "tiers": tiers,
        "recommendation": rec,
        "_options": options,
    }


def _rec(o: Option) -> dict:
    return {
        "variant": f"{cuda_tag(o.cuda)}-vllm{o.vllm.replace('.', '')}",
        "cuda": o.cuda,
        "torch": o.torch,
        "vllm": o.vllm,
        "python": o.python,
        "mode": o.mode,
        "tier": o.tier,
        "fixes": o.fixes,
    }


def _driver_fix(o: Option) -> bool:
    v = o.extra.get("verdict")
    return v is not None and any(
        i.fixable
        and i.finding.severity == "error"
        and i.finding.id in ("driver-too-old", "cuda-forward-compat")
        for i in v.issues
    )


def _fix_rank(o: Option) -> tuple:
    """Among what runs after fixes: a fix that leaves the driver alone first (a driver upgrade needs root, a
    reboot and every user of the machine), then the fewest fixes, a wheel, the newest vLLM."""
    return (not _driver_fix(o), -len(o.fixes), o.mode == "wheel", Version(o.vllm))


def _why_recommended(best: Option, tier: str, options: list[Option]) -> str:
    """The recommendation's reason, with the trade-off against the newest vLLM that would run some other
    way."""
    built = "prebuilt wheel" if best.mode == "wheel" else "built from source"
    what = f"vLLM {best.vllm} ({built}, CUDA {best.cuda})"
    if tier == "runs":
        newest = "prebuilt wheel" if best.mode == "wheel" else "release"
        out = f"{what} is the newest {newest} that runs as is here"
        src = [
            o
            for o in options
            if o.tier == tier and o.mode != best.mode and Version(o.vllm) > Version(best.vllm)
        ]
        if src:
            o = max(src, key=lambda o: Version(o.vllm))
            out += (
                f" (vLLM {o.vllm} built from source also runs as is, on CUDA {o.cuda}: a wheel is preferred, "
                "no compiler or toolkit needed)"
            )
    elif tier == "runs with warnings":
        out = f"nothing runs as is; {what} runs with warnings: {best.why}"
    else:
        out = (
            f"nothing runs as is; {what} runs after these fixes: "
            + "; ".join(best.fixes)
            + (" (no driver upgrade needed)" if not _driver_fix(best) else "")
        )
    for t in feasibility.TIERS[1:3]:  # the newest that runs another way, per tier: what the choice trades
        newer = [o for o in options if o.tier == t and o is not best and Version(o.vllm) > Version(best.vllm)]
        if newer:
            alt = max(newer, key=lambda o: (Version(o.vllm), o.mode == "wheel"))
            out += (
                f". Trade-off: the newer vLLM {alt.vllm} ({alt.mode}, CUDA {alt.cuda}) {alt.tier}: {alt.why}"
                + (f" (fix: {'; '.join(alt.fixes)})" if alt.fixes else "")
                + f"; its variant would be {cuda_tag(alt.cuda)}-vllm{alt.vllm.replace('.', '')}"
            )
    return out


def public(report: dict) -> dict:
    return {k: v for k, v in report.items() if not k.startswith("_")}


def render_variant(report: dict, data: CompatData, option: Option | None = None) -> str:
    """The recommendation (or another planned ``option`` of the report) as an ``envs/*.toml`` variant."""
    rec = report.get("recommendation") if option is None else _rec(option)
    if rec is None:
        raise UsageError(
            "plan: nothing runs on this machine, even after fixes, so there is no variant to write.",
            "See the options' reasons (driver, GPU arch, Python) and fix the machine first.",
        )
    opt = option or next(
        o
        for o in report["_options"]
        if o.tier == rec["tier"] and o.cuda == rec["cuda"] and o.vllm == rec["vllm"]
    )
    vf, cand = opt.extra["vf"], opt.extra["cand"]
    cuda, tag, tv = rec["cuda"], cuda_tag(rec["cuda"]), rec["torch"]
    mach = report["machine"]
    py = rec["python"]
    lo = Version(py)
    pkgs = [f"torch=={tv}"]
    for k in ("torchvision", "torchaudio"):
        f = getattr(vf, k, None)
        if f is not None:
            pkgs.append(f"{k}=={f.value}")
    arch = mach.get("arch") or "x86_64"
    lines = [
        f"{PLAN_MARK} for {mach['name']}: {mach['gpus']}, driver {mach['driver'] or 'none'}, {arch}.",
        f"# For machines like it: a driver that runs CUDA {cuda} and GPUs these wheels cover.",
    ]
    lines += [f"# Before the build: {f}" for f in rec.get("fixes") or []]
    lines += [
        f'description = "CUDA {cuda}: vLLM {rec["vllm"]} '
        + ("prebuilt wheel" if rec["mode"] == "wheel" else "built from source")
        + f' on torch {tv} (planned for {mach["name"]})"',
        f'cuda = "{cuda}"',
        f'python = ">={lo.major}.{lo.minor},<{lo.major}.{lo.minor + 1}"',
        "",
        "[torch]",
        f'version = "{tv}"',
    ]
    if cand.torch_preinstalled:
        lines.append(f'packages = ["torch=={tv}"]')
        lines.append(
            "preinstalled = true   # JetPack's torch in the interpreter (NVIDIA's PyTorch for Jetson)"
        )
    elif cand.torch_index is None:
        lines.append("packages = [" + ", ".join(f'"{p}"' for p in pkgs) + "]")
        lines.append(f"# no index_url: PyPI's Linux {arch} wheels of torch {tv} are the CUDA {cuda} build")
    else:
        lines.append("packages = [" + ", ".join(f'"{p}+{tag}"' for p in pkgs) + "]")
        lines.append(
            f'index_url = "{cand.torch_index}"'
            + (
                f"   # the PyTorch index for {arch}: PyPI's torch there has no CUDA"
                if cand.mode == "wheel"
                else ""
            )
        )
    lines += ["", "[vllm]", f'version = "{rec["vllm"]}"', f'mode = "{rec["mode"]}"']
    if rec["mode"] == "source":
        lines.append('source = "pypi-sdist"')
    deps = _deps(vf, rec["mode"])
    if deps:
        lines += ["", "[deps]", "packages = [" + ", ".join(f'"{d}"' for d in deps) + "]"]
    imports = ["vllm"]
    if rec["mode"] == "source" and vf.xformers is not None and not cand.torch_preinstalled:
        lines += [
            "",
            "[post_install]",
            f'packages = ["xformers=={vf.xformers.value}"]',
            f'index_url = "{PYTORCH_WHL}/{tag}"',
        ]
        imports.append("xformers")
    # no extensions list: verify loads every extension module the release ships (vLLM 0.25 renamed _C)
    lines += ["", "[verify]", "imports = [" + ", ".join(f'"{i}"' for i in imports) + "]", ""]
    return "\n".join(lines)


def check_write(path: Path, force: bool = False) -> Path:
    """Validate ``plan --write PATH`` before anything is read, rendered or written: a variant's name
    (``NAME.toml``, the name nox's ``build-NAME`` uses), never ``pyproject.toml``, never a link, and no
    existing file the harness did not write (unless ``force``)."""
    path = Path(path)
    if path.name == "pyproject.toml":
        raise UsageError(
            f"--write {path}: that is a project file (pip, ruff and nox read any pyproject.toml up the "
            "tree), never a variant; nothing was written.",
            "Write it as envs/NAME.toml.",
        )
    if path.suffix != ".toml":
        raise UsageError(
            f"--write {path}: a variant file ends in .toml; nothing was written.",
            "Write it as envs/NAME.toml.",
        )
    if not NAME_RE.match(path.stem):
        raise UsageError(
            f"--write {path}: {path.stem!r} is not a variant name (lowercase letters, digits, '.', '_' "
            "or '-', 1-64 characters); nothing was written.",
            "Write it as envs/NAME.toml.",
        )
    writer.check_target(
        path,
        what="--write",
        force=force,
        marker=PLAN_MARK.encode(),
        fix="Give a new envs/NAME.toml, or pass --force to replace it.",
    )
    return path


def write_variant(report: dict, data: CompatData, path: Path, force: bool = False) -> Path:
    """Write the recommendation to ``path``: validated first (name, target, the variant itself), then one
    atomic write (core.writer); a refusal leaves any existing file unchanged."""
    path = check_write(path, force)
    text = render_variant(report, data)
    parse_variant(path.stem, path, text)  # the text must load as a variant (UsageError otherwise)
    writer.write_file(
        path,
        text,
        what="--write",
        force=force,
        marker=PLAN_MARK.encode(),
        fix="Give a new envs/NAME.toml, or pass --force to replace it.",
    )
    return path


def render_table(report: dict, console: Any = None) -> None:
    # rich is imported here: only the table output needs it (the JSON and the library do not)
    from rich.console import Console
    from rich.markup import escape
    from rich.table import Table

    mach = report["machine"]
    t = Table(
        title=escape(
            f"plan: {mach['name']} -- {mach['gpus']}, driver {mach['driver'] or 'none'}, "
            f"{mach.get('arch') or '?'}"
            + (f" glibc {mach['glibc']}" if mach.get("glibc") else "")
            + (" (Jetson)" if mach.get("jetson") else "")
            + f", Python "
            f"{', '.join(mach['python']) or '?'}, toolkits {', '.join(mach['cuda_toolkits']) or 'none'}"
        ),
        show_lines=True,
    )
    for c in ("cuda", "vllm", "torch", "python", "mode", "tier", "why"):
        t.add_column(c, overflow="fold")
    colour = {"runs": "green", "runs with warnings": "yellow", "runs after fixes": "cyan", "cannot": "red"}
    for o in report["options"]:
        # a fix's first way only (the JSON has them all)
        why = o["why"] + ("".join(f"\nfix: {f.split('; or ')[0]}" for f in o.get("fixes") or []))
        t.add_row(
            *(
                escape(str(o[c] if o[c] is not None else "-"))
                for c in ("cuda", "vllm", "torch", "python", "mode")
            ),
            f"[{colour.get(o.get('tier'), 'default')}]{escape(str(o.get('tier')))}[/]",
            escape(why),
        )
    console = console or Console()
    console.print(t)
    for key, tier in report.get("tiers", {}).items():
        if tier:
            console.print(
                escape(f"{key.replace('_', ' ')}: vLLM {tier['vllm']} ({tier['mode']}, CUDA {tier['cuda']})")
            )
    rec = report.get("recommendation")
    if rec:
        console.print(
            escape(
                f"recommendation: {rec['variant']}: vLLM {rec['vllm']} ({rec['mode']}) on torch "
                f"{rec['torch']}, CUDA {rec['cuda']}, Python {rec['python']} -- {rec['reason']}"
            )
        )
    else:
        console.print("recommendation: none -- nothing in the data runs on this machine, even after fixes")
