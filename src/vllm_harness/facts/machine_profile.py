"""A machine profile on disk (`invoke doctor --save-machine`, `--machine FILE`): the schema of its keys
(docs/contract/machine-profile.md), validation with one message per bad key, and the TOML writer."""
from __future__ import annotations

import math
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

from packaging.version import InvalidVersion, Version

from vllm_harness.core import safeio, writer
from vllm_harness.core.errors import UsageError
from vllm_harness.core.safeio import tomllib  # the one TOML shim (tomli on 3.10)
from vllm_harness.facts.machine import TOOLS
from vllm_harness.facts.variants import Bad, check_bool, list_of

# what a terminal would act on rather than show: C0 controls but tab and newline (ESC starts CSI/OSC
# sequences,
# BEL, CR rewrites the line), DEL, C1 controls (0x9b is a CSI on its own), the format characters that reorder
# or hide text
_CONTROL_RE = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f\u200b-\u200f\u2028-\u202e\u2060-\u206f\ufeff]")


def _s(v: Any) -> str:
    """Every string of a profile: terminal controls are kept as visible escapes (``\\x1b``), never passed to a
    terminal (a GPU name with ESC[2J would clear the screen of whoever runs doctor on the profile); tab and
    newline are kept (a probe's strings survive save and load unchanged)."""
    if not isinstance(v, str):
        raise Bad(f"expected a string, got {type(v).__name__} {v!r:.60}", "quote the value")
    if len(v) > 4096:
        raise Bad("string is too long", "keep it under 4096 characters")
    return _CONTROL_RE.sub(lambda m: m.group(0).encode("unicode_escape").decode("ascii"), v)


def _ver(v: Any) -> str:
    s = _s(v).strip()
    if not re.fullmatch(r"\d+(\.\d+){0,3}", s):
        raise Bad(f"{s!r} is not a version", 'write a dotted version such as "3.22.1"')
    try:
        Version(s)
    except InvalidVersion:  # pragma: no cover - the regex already rules this out
        raise Bad(f"{s!r} is not a version", 'write a dotted version such as "3.22.1"') from None
    return s


def _mm_str(what: str) -> Callable[[Any], str]:
    def check(v: Any) -> str:
        s = _s(v).strip()
        if not re.fullmatch(r"\d{1,2}\.\d{1,2}", s):
            raise Bad(
                f"{s!r} is not a {what}",
                f'write major.minor in quotes, e.g. '
                f'"{"8.9" if "capab" in what else "2.36" if "glibc" in what else "12.4"}"',
            )
        return s

    return check


def _int_pos(v: Any) -> int:
    if isinstance(v, bool) or not isinstance(v, int):
        raise Bad(f"expected a whole number, got {v!r:.60}", "write a number without quotes, e.g. 16")
    if not 1 <= v <= 100000:
        raise Bad(f"{v} is out of range", "write a number from 1 to 100000")
    return v


def _num(v: Any) -> float:
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        raise Bad(f"expected a number, got {v!r:.60}", "write a number without quotes, e.g. 64.0")
    f = float(v)
    if not math.isfinite(f) or f < 0:
        raise Bad(f"{v} is not a finite non-negative number", "write a number such as 64.0")
    return f


def _list(check: Callable[[Any], Any]) -> Callable[[Any], list]:
    return list_of(check, limit=256, example='["3.10.13"]')


def _tool_name(v: Any) -> str:
    s = _s(v)
    if s not in TOOLS:
        raise Bad(f"{s!r} is not a tool the probe looks for", f"use some of: {', '.join(TOOLS)}")
    return s


def _driver(v: Any) -> str:
    s = _s(v).strip()
    if not re.fullmatch(r"\d+(\.\d+){0,3}", s):
        raise Bad(f"{s!r} is not a driver version", 'write it as nvidia-smi shows it, e.g. "550.54.15"')
    return s


def _nonempty(v: Any) -> str:
    s = _s(v)
    if not s.strip():
        raise Bad("is empty", "give a value or remove the key")
    return s


