"""diagnose's fixes read well with and without a variant, and take their parameters from the log (issue 29)."""

from __future__ import annotations

import io
import re
from pathlib import Path

import pytest

from vllm_harness import diagnose as dg
from vllm_harness.diagnose.rules import _PLACEHOLDER_RE

LOGS = Path(__file__).parent / "logs"
RULES = dg.load_knowledge()
#: every context key with the value a variant gives it (facts/variants.py: diagnose_context)
VARIANT = {
    "cuda": "12.1",
    "torch": "2.4.0",
    "torch_index": "https://download.pytorch.org/whl/cu121",
    "variant": "cu121",
    "python": "3.11",
    "xformers": "xformers==0.0.27.post2",
    "cmake_min": "3.29",
}
TEMPLATES = [(r.id, n, fix) for r in RULES for n, fix in enumerate([r.fix] + [f for _when, f in r.fixes])]


def _render(fix: str, context: dict | None) -> str:
    return dg.render_fix(fix, context)


@pytest.mark.parametrize("rid, n, fix", TEMPLATES, ids=[f"{rid}-{n}" for rid, n, _ in TEMPLATES])
def test_every_fix_renders_with_and_without_a_variant(rid, n, fix):
    bare, full = _render(fix, {}), _render(fix, VARIANT)
    for text in (bare, full):
        assert not re.search(r"[{}]", text) and "  " not in text and text.endswith("."), text
        # no fallback wording glued after a word that wants a value ("for CUDA the variant's CUDA version")
        assert not re.search(r"\b(?:CUDA|torch|Python|cmake>=) (?:the|as|of|one)\b", text), text
    for m in _PLACEHOLDER_RE.finditer(fix):
        key, fallback = m.group(1), m.group(2)
        # one placeholder style: a fallback is a <placeholder> or a value (no prose around it)
        if fallback is not None:
            assert not re.sub(r"<[^<>]+>", "", fallback).strip(" ").count(" "), (rid, fallback)
            if fallback.startswith("<"):
                assert fallback not in full, (rid, fallback)
        assert VARIANT[key] in full, (rid, key)
    if "{" in fix:  # without a variant the reader sees placeholders, never a value of some other variant
        assert "<" in bare or "3.26" in bare or "python3-dev" in bare, bare


def test_no_fix_names_a_value_the_variant_overrides():
    """Each placeholder's fallback is what the reader fills in; the variant's value takes its place."""
    for rid, _n, fix in TEMPLATES:
        bare, full = _render(fix, {}), _render(fix, VARIANT)
        assert ("{" in fix) == (bare != full), rid


def _diagnose(path: Path, context: dict | None = None) -> dg.Report:
    return dg.diagnose_path(path, context)


def test_cmake_fix_asks_for_the_version_the_log_asks_for():
    # the log asks for 3.23; the variant's own minimum (3.26) is not what this source needs
    report = _diagnose(LOGS / "cmake-too-old_cmake-cpp-winrt-winui3-1.log", VARIANT)
    assert report.ids[0] == "cmake-too-old"
    assert 'cmake>=3.23"' in report.findings[0].fix
    text = b"CMake Error at CMakeLists.txt:1 (cmake_minimum_required):\n  CMake 3.14 or higher is required.  You are running version 3.10.2\n"
    fix = dg.diagnose_stream(io.BytesIO(text)).findings[0].fix
    assert 'cmake>=3.14"' in fix and "3.26" not in fix


@pytest.mark.parametrize("name", ["host-compiler-unsupported_brushedit-17.log", "host-compiler-unsupported_gprmax-312.log"])
def test_msvc_log_gets_a_visual_studio_fix_not_a_gcc(name):
    finding = _diagnose(LOGS / name, VARIANT).findings[0]
    assert finding.id == "host-compiler-unsupported"
    assert "Visual Studio" in finding.fix and "gcc" not in finding.fix and "CUDA 12.1" in finding.fix


def test_gcc_log_keeps_the_gcc_fix():
    text = b"/usr/local/cuda/include/crt/host_config.h:132:2: error: #error -- unsupported GNU version! gcc versions later than 11 are not supported!\n"
    finding = dg.diagnose_stream(io.BytesIO(text)).findings[0]
    assert finding.id == "host-compiler-unsupported" and "gcc" in finding.fix and "Visual Studio" not in finding.fix


@pytest.mark.parametrize(
    "name, vllm",
    [
        ("cuda-runtime-lib-missing_flash-attention-631.log", False),
        ("cuda-runtime-lib-missing_flash-attention-728.log", False),
        ("cuda-runtime-lib-missing_autotrain-advanced-292.log", False),
        ("cuda-runtime-lib-missing_autogptq-429.log", False),
        ("cuda-runtime-lib-missing_vllm-3387.log", True),
    ],
)
def test_precompiled_vllm_advice_only_on_vllm_logs(name, vllm):
    finding = _diagnose(LOGS / name).findings[0]
    assert finding.id == "cuda-runtime-lib-missing"
    assert ("VLLM_USE_PRECOMPILED" in finding.fix) is vllm, finding.fix


def test_error_803_gets_the_driver_library_fix_and_804_the_runtime_fix():
    f803 = _diagnose(LOGS / "cuda-forward-compat_nvidia-docker-1256.log").findings[0]
    f804 = _diagnose(LOGS / "cuda-forward-compat_gpufetch-53.log").findings[0]
    assert f803.id == f804.id == "cuda-forward-compat"
    assert "reboot" in f803.fix and "cuda-compat" in f803.fix
    assert f804.fix == _render(next(r for r in RULES if r.id == "cuda-forward-compat").fix, None)


def test_fixes_are_validated(tmp_path):
    base = 'id = "cmake-too-old"\nseverity = "error"\npatterns = ["CMake \\\\d+ or higher"]\ncause = "c."\nfix = "f."\n'
    bad = {
        "fixes = [{when = \"x\"}]\n": "fixes",
        "fixes = [{when = \"(\", fix = \"g.\"}]\n": "fixes",
        "fixes = [{when = \"x\", fix = \"use {gpu}\"}]\n": "fixes",
        "recovered_by = [\"(\"]\n": "recovered_by",
    }
    for extra, key in bad.items():
        path = tmp_path / "k.toml"
        path.write_text("version = 1\n[[failure]]\n" + base + extra, encoding="utf-8")
        with pytest.raises(ValueError, match=f"key '{key}'"):
            dg.load_knowledge(path)
    path = tmp_path / "ok.toml"
    path.write_text(
        "version = 1\n[[failure]]\n" + base + "recovered_by = ['''^Successfully installed \\S''']\n"
        "[[failure.fixes]]\nwhen = '''Visual Studio'''\nfix = \"g {cuda|<version>}.\"\n",
        encoding="utf-8",
    )
    (rule,) = dg.load_knowledge(path)
    assert rule.fix_for("unsupported Microsoft Visual Studio version!") == 0 and rule.fix_for("gcc") == -1
    assert rule.recovery_anchors == (b"Successfully installed",)
