"""Tests of vllm_harness.diagnose on the corpus of real failure logs (tests/logs)."""

from __future__ import annotations

import io
import json
import re
import sys
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from vllm_harness import diagnose as dg

try:
    import tomllib
except ModuleNotFoundError:  # pragma: no cover - Python 3.10
    import tomli as tomllib  # type: ignore[no-redef]

LOGS = Path(__file__).parent / "logs"
INDEX = tomllib.loads((LOGS / "index.toml").read_text(encoding="utf-8"))["log"]

# The 36 ids of shared/contract/failure-ids.md (fixed names), written out on purpose.
PROJECT_IDS = ["index-unreachable"]
CONTRACT_IDS = [
    "cuda-forward-compat",
    "cuda-runtime-lib-missing",
    "cmake-too-old",
    "torch-api-mismatch",
    "numpy-abi",
    "xformers-missing",
    "git-dubious-ownership",
    "stale-build-state",
    "xformers-torch-mismatch",
    "compiler-oom",
    "cuda-home-missing",
    "nvcc-not-found",
    "host-compiler-unsupported",
    "cuda-torch-version-mismatch",
    "arch-unsupported-by-nvcc",
    "arch-unknown-to-torch",
    "no-kernel-image",
    "torch-missing-at-build",
    "torch-replaced",
    "torch-abi-undefined-symbol",
    "glibcxx-too-old",
    "driver-too-old",
    "no-driver",
    "bf16-unsupported",
    "flash-attn-unsupported-gpu",
    "python-unsupported",
    "torch-wheel-not-found",
    "dependency-conflict",
    "ninja-missing",
    "python-headers-missing",
    "fetch-network",
    "torch-cpu-only",
    "nccl-mismatch",
    "disk-full",
    "version-undetectable",
    "triton-no-c-compiler",
]

CLEAN = [e for e in INDEX if not e["expected"]]
FAILING = [e for e in INDEX if e["expected"]]


