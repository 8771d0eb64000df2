"""diagnose's two prefilter engines (Hyperscan and pure re) give the same reports.

Kept apart from test_diagnose.py, whose tests all run once per engine."""

from __future__ import annotations

import io
import sys
from pathlib import Path

import pytest

from vllm_harness import diagnose as dg
from vllm_harness.diagnose import engine as dge
from vllm_harness.diagnose import stream as dgs
from vllm_harness.diagnose.engine import HS_BATCH

LOGS = Path(__file__).parent / "logs"
INDEX = dg.load_corpus(LOGS)  # index.toml and every index-*.toml


def test_engines_agree_on_the_corpus_and_on_resumed_scans(monkeypatch, tmp_path):
    """The Hyperscan prefilter gives the same reports as the pure-re one, also when it has to
    resume a block after HS_BATCH hits (forced here with a batch of 2)."""
    if "hyperscan" not in dg.ENGINES:
        pytest.skip("hyperscan is not installed here (diagnose uses its re prefilter)")
    body = b"".join(b"[%d/9000] error: near miss, Error: not a known one\n" % i for i in range(1, 9001))
    big = tmp_path / "dense.log"
    big.write_bytes(body + (LOGS / "compiler-oom_vllm-1777.log").read_bytes() + body)
    paths = [LOGS / e["file"] for e in INDEX] + [big]
    want = {p: dg.diagnose_path(p, workers=1, engine="re").to_dict() for p in paths}
    for batch in (HS_BATCH, 2):
        monkeypatch.setattr(dge, "HS_BATCH", batch)
        for p in paths:
            assert dg.diagnose_path(p, workers=1, engine="hyperscan").to_dict() == want[p], (p.name, batch)
    assert [f.line for f in dg.diagnose_path(big, workers=1, engine="hyperscan").findings][0] > 9000


def test_unknown_engine_is_refused():
    with pytest.raises(ValueError, match="not available here"):
        dg.diagnose_stream(io.BytesIO(b"x\n"), engine="pcre-jit")


def test_module_works_without_hyperscan(monkeypatch):
    import importlib

    monkeypatch.setitem(sys.modules, "hyperscan", None)
    try:
        engine = importlib.reload(dge)
        stream = importlib.reload(dgs)  # the scan binds the engine it was loaded with
        assert engine.ENGINES == ("re",)
        report = stream.diagnose_path(LOGS / "compiler-oom_vllm-1777.log")
        assert report.ids[0] == "compiler-oom"
    finally:
        monkeypatch.undo()
        importlib.reload(dge)
        importlib.reload(dgs)


def test_a_hyperscan_that_cannot_compile_falls_back_to_re(monkeypatch):
    if "hyperscan" not in dg.ENGINES:
        pytest.skip("hyperscan is not installed here (diagnose uses its re prefilter)")

    def broken(words):
        raise RuntimeError("this CPU lacks SSSE3")

    monkeypatch.setattr(dge, "_hyperscan_db", broken)
    report = dg.diagnose_path(LOGS / "compiler-oom_vllm-1777.log", workers=1, engine="hyperscan")
    assert report.ids[0] == "compiler-oom"
