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
from vllm_harness.core.safeio import tomllib  # the one TOML shim (tomli on 3.10)
from vllm_harness.diagnose import engine as dge
from vllm_harness.diagnose import stream as dgs
from vllm_harness.diagnose.corpus import CORPUS_INDEX, CORPUS_KEYS
from vllm_harness.diagnose.engine import FIRST_ERROR_BLOCK
from vllm_harness.diagnose.normalize import EVIDENCE_CHARS, FIRST_ERROR_RE, wrapped_messages
from vllm_harness.diagnose.rules import MIN_ANCHOR
from vllm_harness.diagnose.stream import CHUNK_SIZE

LOGS = Path(__file__).parent / "logs"
# tests/logs/index.toml and every tests/logs/index-*.toml, each entry with its split (tune/eval)
INDEX = dg.load_corpus(LOGS)

# The ids of docs/contract/failure-ids.md (fixed names), read from that file; the rest of
# data/failures.toml are ids the project added; `reported_by` marks the harness's own findings (doctor's,
# verify's), which no build log shows.
CONTRACT_IDS = re.findall(r"^\| `([a-z0-9-]+)` \|", (Path(__file__).parents[1] / "docs" / "contract" /
                                                     "failure-ids.md").read_text(), re.M)
_KNOWLEDGE = tomllib.loads(dg.DEFAULT_KNOWLEDGE.read_text())["failure"]
PROJECT_IDS = [f["id"] for f in _KNOWLEDGE if f["id"] not in CONTRACT_IDS]
DOCTOR_ONLY_IDS = [f["id"] for f in _KNOWLEDGE if f.get("reported_by")]

CLEAN = [e for e in INDEX if not e["expected"]]
FAILING = [e for e in INDEX if e["expected"]]
TUNE = [e for e in FAILING if e["split"] == "tune"]
EVAL = [e for e in FAILING if e["split"] == "eval"]

# Logs of the tune part whose root is not first, each with the reason (kept honest, not tuned away).
TUNE_MISSES = {
    "torch-replaced_lhm-107.log": "pip's note 'torchaudio requires torch==2.3.0, but you have torch 2.5.1' after "
    "`pip install -U xformers`: the same note reads as a dependency conflict in open-instruct-172; only the command "
    "line tells them apart, and diagnose matches no command lines",
}
# The held-back part (never tuned on): its measured floor, asserted as such (issue 19 asked >= 92 %,
# issue 29 >= 95 %, and no false alarm).
EVAL_ROOT_FIRST_FLOOR = 0.95
# Its false alarms, measured: reported, not tuned away (none since the ninja wording became weak
# evidence that does not stand alone, for what the message means; no tune log has that line).
EVAL_KNOWN_ALARMS: dict[str, str] = {}


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
        assert all(len(a) >= MIN_ANCHOR for a in rule.anchors), rule.id


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
        assert set(entry) - {"index", "split"} <= CORPUS_KEYS, entry["file"]
        assert isinstance(entry["synthetic"], bool)
        assert entry["source"].startswith("https://") or entry["synthetic"]
        if entry["synthetic"]:
            assert entry.get("reason")
        if entry["index"] != CORPUS_INDEX:  # gathered logs say why they have that label
            assert entry.get("why"), entry["file"]
        assert set(entry["expected"]) <= set(CONTRACT_IDS + PROJECT_IDS), entry["file"]


def test_corpus_size_and_spread():
    """>= 250 logs, every id of the contract the root of >= 4 of them, >= 40 controls."""
    assert len(INDEX) >= 250
    roots = [e["expected"][0] for e in FAILING]
    for rid in CONTRACT_IDS + [i for i in PROJECT_IDS if i not in DOCTOR_ONLY_IDS]:
        assert roots.count(rid) >= 4, rid
    assert len(CLEAN) >= 40
    real = {e["expected"][0] for e in FAILING if not e["synthetic"]}
    assert real >= set(CONTRACT_IDS)


