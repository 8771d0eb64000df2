"""Variants as data: ``envs/<name>.toml``, one file per CUDA variant, validated on load.

Every problem with a variant file becomes one ``UsageError`` that names the file, the key and the fix;
never a traceback.  The schema below is the single description of what a variant may say.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from packaging.requirements import InvalidRequirement, Requirement
from packaging.specifiers import InvalidSpecifier, SpecifierSet
from packaging.version import InvalidVersion, Version

from vllm_harness.core import gitcmd, safeio
from vllm_harness.core.errors import UsageError
from vllm_harness.core.layout import NAME_RE
from vllm_harness.core.safeio import tomllib  # the one TOML shim (tomli on 3.10)

ENV_NAME_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
MAX_LIST = 64
MAX_STR = 4096


# --------------------------------------------------------------------------------------------- checkers
# A checker takes the raw value and returns the normalised one or raises ValueError(reason, fix).

class Bad(ValueError):
    def __init__(self, reason: str, fix: str):
        super().__init__(reason)
        self.reason = reason
        self.fix = fix


def _str(v: Any) -> str:
    if not isinstance(v, str):
        raise Bad(f"expected a string, got {type(v).__name__} {v!r:.60}", "quote the value")
    if len(v) > MAX_STR:
        raise Bad(f"string of {len(v)} characters is too long", f"keep it under {MAX_STR} characters")
    return v


def _nonempty(v: Any) -> str:
    s = _str(v).strip()
    if not s:
        raise Bad("is empty", "give a value or remove the key")
    return s


def check_bool(v: Any) -> bool:
    if not isinstance(v, bool):
        raise Bad(f"expected true or false, got {v!r:.60}", "write true or false (no quotes)")
    return v


def _parsed_by(
    parse: Callable[[str], Any], error: type[Exception], what: str, fix: str
) -> Callable[[Any], str]:
    """A checker: the value is a non-empty string that ``parse`` accepts (packaging's Version,
    SpecifierSet...)."""

    def check(v: Any) -> str:
        s = _nonempty(v)
        try:
            parse(s)
        except error:
            raise Bad(f"{s!r} is not {what}", fix) from None
        return s

    return check


_version = _parsed_by(Version, InvalidVersion, "a version", "write a version such as '2.6.0'")


def _cuda(v: Any) -> str:
    s = _nonempty(v)
    if not re.fullmatch(r"\d{1,2}\.\d{1,2}", s):
        raise Bad(f"{s!r} is not a CUDA version", "write major.minor, e.g. '11.8' or '12.4'")
    return s


_specifier = _parsed_by(SpecifierSet, InvalidSpecifier, "a version specifier", "write e.g. '>=3.10,<3.11'")


def _requirement(v: Any) -> str:
    s = _nonempty(v)
    try:
        Requirement(s)
    except InvalidRequirement as e:
        raise Bad(f"{s!r} is not a valid requirement ({e})", "write it like 'torch==2.6.0'") from None
    return s


def _url(v: Any) -> str:
    s = _nonempty(v)
    if not re.match(r"^(https?|file)://[^\s]+$", s):
        raise Bad(
            f"{s!r} is not an http(s):// or file:// URL",
            "give the index URL, e.g. 'https://download.pytorch.org/whl/cu118'",
        )
    return s


def _git_url(v: Any) -> str:
    try:
        return gitcmd.check_url(_nonempty(v), "git")
    except UsageError as e:
        raise Bad(e.message.removeprefix("git: "), e.fix or "") from None


def _git_ref(v: Any) -> str:
    try:
        return gitcmd.check_ref(_nonempty(v), "ref")
    except UsageError as e:
        raise Bad(e.message.removeprefix("ref: "), e.fix or "") from None


def _relpath(v: Any) -> str:
    s = _nonempty(v)
    if "\x00" in s:
        raise Bad("contains a NUL byte", "give a plain path")
    return s


def _choice(*options: str) -> Callable[[Any], str]:
    def check(v: Any) -> str:
        s = _nonempty(v)
        if s not in options:
            raise Bad(f"{s!r} is not one of {', '.join(options)}", f"use one of: {', '.join(options)}")
        return s

    return check


def _int_range(lo: int, hi: int) -> Callable[[Any], int]:
    def check(v: Any) -> int:
        if isinstance(v, bool) or not isinstance(v, int):
            raise Bad(f"expected a whole number, got {v!r:.60}", f"write a number from {lo} to {hi}")
        if not lo <= v <= hi:
            raise Bad(f"{v} is out of range", f"write a number from {lo} to {hi}")
        return v

    return check


def _jobs(v: Any) -> int | str:
    if v == "auto":
        return v
    try:
        return _int_range(1, 1024)(v)
    except Bad:
        raise Bad(f"expected 'auto' or a number, got {v!r:.60}", "write jobs = 'auto' or jobs = 4") from None


def _arch_list(v: Any) -> str:
    s = _str(v).strip()
    for item in re.split(r"[;\s]+", s) if s else []:
        if not re.fullmatch(r"\d{1,2}\.\d[af]?(\+PTX)?", item):
            raise Bad(
                f"{item!r} is not a CUDA arch", "write e.g. '7.5;8.9' or '9.0+PTX' (empty = from the GPU)"
            )
    return s


def list_of(
    check: Callable[[Any], Any], limit: int = MAX_LIST, example: str = '["numpy<2"]'
) -> Callable[[Any], list]:
    """A checker for a list whose items ``check`` validates (shared with the machine-profile loader)."""

    def run(v: Any) -> list:
        if not isinstance(v, list):
            raise Bad(f"expected a list, got {type(v).__name__} {v!r:.60}", f"write a list, e.g. {example}")
        if len(v) > limit:
            raise Bad(f"list of {len(v)} items is too long", f"keep it under {limit} items")
        out = []
        for i, item in enumerate(v):
            try:
                out.append(check(item))
            except Bad as e:
                raise Bad(f"item {i}: {e.reason}", e.fix) from None
        return out

    return run


def _env_table(v: Any) -> dict[str, str]:
    if not isinstance(v, dict):
        raise Bad(
            f'expected a table of NAME = "value", got {type(v).__name__}', 'write env = { MAX_JOBS = "2" }'
        )
    out = {}
    for k, val in v.items():
        if not ENV_NAME_RE.match(k):
            raise Bad(f"{k!r} is not an environment variable name", "use letters, digits and _")
        if not isinstance(val, str):
            raise Bad(f"{k} = {val!r:.60} is not a string", f'quote it: {k} = "{val}"')
        out[k] = val
    return out


# --------------------------------------------------------------------------------------------- schema
# section -> key -> (checker, required, default)
Field_ = tuple[Callable[[Any], Any], bool, Any]

SCHEMA: dict[str, dict[str, Field_]] = {
    "": {
        "description": (_nonempty, True, None),
        "cuda": (_cuda, True, None),
        "python": (_specifier, True, None),
        "installer": (_choice("uv", "pip"), False, "uv"),
    },
    "torch": {
        "version": (_version, True, None),
        "packages": (list_of(_requirement), True, None),
        "index_url": (_url, False, None),
        "preinstalled": (check_bool, False, False),
    },
    "vllm": {
        "version": (_version, True, None),
        "mode": (_choice("source", "wheel"), True, None),
        "source": (_choice("pypi-sdist", "git", "path"), False, "pypi-sdist"),
        "requirement": (_requirement, False, None),
        "index_url": (_url, False, None),
        "git": (_git_url, False, None),
        "ref": (_git_ref, False, None),
        "path": (_relpath, False, None),
        "in_place": (check_bool, False, False),
        "package": (_nonempty, False, "vllm"),
    },
    "deps": {
        "packages": (list_of(_requirement), False, []),
        "index_url": (_url, False, None),
    },
    "build": {
        "jobs": (_jobs, False, "auto"),
        "nvcc_threads": (_int_range(1, 64), False, 1),
        "arch_list": (_arch_list, False, ""),
        "editable": (check_bool, False, True),
        "cmake_min": (_version, False, "3.26"),
        "env": (_env_table, False, {}),
        "toolkit": (_choice("system", "pypi"), False, "system"),
        "farm": (_url, False, None),  # the sccache-dist scheduler (toolchain/build_farm; --farm overrides)
    },
    "post_install": {
        "packages": (list_of(_requirement), False, []),
        "index_url": (_url, False, None),
    },
    "verify": {
        "imports": (list_of(_nonempty), False, ["vllm"]),
        # empty: every extension module the installed package ships (a release renames them:
        # _C_stable_libtorch)
        "extensions": (list_of(_nonempty), False, []),
        "ops": (list_of(_nonempty), False, ["rms_norm", "fused_add_rms_norm", "silu_and_mul"]),
        "device": (_choice("cuda", "cpu"), False, "cuda"),
    },
}
REQUIRED_SECTIONS = {"torch", "vllm"}


@dataclass(frozen=True)
class Variant:
    """One build variant, as validated from ``envs/<name>.toml``."""

    name: str
    path: Path
    description: str
    cuda: str
    python: str
    installer: str
    torch: dict
    vllm: dict
    deps: dict
    build: dict
    post_install: dict
    verify: dict
    raw_text: str = field(repr=False, default="")

    @property
    def python_spec(self) -> SpecifierSet:
        return SpecifierSet(self.python)

    @property
    def cuda_tag(self) -> str:  # '11.8' -> 'cu118'
        return "cu" + self.cuda.replace(".", "")

    @property
    def torch_version(self) -> Version:
        return Version(self.torch["version"])

    @property
    def vllm_requirement(self) -> str:
        return self.vllm["requirement"] or f"{self.vllm['package']}=={self.vllm['version']}"

    def source_path(self) -> Path | None:
        p = self.vllm.get("path")
        if p is None:
            return None
        path = Path(p)
        return path if path.is_absolute() else (self.path.parent / path).resolve()

    def fix_context(self) -> dict[str, str]:
        """Values that fill the placeholders of the fixes in data/failures.toml."""
        ctx = {
            "variant": self.name,
            "cuda": self.cuda,
            "torch": self.torch["version"],
            "python": self.python,
            "cmake_min": self.build["cmake_min"],
        }
        if self.torch["index_url"]:
            ctx["torch_index"] = self.torch["index_url"]
        for req in self.post_install["packages"]:
            if Requirement(req).name == "xformers":
                ctx["xformers"] = req
        return ctx


def _fail(file: Path, key: str, reason: str, fix: str) -> UsageError:
    where = f"{file}: key '{key}'" if key else f"{file}"
    return UsageError(f"{where}: {reason}.", fix[0].upper() + fix[1:] + ".")


def _variant_toml(path: Path, text: str) -> dict:
    try:
        safeio.prescan_toml(text)
        return tomllib.loads(text)
    except safeio.TomlLimit as e:
        raise _fail(
            path,
            "",
            f"{e}, past what a variant file may hold",
            "flatten the file (a variant is a few tables of plain keys)",
        ) from None
    except tomllib.TOMLDecodeError as e:
        raise _fail(path, "", f"is not valid TOML ({e})", "correct the TOML syntax at that line") from None


def _default(default: Any) -> Any:
    """A fresh copy of a schema default (a list or table is never shared between variants)."""
    if isinstance(default, list):
        return list(default)
    return dict(default) if isinstance(default, dict) else default


def _section(path: Path, section: str, fields: dict, given: dict) -> dict[str, Any]:
    """One section's keys checked against its schema: unknown keys refused, missing ones required or
    defaulted."""
    for key in given:
        if key not in fields:
            dotted = f"{section}.{key}" if section else key
            known = ", ".join(fields)
            raise _fail(path, dotted, "is not a known key", f"use one of: {known} (or remove it)")
    out: dict[str, Any] = {}
    for key, (check, required, default) in fields.items():
        dotted = f"{section}.{key}" if section else key
        if key not in given:
            if required:
                raise _fail(
                    path,
                    dotted,
                    "is missing",
                    f"add {key} = ... to {'[' + section + ']' if section else 'the top of the file'}",
                )
            out[key] = _default(default)
            continue
        try:
            out[key] = check(given[key])
        except Bad as e:
            raise _fail(path, dotted, e.reason, e.fix) from None
    return out


def _check_vllm_source(path: Path, v: dict[str, Any]) -> None:
    """source = 'git' needs git; source = 'path' needs a path to a folder."""
    if v["source"] == "git" and not v["git"]:
        raise _fail(
            path,
            "vllm.git",
            "is missing for source = 'git'",
            "add git = 'https://github.com/vllm-project/vllm.git' and ref = 'v<version>'",
        )
    if v["source"] == "path":
        if not v["path"]:
            raise _fail(
                path, "vllm.path", "is missing for source = 'path'", "add path = '<dir of a vLLM checkout>'"
            )
        p = Path(v["path"])
        p = p if p.is_absolute() else (path.parent / p).resolve()
        if not p.is_dir():
            raise _fail(path, "vllm.path", f"{p} is not a directory", "point it at a vLLM source checkout")


def parse_variant(name: str, path: Path, text: str) -> Variant:
    data = _variant_toml(path, text)
    sections: dict[str, dict] = {}
    top = {k: v for k, v in data.items() if not isinstance(v, dict)}
    for key, value in data.items():
        if isinstance(value, dict):
            if key not in SCHEMA or key == "":
                known = ", ".join(f"[{s}]" for s in SCHEMA if s)
                raise _fail(path, key, "is not a known section", f"use one of {known}, or remove it")
    for section, fields in SCHEMA.items():
        given = top if section == "" else data.get(section)
        if given is None:
            if section in REQUIRED_SECTIONS:
                raise _fail(path, section, "section is missing", f"add a [{section}] table")
            given = {}
        if not isinstance(given, dict):
            raise _fail(path, section, "must be a table", f"write it as [{section}]")
        sections[section] = _section(path, section, fields, given)

    v = sections["vllm"]
    _check_vllm_source(path, v)
    b = sections["build"]
    if b["toolkit"] == "pypi" and int(sections[""]["cuda"].split(".")[0]) < 13:
        raise _fail(
            path,
            "build.toolkit",
            f"'pypi' needs CUDA 13 or newer, and this variant's cuda is "
            f"{sections['']['cuda']}: PyPI's nvidia-cuda-nvcc-cu12/-cu11 wheels hold ptxas alone (no nvcc, "
            "cudafe++, fatbinary)",
            f'write toolkit = "system" and install CUDA {sections[""]["cuda"]} '
            "(`invoke doctor` names how for this machine), or use conda-forge's cuda-nvcc",
        )
    t = sections["torch"]
    names = [Requirement(r).name.lower() for r in t["packages"]]
    if "torch" not in names:
        raise _fail(
            path, "torch.packages", "names no 'torch' requirement", "add e.g. 'torch==" + t["version"] + "'"
        )
    top_s = sections[""]
    return Variant(
        name=name,
        path=path,
        description=top_s["description"],
        cuda=top_s["cuda"],
        python=top_s["python"],
        installer=top_s["installer"],
        torch=t,
        vllm=v,
        deps=sections["deps"],
        build=sections["build"],
        post_install=sections["post_install"],
        verify=sections["verify"],
        raw_text=text,
    )


def load_variant_file(path: Path) -> Variant:
    name = path.stem
    if not NAME_RE.match(name):
        raise _fail(
            path,
            "",
            f"variant name {name!r} is not allowed",
            "name the file with lowercase letters, digits, '.', '_' or '-'",
        )
    # type and size are checked on the open file before a byte is read (a FIFO, /dev/zero, a 5 GB file)
    text = safeio.read_text(
        path,
        "Variant file",
        safeio.TOML_MAX_BYTES,
        "Give a variant file: a regular UTF-8 TOML file under 1 MiB (see envs/).",
    )
    return parse_variant(name, path, text)


def variant_files(envs_dir: Path) -> list[Path]:
    return sorted(p for p in envs_dir.glob("*.toml") if p.is_file())


def variant_names(envs_dir: Path) -> list[str]:
    """Names for nox's session list: read without validating (the session validates and reports)."""
    return [p.stem for p in variant_files(envs_dir) if NAME_RE.match(p.stem)]


def load_variant(name_or_path: str, envs_dirs: list[Path]) -> Variant:
    """A variant by name (searched in ``envs_dirs``) or by path to a ``.toml`` file."""
    if name_or_path.endswith(".toml") or "/" in name_or_path:
        p = Path(name_or_path)
        if not p.exists():
            raise UsageError(f"Variant file {p} does not exist.", "Give the path of an envs/*.toml file.")
        return load_variant_file(p.resolve())
    for d in envs_dirs:
        p = d / f"{name_or_path}.toml"
        if p.is_file():
            return load_variant_file(p)
    known = sorted({n for d in envs_dirs if d.is_dir() for n in variant_names(d)})
    raise UsageError(
        f"Unknown variant {name_or_path!r}.",
        f"Use one of: {', '.join(known) or '(none found)'}, or add envs/{name_or_path}.toml.",
    )