@pytest.fixture(autouse=True, scope="module", params=dg.ENGINES)
def engine(request):
    """Every test of this module runs with each prefilter engine available here."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("VLLM_HARNESS_DIAGNOSE_ENGINE", request.param)
        yield request.param


def scan(data: bytes, context: dict | None = None) -> dg.Report:
    return dg.diagnose_stream(io.BytesIO(data), context)


# ------------------------------------------------------------------------------------------
# knowledge base


def test_contract_list_has_36_unique_ids():
    assert len(CONTRACT_IDS) == 36 == len(set(CONTRACT_IDS))


def test_knowledge_covers_exactly_the_contract_ids():
    rules = dg.load_knowledge()
    # the contract's 36, plus the ids the project added with their cause and fix (cli.md allows new ones)
    assert sorted(r.id for r in rules) == sorted(CONTRACT_IDS + PROJECT_IDS)


def test_every_rule_is_complete():
    for rule in dg.load_knowledge():
        assert rule.severity in ("error", "warning", "info")
        assert rule.patterns and rule.anchors
        assert rule.cause.strip().endswith(".")
        assert rule.fix.strip()
        # no anchor is shorter than the minimum: a short anchor would make the prefilter useless
        assert all(len(a) >= dg.MIN_ANCHOR for a in rule.anchors), rule.id


def test_implies_put_root_causes_first():
    by_id = {r.id: r for r in dg.load_knowledge()}
    assert "stale-build-state" in by_id["compiler-oom"].implies
    assert "stale-build-state" in by_id["cmake-too-old"].implies


@pytest.mark.parametrize(
    "entry, key",
    [
        (
            'id = "cmake-too-old"\nseverity = "error"\npatterns = ["CMake \\\\d+ or higher"]\ncause = "c."\nfix = "f."\ncolour = "red"\n',
            "colour",
        ),
        (
            'id = "cmake-too-old"\nseverity = "error"\npatterns = ["CMake \\\\d+ or higher"]\ncause = "c."\n',
            "fix",
        ),
        (
            'id = "cmake-too-old"\nseverity = "error"\npatterns = ["CMake ([0-9 or higher"]\ncause = "c."\nfix = "f."\n',
            "patterns",
        ),
        (
            'id = "cmake-too-old"\nseverity = "fatal"\npatterns = ["CMake \\\\d+ or higher"]\ncause = "c."\nfix = "f."\n',
            "severity",
        ),
        (
            'id = "cmake-too-old"\nseverity = "error"\npatterns = ["CMake \\\\d+ or higher"]\ncause = "c."\nfix = "use {gpu}"\n',
            "fix",
        ),
        (
            'id = "cmake-too-old"\nseverity = "error"\npatterns = ["CMake \\\\d+ or higher"]\ncause = "c."\nfix = "f."\nimplies = ["no-such-id"]\n',
            "implies",
        ),
        (
            'id = "cmake-too-old"\nseverity = "error"\npatterns = ["\\\\d+"]\ncause = "c."\nfix = "f."\n',
            "patterns",
        ),
    ],
)
def test_malformed_knowledge_names_file_entry_and_key(tmp_path, entry, key):
    path = tmp_path / "bad.toml"
    path.write_text("version = 1\n[[failure]]\n" + entry, encoding="utf-8")
    with pytest.raises(ValueError) as info:
        dg.load_knowledge(path)
    message = str(info.value)
    assert str(path) in message
    assert "cmake-too-old" in message
    assert f"'{key}'" in message


def test_missing_id_and_cycles_are_rejected(tmp_path):
    path = tmp_path / "noid.toml"
    path.write_text(
        '[[failure]]\nseverity = "error"\npatterns = ["CMake is old"]\ncause = "c."\nfix = "f."\n'
    )
    with pytest.raises(ValueError, match=r"noid\.toml.*'id'"):
        dg.load_knowledge(path)
    path = tmp_path / "cycle.toml"
    path.write_text(
        '[[failure]]\nid = "a-a"\nseverity = "error"\npatterns = ["Alpha text"]\ncause = "c."\nfix = "f."\nimplies = ["b-b"]\n'
        '[[failure]]\nid = "b-b"\nseverity = "error"\npatterns = ["Beta text"]\ncause = "c."\nfix = "f."\nimplies = ["a-a"]\n'
    )
    with pytest.raises(ValueError, match=r"cycle\.toml.*'implies'"):
        dg.load_knowledge(path)
    path = tmp_path / "top.toml"
    path.write_text(
        'rules = 1\n[[failure]]\nid = "a-a"\nseverity = "error"\npatterns = ["Alpha"]\ncause = "c."\nfix = "f."\n'
    )
    with pytest.raises(ValueError, match=r"'rules'"):
        dg.load_knowledge(path)


def test_custom_knowledge_is_used(tmp_path):
    path = tmp_path / "k.toml"
    path.write_text(
        '[[failure]]\nid = "my-thing"\nseverity = "warning"\npatterns = ["Frobnication failed: (\\\\w+)"]\n'
        'cause = "It broke."\nfix = "Use {torch|a torch} on {variant}."\n'
    )
    rules = dg.load_knowledge(path)
    report = dg.diagnose_stream(
        io.BytesIO(b"ok\nFrobnication failed: badly\n"), {"variant": "cu118"}, rules=rules
    )
    assert [(f.id, f.line, f.severity) for f in report.findings] == [("my-thing", 2, "warning")]
    assert report.findings[0].fix == "Use a torch on cu118."


# ------------------------------------------------------------------------------------------
# corpus


def test_index_and_corpus_agree():
    files = {p.name for p in LOGS.glob("*.log")}
    indexed = [e["file"] for e in INDEX]
    assert len(indexed) == len(set(indexed))
    assert files == set(indexed)
    for entry in INDEX:
        assert set(entry) <= {"file", "expected", "source", "synthetic", "reason", "note"}
        assert isinstance(entry["synthetic"], bool)
        assert entry["source"].startswith("https://") or entry["synthetic"]
        if entry["synthetic"]:
            assert entry.get("reason")
        assert set(entry["expected"]) <= set(CONTRACT_IDS + PROJECT_IDS)


def test_every_id_has_a_log_and_enough_clean_logs():
    covered = {e["expected"][0] for e in FAILING}
    assert covered == set(CONTRACT_IDS + PROJECT_IDS)
    real = {e["expected"][0] for e in FAILING if not e["synthetic"]}
    assert len(real) >= 35  # only torch-api-mismatch's exact needs_fixed_stride_order line is synthetic
    assert len(CLEAN) >= 4


@pytest.mark.parametrize("entry", FAILING, ids=[e["file"] for e in FAILING])
def test_failure_log(entry):
    report = dg.diagnose_path(LOGS / entry["file"])
    assert set(report.ids) == set(entry["expected"])
    assert report.ids[0] == entry["expected"][0]
    assert report.first_error_lines == []
    for finding in report.findings:
        assert finding.line >= 1
        assert finding.evidence and "\x1b" not in finding.evidence and "\r" not in finding.evidence
        assert len(finding.evidence) <= dg.EVIDENCE_CHARS + 2
        assert "{" not in finding.fix and "}" not in finding.fix


@pytest.mark.parametrize("entry", CLEAN, ids=[e["file"] for e in CLEAN])
def test_clean_and_outside_logs_give_no_finding(entry):
    report = dg.diagnose_path(LOGS / entry["file"])
    assert report.findings == []
    if entry["file"].startswith("outside_"):
        # a failure outside the list: the user is pointed at its first error line
        assert report.first_error_lines, entry["file"]
        first_line, first_text = report.first_error_lines[0]
        assert dg._FIRST_ERROR_RE.search(first_text)
        lines = (LOGS / entry["file"]).read_bytes().split(b"\n")
        assert first_text.split()[0].encode() in lines[first_line - 1]
        assert len(report.first_error_lines) <= dg.FIRST_ERROR_BLOCK
    else:
        assert report.first_error_lines == []


def test_findings_point_at_the_right_line():
    report = dg.diagnose_path(LOGS / "compiler-oom_vllm-1777.log")
    lines = (LOGS / "compiler-oom_vllm-1777.log").read_text(encoding="utf-8").split("\n")
    for finding in report.findings:
        assert finding.evidence[:40] in lines[finding.line - 1]
    oom, stale = report.findings
    assert (oom.id, stale.id) == ("compiler-oom", "stale-build-state")
    assert stale.explained_by == ["compiler-oom"] and oom.explained_by == []


def test_root_cause_first_even_when_it_comes_later():
    log = (
        b"  ERROR: Failed building editable for vllm\n"
        b"something\n"
        b"g++: fatal error: Killed signal terminated program cc1plus\n"
        b"CMake 3.26 or higher is required.  You are running version 3.22.1\n"
    )
    report = scan(log)
    assert report.ids[-1] == "stale-build-state"
    assert set(report.ids[:2]) == {"compiler-oom", "cmake-too-old"}
    assert report.ids[0] == "compiler-oom"  # unrelated roots keep the order of their lines
    assert sorted(report.findings[-1].explained_by) == ["cmake-too-old", "compiler-oom"]


# ------------------------------------------------------------------------------------------
# real-log formats


def test_small_chunks_give_the_same_results(monkeypatch):
    """Chunk boundaries (anchors cut in two, carried partial lines) must not change anything."""
    expected = {e["file"]: dg.diagnose_path(LOGS / e["file"]).to_dict() for e in INDEX}
    monkeypatch.setattr(dg, "CHUNK_SIZE", 37)
    for entry in INDEX:
        assert dg.diagnose_path(LOGS / entry["file"]).to_dict() == expected[entry["file"]], entry["file"]


def test_ansi_colour_codes():
    line = (
        b"\x1b[01m\x1b[Kcsrc/torch_bindings.cpp:12:7:\x1b[m\x1b[K \x1b[01;31m\x1b[Kerror: \x1b[m\x1b[K"
        b"\xe2\x80\x98\x1b[01m\x1b[Kneeds_fixed_stride_order\x1b[m\x1b[K\xe2\x80\x99 is not a member of "
        b"\xe2\x80\x98\x1b[01m\x1b[Kat::Tag\x1b[m\x1b[K\xe2\x80\x99\n"
    )
    report = scan(b"[1/9] compiling\n" + line)
    assert report.ids == ["torch-api-mismatch"]
    assert report.findings[0].line == 2
    assert report.findings[0].evidence == (
        "csrc/torch_bindings.cpp:12:7: error: ‘needs_fixed_stride_order’ is not a member of ‘at::Tag’"
    )


def test_crlf_line_endings():
    for name in (
        "compiler-oom_vllm-1777.log",
        "nvcc-not-found_cuda-memtest-45.log",
        "cuda-home-missing_cpm-live-244.log",
    ):
        data = (LOGS / name).read_bytes()
        unix = dg.diagnose_path(LOGS / name)
        dos = scan(data.replace(b"\n", b"\r\n"))
        assert [(f.id, f.line, f.evidence) for f in dos.findings] == [
            (f.id, f.line, f.evidence) for f in unix.findings
        ]


def test_carriage_return_redraws():
    progress = b"".join(b"\rDownloading torch %d%%" % i for i in range(0, 100, 7))
    line = (
        progress
        + b"\rERROR: Could not install packages due to an OSError: [Errno 28] No space left on device"
        + progress
    )
    report = scan(b"Collecting torch\n" + line + b"\nbye\n")
    assert report.ids == ["disk-full"]
    assert report.findings[0].line == 2
    assert report.findings[0].evidence.startswith("ERROR: Could not install packages")


def test_pip_boxed_and_indented_output():
    data = (
        "  × Getting requirements to build wheel did not run successfully.\n"
        "  │ exit code: 1\n"
        "  ╰─> [20 lines of output]\n"
        "      │ │   ModuleNotFoundError: No module named 'torch'\n"
    ).encode()
    report = scan(data)
    assert report.ids == ["torch-missing-at-build"]
    assert report.findings[0].evidence == "ModuleNotFoundError: No module named 'torch'"


def test_non_utf8_bytes():
    data = b"\xff\xfe\x00garbage \x80\x81\nImportError: libcudart.so.12: cannot open shared object file: No such file \xe9\n"
    report = scan(data)
    assert report.ids == ["cuda-runtime-lib-missing"]
    assert report.findings[0].line == 2
    latin1 = "Der Treiber läuft nicht: Found no NVIDIA driver on your system\n".encode("latin-1")
    assert scan(latin1).ids == ["no-driver"]


def test_very_long_lines():
    pad = b"x" * 3_000_000
    line = pad + b" RuntimeError: Torch not compiled with CUDA enabled " + pad
    report = scan(b"first\n" + line + b"\nlast\n")
    assert report.ids == ["torch-cpu-only"]
    assert report.findings[0].line == 2
    assert "Torch not compiled with CUDA enabled" in report.findings[0].evidence
    assert len(report.findings[0].evidence) <= dg.EVIDENCE_CHARS + 2


def test_endless_line_without_newline(monkeypatch):
    monkeypatch.setattr(dg, "CHUNK_SIZE", 1000)
    monkeypatch.setattr(dg, "LONG_LINE_BYTES", 3000)
    data = b"y" * 5003 + b"nvcc fatal   : Unsupported gpu architecture 'compute_90a'" + b"z" * 7001
    report = scan(data)
    assert report.ids == ["arch-unsupported-by-nvcc"]
    assert report.findings[0].line == 1
    # the same with \r redraws: pieces are cut at \r
    report = scan(
        b"\r".join([b"w" * 700] * 9)
        + b"\rnvcc fatal   : Unsupported gpu architecture 'compute_90a'\r"
        + b"v" * 4000
    )
    assert report.ids == ["arch-unsupported-by-nvcc"]


def test_warnings_that_mention_error_give_no_finding():
    data = (
        b"/usr/bin/c++ -Wall -Werror=format-security -Wno-error=deprecated -c error_handling.cpp\n"
        b"warning: treating 'error' as a warning is deprecated [-Wdeprecated]\n"
        b"UserWarning: Failed to initialize NumPy: No module named 'numpy' (Triggered internally)\n"
        b"CMake Warning at cuda.cmake:140 (message):\n  Failed to compute shorthash for libnvrtc.so\n"
        b"WARNING: Running pip as the 'root' user can result in broken permissions\n"
        b"-- Performing Test HAS_ERROR_FLAG - Success\n"
        b"DEPRECATION: error handling of legacy setup.py will change\n"
    )
    report = scan(data)
    assert report.findings == []
    assert report.first_error_lines == []


def test_first_error_block_when_nothing_is_recognised():
    data = (
        b"".join(b"ok line %d\n" % i for i in range(1, 6))
        + b"Traceback (most recent call last):\n"
        + b"".join(b"  frame %d\n" % i for i in range(40))
    )
    report = scan(data)
    assert report.findings == []
    assert report.first_error_lines[0] == (6, "Traceback (most recent call last):")
    assert len(report.first_error_lines) == dg.FIRST_ERROR_BLOCK
    assert [n for n, _ in report.first_error_lines] == list(range(6, 6 + dg.FIRST_ERROR_BLOCK))


# ------------------------------------------------------------------------------------------
# API


def test_report_json_matches_cli_contract():
    report = dg.diagnose_path(LOGS / "compiler-oom_vllm-1777.log", {"variant": "cu118"})
    data = json.loads(json.dumps(report.to_dict()))
    assert data["log"] == str(LOGS / "compiler-oom_vllm-1777.log")
    assert "first_error_lines" in data
    for finding in data["findings"]:
        assert {"id", "severity", "line", "evidence", "cause", "fix"} <= set(finding)
        assert isinstance(finding["line"], int)
    assert "invoke clean --variant cu118" in data["findings"][1]["fix"]


def test_fix_placeholders():
    rule = next(r for r in dg.load_knowledge() if r.id == "cuda-forward-compat")
    full = dg.render_fix(
        rule.fix, {"cuda": "12.4", "torch": "2.6.0", "torch_index": "https://download.pytorch.org/whl/cu124"}
    )
    assert "CUDA 12.4" in full and "torch 2.6.0" in full and "whl/cu124" in full
    generic = dg.render_fix(rule.fix, {})
    assert "the variant's CUDA version" in generic
    assert "{" not in generic and "}" not in generic
    assert dg.render_fix("x {cmake_min} y", None) == "x 3.26 y"
    for rule in dg.load_knowledge():
        for text in (dg.render_fix(rule.fix, {}), dg.render_fix(rule.fix, {k: "V" for k in dg.CONTEXT_KEYS})):
            assert not re.search(r"[{}]", text), rule.id
            assert "  " not in text, rule.id


def test_stdin_and_chunked_reading(monkeypatch):
    data = (LOGS / "glibcxx-too-old_dmtcp-790.log").read_bytes()

    class Recorder(io.BytesIO):
        sizes: list[int] = []

        def read(self, size=-1):
            assert size is not None and 0 < size <= dg.CHUNK_SIZE  # never the whole stream at once
            self.sizes.append(size)
            return super().read(size)

    class FakeStdin:
        buffer = Recorder(data)

    monkeypatch.setattr(sys, "stdin", FakeStdin())
    report = dg.diagnose_path("-")
    assert report.log == "-"
    assert report.ids == ["glibcxx-too-old"]
    assert Recorder.sizes


def test_early_stop_keeps_line_numbers(monkeypatch):
    monkeypatch.setattr(dg, "CHUNK_SIZE", 64)
    body = b"".join(b"line %d of a long and boring build log\n" % i for i in range(1, 2001))
    data = body + b"fatal: detected dubious ownership in repository at '/app/vllm'\n" + body
    report = scan(data)
    assert [(f.id, f.line) for f in report.findings] == [("git-dubious-ownership", 2001)]


def test_parallel_scan_gives_the_same_report(tmp_path):
    body = b"".join(b"line %d of a long and boring build log\n" % i for i in range(1, 3001))
    cases = {
        "findings": body
        + (LOGS / "compiler-oom_vllm-1777.log").read_bytes()
        + body
        + (LOGS / "cmake-too-old_arion-1.log").read_bytes()
        + body
        + (LOGS / "compiler-oom_stellar-core-5308.log").read_bytes(),
        # an error block that goes on across the parts
        "first-error": body + b"Traceback (most recent call last):\n" + body,
        "nothing": body * 3,
    }
    for name, data in cases.items():
        path = tmp_path / f"{name}.log"
        path.write_bytes(data)
        single = dg.diagnose_path(path, workers=1).to_dict()
        for workers in (2, 3, 7):
            assert dg.diagnose_path(path, workers=workers).to_dict() == single, (name, workers)
    assert dg.diagnose_path(tmp_path / "first-error.log", workers=2).first_error_lines[0][0] == 3001


def test_render_table():
    pytest.importorskip("rich")
    from rich.console import Console

    console = Console(record=True, width=200)
    text = dg.render_table(dg.diagnose_path(LOGS / "compiler-oom_vllm-1777.log"), console=console)
    for out in (text, console.export_text()):
        assert "compiler-oom" in out and "stale-build-state" in out and "MAX_JOBS" in out
    text = dg.render_table(dg.diagnose_path(LOGS / "outside_pybind11-cast_vllm-4201.log"), show=False)
    assert "No known failure recognised" in text and "First error block" in text


def test_module_imports_without_rich(monkeypatch):
    import importlib

    monkeypatch.setitem(sys.modules, "rich", None)
    module = importlib.reload(dg)
    assert module.diagnose_stream(io.BytesIO(b"Killed signal terminated program cc1plus\n")).ids == [
        "compiler-oom"
    ]


# ------------------------------------------------------------------------------------------
# property


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.binary(max_size=4096), st.sampled_from([None, 7, 64, 4096]))
def test_random_bytes_never_crash(blob, chunk):
    old = dg.CHUNK_SIZE
    try:
        if chunk:
            dg.CHUNK_SIZE = chunk
        report = dg.diagnose_stream(io.BytesIO(blob))
        json.dumps(report.to_dict())
        for finding in report.findings:
            assert finding.line >= 1
    finally:
        dg.CHUNK_SIZE = old


@settings(max_examples=150, deadline=None)
@given(st.binary(max_size=600), st.binary(max_size=600))
def test_known_line_found_among_random_bytes(before, after):
    line = b"OSError: CUDA_HOME environment variable is not set. Please set it to your CUDA install root."
    report = dg.diagnose_stream(io.BytesIO(before + b"\n" + line + b"\n" + after))
    assert "cuda-home-missing" in report.ids