def test_split_is_by_thread_and_stable():
    """One thread, one part (a pull request and its issue number are one thread; comments too);
    the logs the rules were written on are all in tune; about a third of the others in eval."""
    by_thread: dict[str, set[str]] = {}
    for entry in INDEX:
        by_thread.setdefault(dg.corpus_thread(entry["source"]), set()).add(entry["split"])
    assert all(len(parts) == 1 for parts in by_thread.values())
    assert {e["split"] for e in INDEX if e["index"] == CORPUS_INDEX} == {"tune"}
    assert dg.corpus_thread("https://github.com/Vllm-Project/vllm/pull/123#issuecomment-9") == (
        dg.corpus_thread("https://www.github.com/vllm-project/vllm/issues/123/")
    )
    gathered = [e for e in INDEX if e["index"] != CORPUS_INDEX]
    share = sum(e["split"] == "eval" for e in gathered) / len(gathered)
    assert 0.2 <= share <= 0.45
    # decided by the thread alone: the same answer every time, whatever else is in the corpus
    tuned = {dg.corpus_thread(e["source"]) for e in INDEX if e["index"] == CORPUS_INDEX}
    assert [dg.corpus_split(e["source"], tuned) for e in gathered] == [e["split"] for e in gathered]


@pytest.mark.parametrize("entry", TUNE, ids=[e["file"] for e in TUNE])
def test_tune_log_root_first(entry):
    report = dg.diagnose_path(LOGS / entry["file"])
    assert report.first_error_lines == []
    if entry["file"] in TUNE_MISSES:  # a known miss: its root is still among the findings
        assert entry["expected"][0] in report.ids[1:]
    else:
        assert report.ids[:1] == entry["expected"][:1]
    if entry["index"] == CORPUS_INDEX:
        assert set(report.ids) == set(entry["expected"])
    elif entry["file"] not in TUNE_MISSES:
        assert set(entry["expected"]) <= set(report.ids)
    for finding in report.findings:
        assert finding.line >= 1
        assert finding.evidence and "\x1b" not in finding.evidence and "\r" not in finding.evidence
        assert len(finding.evidence) <= EVIDENCE_CHARS + 2
        assert "{" not in finding.fix and "}" not in finding.fix
        assert finding.rank["position"] == report.findings.index(finding) + 1


def test_held_back_part_floor_and_no_false_alarm():
    """The eval part (never tuned on): root first on at least the measured floor, and no finding
    at all on any control of either part."""
    measure = dg.accuracy(INDEX, LOGS)
    ev = measure["eval"]
    assert ev["failing"] >= 40
    assert ev["root_first"] / ev["failing"] >= EVAL_ROOT_FIRST_FLOOR, ev["misses"]
    assert measure["tune"]["false_alarms"] == 0, measure["tune"]["alarms"]
    assert {r["file"] for r in measure["eval"]["alarms"]} <= set(EVAL_KNOWN_ALARMS), measure["eval"]["alarms"]
    tune = measure["tune"]
    assert tune["failing"] - tune["root_first"] == len(TUNE_MISSES)


CONTROLS = [e for e in CLEAN if e["file"] not in EVAL_KNOWN_ALARMS]


@pytest.mark.parametrize("entry", CONTROLS, ids=[e["file"] for e in CONTROLS])
def test_clean_and_outside_logs_give_no_finding(entry):
    report = dg.diagnose_path(LOGS / entry["file"])
    assert report.findings == []
    if entry["file"].startswith("outside_") and report.first_error_lines:
        # a failure outside the list: the user is pointed at its first error line
        first_line, first_text = report.first_error_lines[0]
        assert FIRST_ERROR_RE.search(first_text)
        lines = (LOGS / entry["file"]).read_bytes().split(b"\n")
        assert first_text.split()[0].encode() in lines[first_line - 1]
        assert len(report.first_error_lines) <= FIRST_ERROR_BLOCK
    if entry["index"] == CORPUS_INDEX and entry["file"].startswith("outside_"):
        assert report.first_error_lines, entry["file"]
    elif entry["index"] == CORPUS_INDEX:
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
    monkeypatch.setattr(dgs, "CHUNK_SIZE", 37)
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
    assert len(report.findings[0].evidence) <= EVIDENCE_CHARS + 2