def _cuda_toolkits(value: Any, fail: Callable[..., UsageError]) -> dict[str, str]:
    """[machine.cuda_toolkits]: {"X.Y": toolkit root}."""
    if not isinstance(value, dict):
        raise fail(
            "machine.cuda_toolkits",
            f"expected a table, got {type(value).__name__}",
            'write [machine.cuda_toolkits] with lines like "11.8" = "/usr/local/cuda-11.8"',
        )
    tk = {}
    for ver, root in value.items():
        if not re.fullmatch(r"\d{1,2}\.\d{1,2}", ver):
            raise fail(
                f"machine.cuda_toolkits.{ver}",
                "is not a CUDA major.minor",
                'use the toolkit version as the key, e.g. "12.4"',
            )
        try:
            tk[ver] = _nonempty(root)
        except Bad as e:
            raise fail(
                f"machine.cuda_toolkits.{ver}",
                e.reason,
                "give the toolkit root (CUDA_HOME) as a string",
            ) from None
    return tk


def _table(
    table: dict, prefix: str, keys: dict[str, Callable[[Any], Any]], fail: Callable[..., UsageError]
) -> dict[str, Any]:
    """Each key of ``table`` checked by its function in ``keys`` (an unknown key is refused)."""
    out: dict[str, Any] = {}
    for key, value in table.items():
        if key not in keys:
            raise fail(
                f"{prefix}.{key}",
                "is not a known key",
                f"use one of: {', '.join(keys)} (or remove it)",
            )
        if prefix == "machine" and key == "cuda_toolkits":
            out[key] = _cuda_toolkits(value, fail)
            continue
        try:
            out[key] = keys[key](value)
        except Bad as e:
            raise fail(f"{prefix}.{key}", e.reason, e.fix) from None
    return out


def validate_profile(data: Any, where: str = "machine profile") -> dict:
    """The profile, normalised (numbers for *_gib are floats); ``UsageError`` naming ``where`` + key + fix."""

    def fail(key: str, reason: str, fix: str) -> UsageError:
        return UsageError(f"{where}: key '{key}': {reason}.", fix[0].upper() + fix[1:] + ".")

    if not isinstance(data, dict):
        raise UsageError(
            f"{where}: is not a table of [machine] and [[gpu]].", "Write it as machine-profile.md shows."
        )
    for key in data:
        if key not in ("machine", "gpu"):
            raise fail(key, "is not a known key", "use [machine] and [[gpu]] only (or remove it)")
    out: dict[str, Any] = {}
    if "machine" in data:
        if not isinstance(data["machine"], dict):
            raise fail("machine", "must be a table", "write it as [machine]")
        out["machine"] = _table(data["machine"], "machine", MACHINE_KEYS, fail)
    if "gpu" in data:
        gl = data["gpu"]
        if not isinstance(gl, list):
            raise fail("gpu", "must be an array of tables", "write each GPU as a [[gpu]] table")
        go = []
        for i, g in enumerate(gl):
            if not isinstance(g, dict):
                raise fail(f"gpu[{i}]", "must be a table", "write each GPU as a [[gpu]] table")
            go.append(_table(g, f"gpu[{i}]", GPU_KEYS, fail))
        out["gpu"] = go
    return out


def parse_profile(text: str, where: str = "machine profile") -> dict:
    try:
        safeio.prescan_toml(text)
        data = tomllib.loads(text)
    except safeio.TomlLimit as e:
        raise UsageError(
            f"{where}: {e}, past what a machine profile may hold.",
            "Give a file written by `invoke doctor --save-machine FILE`.",
        ) from None
    except tomllib.TOMLDecodeError as e:
        raise UsageError(
            f"{where}: is not valid TOML ({e}).", "Correct the TOML syntax at that line."
        ) from None
    return validate_profile(data, where)


def load_profile(path: Path) -> dict:
    """A saved profile, validated.  A FIFO, a device, a huge file, bad TOML, a wrong type or an unknown key:
    ``UsageError`` (checked on the open file before anything is read)."""
    path = Path(path)
    text = safeio.read_text(
        path,
        "Machine profile",
        safeio.TOML_MAX_BYTES,
        "Give the path of a file written by `invoke doctor --save-machine FILE`.",
    )
    return parse_profile(text, str(path))


def _tstr(s: str) -> str:
    out = ['"']
    for ch in s:
        if ch == '"':
            out.append('\\"')
        elif ch == "\\":
            out.append("\\\\")
        elif ch == "\n":
            out.append("\\n")
        elif ch == "\t":
            out.append("\\t")
        elif ch == "\r":
            out.append("\\r")
        elif ord(ch) < 0x20 or ord(ch) == 0x7F:
            out.append(f"\\u{ord(ch):04X}")
        else:
            out.append(ch)
    out.append('"')
    return "".join(out)