def test_endless_line_without_newline(monkeypatch):
    monkeypatch.setattr(dgs, "CHUNK_SIZE", 1000)
    monkeypatch.setattr(dgs, "LONG_LINE_BYTES", 3000)
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
    assert len(report.first_error_lines) == FIRST_ERROR_BLOCK
    assert [n for n, _ in report.first_error_lines] == list(range(6, 6 + FIRST_ERROR_BLOCK))


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
    assert "CUDA <version>" in generic and "torch <version>" in generic
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
            assert size is not None and 0 < size <= CHUNK_SIZE  # never the whole stream at once
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
    monkeypatch.setattr(dgs, "CHUNK_SIZE", 64)
    body = b"".join(b"line %d of a long and boring build log\n" % i for i in range(1, 2001))
    data = body + b"fatal: detected dubious ownership in repository at '/app/vllm'\n" + body
    report = scan(data)
    assert [(f.id, f.line) for f in report.findings] == [("git-dubious-ownership", 2001)]


def test_parallel_scan_gives_the_same_report(tmp_path):
    body = b"".join(b"line %d of a long and boring build log\n" % i for i in range(1, 3001))
    # a message wrapped over the line where two parts meet: each part sees the lines around it
    wrapped = (
        b"      Building cuda extension requires PyTorch (>=1.13.0) being installed, please install PyTorch first: No\n"
        b"      module named 'torch'\n"
    )
    path = tmp_path / "cut.log"
    path.write_bytes(body + wrapped + body)
    single = dg.diagnose_path(path, workers=1).to_dict()
    assert [(f["id"], f["line"]) for f in single["findings"]] == [("torch-missing-at-build", 3001)]
    for cut in (len(body), len(body) + wrapped.index(b"\n") + 1, len(body) + len(wrapped)):
        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(dgs, "_split_points", lambda _path, size, _parts, cut=cut: [0, cut, size])
            assert dg.diagnose_path(path, workers=2).to_dict() == single, cut
    cases = {
        "findings": body
        + (LOGS / "compiler-oom_vllm-1777.log").read_bytes()
        + body
        + (LOGS / "cmake-too-old_arion-1.log").read_bytes()
        + body
        + (LOGS / "compiler-oom_stellar-core-5308.log").read_bytes()
        + body
        + (LOGS / "torch-missing-at-build_uv-15098.log").read_bytes(),  # a wrapped message
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
    importlib.reload(dge)
    module = importlib.reload(dgs)
    assert module.diagnose_stream(io.BytesIO(b"Killed signal terminated program cc1plus\n")).ids == [
        "compiler-oom"
    ]


# ------------------------------------------------------------------------------------------
# property


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.binary(max_size=4096), st.sampled_from([None, 7, 64, 4096]))
def test_random_bytes_never_crash(blob, chunk):
    old = dgs.CHUNK_SIZE
    try:
        if chunk:
            dgs.CHUNK_SIZE = chunk
        report = dg.diagnose_stream(io.BytesIO(blob))
        json.dumps(report.to_dict())
        for finding in report.findings:
            assert finding.line >= 1
    finally:
        dgs.CHUNK_SIZE = old


@settings(max_examples=150, deadline=None)
@given(st.binary(max_size=600), st.binary(max_size=600))
def test_known_line_found_among_random_bytes(before, after):
    line = b"OSError: CUDA_HOME environment variable is not set. Please set it to your CUDA install root."
    report = dg.diagnose_stream(io.BytesIO(before + b"\n" + line + b"\n" + after))
    assert "cuda-home-missing" in report.ids


# ------------------------------------------------------------------------------------------
# wrapped lines (issue 19): a message continues on the next line, original line numbers kept


def test_terminal_wrap_mid_word_and_mid_symbol():
    log = (
        b"Traceback (most recent call last):\n"
        b"ImportError: /opt/venv/lib/python3.10/site-packages/vllm/_C.abi3.so: undefined symbo\n"
        b"l: _ZN3c104cuda9SetDeviceEi\n"
    )
    report = scan(log)
    assert report.ids == ["torch-abi-undefined-symbol"]
    assert report.findings[0].line == 2  # where the message starts
    assert "undefined symbol: _ZN3c104cuda9SetDeviceEi" in report.findings[0].evidence
    # a mangled name cut in two, the anchor itself broken
    report = scan(
        b"ImportError: /opt/venv/lib/python3.10/site-packages/flash_attn_2_cuda.so: undefined symbol: _ZN3c1\n"
        b"0_Z4cuda29c10_cuda_check_implementationEiPKcS2_ib\n"
    )
    assert report.ids == ["torch-abi-undefined-symbol"]
    assert report.findings[0].line == 1


def test_anchor_broken_by_the_wrap_is_found_through_its_second_anchor():
    log = (
        b"RuntimeError: The NVIDIA driver on your sys\n"
        b"tem is too old (found version 11040). Please update your GPU driver by downloading and inst\n"
        b"alling a new version from the URL: http://www.nvidia.com/Download/index.aspx\n"
    )
    assert scan(log).ids == []  # the line before is too short to have been wrapped
    log = b"  [stderr] RuntimeError: The NVIDIA driver on your system is too old (found versi\n" + b"on 11040).\n"
    assert scan(log).ids == ["driver-too-old"]
    log = (
        b"[  136.92] \x1b[31mRuntimeError: Failed to initialise CUDA. The NVIDIA driver on your sys\r\n"
        b"[  136.93] tem is too old (found version 11040).\x1b[0m\r\n"
    )
    report = scan(log)
    assert report.ids == ["driver-too-old"]
    assert report.findings[0].line == 1
    assert "driver on your system is too old" in report.findings[0].evidence


def test_uv_box_block_wrapped_by_uv():
    log = (
        "Resolved 66 packages in 1.25s\n"
        "  × No solution found when resolving dependencies:\n"
        "  ╰─▶ Because the requested Python version (>=3.8) does not satisfy\n"
        "      Python>=3.10 and vllm==0.8.5 depends on Python>=3.10, we can conclude\n"
        "      that vllm==0.8.5 cannot be used.\n"
        "      And because your project depends on vllm==0.8.5, we can conclude that your\n"
        "      project's requirements are unsatisfiable.\n"
    ).encode()
    report = scan(log)
    assert report.ids == ["python-unsupported", "dependency-conflict"]
    first, second = report.findings
    assert first.line == 3 and "does not satisfy Python>=3.10" in first.evidence
    assert first.rank["root"] and first.rank["explains"] == ["dependency-conflict"]
    assert second.explained_by == ["python-unsupported"] and not second.rank["root"]


def test_pip_indented_subprocess_output_and_uv_hint():
    log = (
        b"  \xc3\x97 Failed to build `auto-gptq==0.7.1`\n"
        b"  \xe2\x95\xb0\xe2\x94\x80\xe2\x96\xb6 Call to `setuptools.build_meta:__legacy__.build_wheel` failed (exit status: 1)\n"
        b"      [stdout]\n"
        b"      Building cuda extension requires PyTorch (>=1.13.0) being installed, please install PyTorch first: No\n"
        b"      module named 'torch'\n"
    )
    report = scan(log)
    assert report.ids == ["torch-missing-at-build"]
    assert report.findings[0].line == 4
    hint = (
        b"  help: `flash-attn` (v2.7.4.post1) was included because `vllm` (v0.8.5) depends on `flash-attn`\n"
        b"        hint: This error likely indicates that `flash-attn@2.7.4.post1` depends on `torch`, but doesn't declare\n"
        b"        it as a build dependency. If `flash-attn` is a first-party package, consider adding `torch`\n"
        b"        to its `build-system.requires`. Otherwise, `uv pip install torch` into the environment and re-run\n"
        b"        with `--no-build-isolation`.\n"
    )
    report = scan(hint)
    assert report.ids == ["torch-missing-at-build"]
    assert report.findings[0].line == 2


def test_unrelated_neighbour_lines_are_not_joined():
    # a short line, and a line that starts a message of its own, are never taken as continuations
    log = (
        b"-- Could NOT find Python3 (missing: Python3_NumPy_INCLUDE_DIRS NumPy) (found version 3.10)\n"
        b"ERROR: Development headers are in the wheel, see above\n"
        b"Killed\n"
        b"cc1plus is a compiler\n"
    )
    report = scan(log)
    assert report.findings == []