def _tkey(k: str) -> str:
    return k if re.fullmatch(r"[A-Za-z0-9_-]+", k) and not re.fullmatch(r"\d+(\.\d+)*", k) else _tstr(k)


def _tval(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int):
        return str(v)
    if isinstance(v, float):
        r = repr(v)
        return r if any(c in r for c in ".en") else r + ".0"
    if isinstance(v, str):
        return _tstr(v)
    if isinstance(v, list):
        return "[" + ", ".join(_tval(x) for x in v) + "]"
    raise TypeError(f"cannot write {type(v).__name__} to TOML")  # pragma: no cover - validated before


#: the first line of every saved profile: how a file ``--save-machine`` may replace is known
PROFILE_MARK = "# Machine profile written by vllm-harness"
_SAVE_FIX = "Give a new FILE, or pass --force to replace it."


def dump_profile(profile: dict) -> str:
    """The TOML text of ``profile`` (validated first)."""
    p = validate_profile(profile, "profile to save")
    lines = [
        f"{PROFILE_MARK} (docs/contract/machine-profile.md).",
        "# `invoke doctor --machine FILE` judges a variant against it.",
    ]
    if "gpu" in p and not p["gpu"]:
        lines.append("gpu = []   # no NVIDIA GPU found")
    if "machine" in p:
        m = p["machine"]
        lines += ["", "[machine]"]
        lines += [f"{_tkey(k)} = {_tval(v)}" for k, v in m.items() if k != "cuda_toolkits"]
        if "cuda_toolkits" in m:
            lines += ["", "[machine.cuda_toolkits]      # toolkit version -> its root (CUDA_HOME)"]
            lines += [f"{_tstr(k)} = {_tval(v)}" for k, v in m["cuda_toolkits"].items()]
    for g in p.get("gpu", []):
        lines += ["", "[[gpu]]"] + [f"{_tkey(k)} = {_tval(v)}" for k, v in g.items()]
    return "\n".join(lines) + "\n"


def save_profile(profile: dict, path: Path, force: bool = False) -> Path:
    """Write ``profile`` as TOML to ``path`` (core.writer: validated first, atomic, never through a link, the
    replaced file's mode kept); an existing file the harness did not write is refused unless ``force``."""
    path = Path(path)
    writer.check_target(path, what="--save-machine", force=force, marker=PROFILE_MARK.encode(), fix=_SAVE_FIX)
    text = dump_profile(profile)
    return writer.write_file(
        path, text, what="--save-machine", force=force, marker=PROFILE_MARK.encode(), fix=_SAVE_FIX
    )


MACHINE_KEYS: dict[str, Callable[[Any], Any]] = {
    "os": _nonempty,
    "arch": _nonempty,
    "glibc": _mm_str("glibc version"),
    "cpu_cores": _int_pos,
    "ram_gib": _num,
    "ram_available_gib": _num,
    "disk_free_gib": _num,
    "uv_cache_free_gib": _num,
    "uv_cache_same_disk": check_bool,
    "python": _list(_ver),
    "python_without_headers": _list(_ver),
    "gcc": _ver,
    "gcc_alternatives": _list(_ver),
    "cmake": _ver,
    "git": _ver,
    "ninja": _ver,
    "driver": _driver,
    "driver_cuda": _mm_str("CUDA version"),
    "in_container": check_bool,
    "l4t": _ver,  # Jetson: the L4T release (/etc/nv_tegra_release), e.g. "36.4.3"
    "jetson": _nonempty,  # Jetson: the board (/proc/device-tree/model)
    "not_found": _list(_tool_name),
    "cuda_without_nvcc": _list(_nonempty),
    "cuda_incomplete": _list(_nonempty),
    "cuda_toolkits": None,  # a table, checked by _cuda_toolkits
}


GPU_KEYS: dict[str, Callable[[Any], Any]] = {
    "name": _nonempty,
    "compute_capability": _mm_str("compute capability"),
    "memory_gib": _num,
    "integrated": check_bool,  # an integrated GPU (Jetson/Tegra): CUDA comes with the board's JetPack
}