def test_tool_wrap_at_a_space_of_the_anchor_or_before_a_long_word():
    """uv and pip break at spaces: the space an anchor ended with is gone, and a long word (a repr,
    a URL) leaves a short line before it, which still goes on in the indented next line."""
    log = (
        b"ERROR 02-19 19:40:53 engine.py:389] ModuleNotFoundError: No module named\n"
        b"  'xformers'\n"
    )
    report = scan(log)
    assert report.ids == ["xformers-missing"] and report.findings[0].line == 1
    log = (
        b"WARNING: Retrying (Retry(total=4, connect=None, read=None, redirect=None,\n"
        b"  status=None)) after connection broken by\n"
        b"  'NewConnectionError('<pip._vendor.urllib3.connection.HTTPSConnection object at\n"
        b"  0x7fe056f410f0>: Failed to establish a new connection: [Errno 101] Network is\n"
        b"  unreachable',)': /whl/cpu/torch_stable.html\n"
    )
    report = scan(log)
    assert report.ids == ["index-unreachable"] and report.findings[0].line == 2
    # the same short line before a short word: it was not full, so it does not go on
    short = b"  status=None)) after connection broken by\n  'NewConnectionError('<x>\n"
    assert [t for t, _ in wrapped_messages(short, 0, short.index(b"\n"), 1)] == []
    # nor into a line that is not indented as a tool's continuation
    flush = b"  status=None)) after connection broken by\n" + b"x" * 60 + b"\n"
    assert [t for t, _ in wrapped_messages(flush, 0, flush.index(b"\n"), 1)] == []
    # a break at each space of a message that spans three lines: one of the rule's literals is whole
    log = (
        b"  2023-08-27T16:39:18.117Z [error] [cmake] CMake Error: The current\n"
        b"  CMakeCache.txt directory /workspaces/mjx/build/CMakeCache.txt is different\n"
        b"  than the directory /home/u/mjx/build where CMakeCache.txt was created.\n"
    )
    report = scan(log)
    assert report.ids == ["stale-build-state"] and report.findings[0].line == 1


def test_wrapped_readings_keep_line_numbers():
    block = b"x\n" + b"a" * 70 + b"\n" + b"bbb ccc\n" + b"ERROR: new message\n"
    ls = block.index(b"bbb")
    readings = wrapped_messages(block, ls, block.index(b"\n", ls), 3)
    assert [text for text, _ in readings] == ["a" * 70 + "bbb ccc", "a" * 70 + " bbb ccc"]
    assert readings[0][1] == [(0, 2), (70, 3)]


# ------------------------------------------------------------------------------------------
# ranking (issue 19): specificity, then evidence strength, then position


def test_missing_cuda_wheel_ranks_before_the_resolver_conflict():
    log = (
        b"ERROR: Cannot install vllm==0.8.5 because these package versions have conflicting dependencies.\n"
        b"The conflict is caused by:\n"
        b"    vllm 0.8.5 depends on torch==2.6.0\n"
        b"ERROR: ResolutionImpossible: for help visit https://pip.pypa.io/en/latest/topics/dependency-resolution/\n"
        b"ERROR: Could not find a version that satisfies the requirement torch==2.6.0+cu118 (from versions: 2.6.0)\n"
        b"ERROR: No matching distribution found for torch==2.6.0+cu118\n"
    )
    report = scan(log)
    assert report.ids == ["torch-wheel-not-found", "dependency-conflict"]
    root, other = report.to_dict()["findings"]
    assert root["line"] == 5 and other["line"] == 1  # ranked above an earlier line: it explains it
    assert root["rank"]["root"] is True and root["rank"]["explains"] == ["dependency-conflict"]
    assert "explains dependency-conflict" in root["rank"]["reason"]
    assert other["rank"]["root"] is False and other["explained_by"] == ["torch-wheel-not-found"]
    assert other["rank"]["reason"] == "follows from torch-wheel-not-found"


def test_xformers_pinned_to_another_torch_ranks_before_the_conflict():
    log = (
        b"Successfully installed torch-2.6.0 xformers-0.0.28.post3\n"
        b"ERROR: pip's dependency resolver does not currently take into account all the packages that are installed.\n"
        b"xformers 0.0.28.post3 requires torch==2.5.1, but you have torch 2.6.0 which is incompatible.\n"
    )
    assert scan(log).ids[:2] == ["xformers-torch-mismatch", "dependency-conflict"]


def test_weak_evidence_ranks_after_strong_evidence():
    log = (
        b"ERROR: Ignored the following versions that require a different python version: 2.0.0 Requires-Python >=3.12\n"
        b"ERROR: Could not find a version that satisfies the requirement torch==2.6.0+cu118 (from versions: none)\n"
    )
    report = scan(log)
    assert report.ids == ["torch-wheel-not-found", "python-unsupported"]
    assert [f.rank["strength"] for f in report.findings] == ["strong", "weak"]
    assert [f.rank["root"] for f in report.findings] == [True, True]
    assert "strong evidence at line 2, before the other root causes" == report.findings[0].rank["reason"]
    # alone, weak evidence is still reported
    assert scan(log.splitlines(keepends=True)[0]).ids == ["python-unsupported"]


NINJA_NO_BUILD_FILE = b"ninja: error: loading 'build.ninja': No such file or directory\n"


def test_weak_evidence_that_cannot_stand_alone():
    """ninja run where there is no build.ninja names no cause by itself (the configure step failed or
    never ran, or the wrong folder): no finding alone, and the user is pointed at the error line."""
    alone = scan(b"$ ninja\n" + NINJA_NO_BUILD_FILE)
    assert alone.ids == []
    assert alone.first_error_lines and alone.first_error_lines[0][0] == 2
    # next to a failure, it is the leftover state of that failed build (after the root)
    log = b"CMake 3.26 or higher is required.  You are running version 3.22.1\n" + NINJA_NO_BUILD_FILE
    report = scan(log)
    assert report.ids == ["cmake-too-old", "stale-build-state"]
    assert report.first_error_lines == []
    assert report.findings[1].line == 2 and report.findings[1].rank["strength"] == "weak"


def test_strong_evidence_later_takes_the_place_of_weak_evidence():
    later = b"CMake Error: The current CMakeCache.txt directory /a/build/CMakeCache.txt is different than the directory /b/build\n"
    report = scan(NINJA_NO_BUILD_FILE + b"some line\n" + later)
    assert report.ids == ["stale-build-state"]
    assert report.findings[0].line == 3 and report.findings[0].rank["strength"] == "strong"
    assert "CMakeCache.txt" in report.findings[0].evidence


def test_parallel_parts_keep_the_strong_evidence_and_drop_lone_weak_evidence(tmp_path):
    filler = b"".join(b"[%d/900] Building CXX object csrc/x%d.o\n" % (i, i) for i in range(3000))
    later = b"CMake Error: The current CMakeCache.txt directory /a/CMakeCache.txt is different than the directory /b\n"
    path = tmp_path / "parts.log"
    path.write_bytes(NINJA_NO_BUILD_FILE + filler + later)
    single = dg.diagnose_path(path, workers=1).to_dict()
    assert dg.diagnose_path(path, workers=2).to_dict() == single
    assert single["findings"][0]["line"] == 3002
    path.write_bytes(filler + NINJA_NO_BUILD_FILE + filler)
    report = dg.diagnose_path(path, workers=2)
    assert report.ids == [] and report.first_error_lines[0][0] == 3001


def test_weak_alone_is_validated(tmp_path):
    path = tmp_path / "k.toml"
    base = '[[failure]]\nid = "a-a"\nseverity = "error"\npatterns = ["Alpha text"]\ncause = "c."\nfix = "f."\n'
    path.write_text(base + 'weak_alone = "no"\nweak_patterns = ["Beta text"]\n')
    with pytest.raises(ValueError, match=r"k\.toml.*'a-a'.*'weak_alone'.*true or false"):
        dg.load_knowledge(path)
    path.write_text(base + "weak_alone = false\n")
    with pytest.raises(ValueError, match=r"'a-a'.*'weak_alone'.*weak_patterns"):
        dg.load_knowledge(path)
    path.write_text(base + 'weak_alone = false\nweak_patterns = ["Beta text"]\n')
    assert [r.weak_alone for r in dg.load_knowledge(path)] == [False]


def test_explains_is_validated(tmp_path):
    path = tmp_path / "k.toml"
    path.write_text(
        '[[failure]]\nid = "a-a"\nseverity = "error"\npatterns = ["Alpha text"]\ncause = "c."\nfix = "f."\n'
        'explains = ["zz-top"]\n'
    )
    with pytest.raises(ValueError, match=r"k\.toml.*'a-a'.*'explains'.*zz-top"):
        dg.load_knowledge(path)
