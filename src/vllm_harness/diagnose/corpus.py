"""The corpus of real failure logs (tests/logs/): loading the indexes, the tune/eval split by source thread,
and the accuracy measure the tests and the benchmark share."""
from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from vllm_harness.core.safeio import tomllib  # the one TOML shim (tomli on 3.10)
from vllm_harness.diagnose.rules import load_knowledge
from vllm_harness.diagnose.stream import diagnose_path

#: The corpus's index files: ``index.toml`` (the logs the rules were written on before the
#: held-back split existed) and every ``index-*.toml`` (logs gathered later).
CORPUS_INDEX = "index.toml"


CORPUS_EXTRA_GLOB = "index-*.toml"


#: Keys a corpus entry may have.
CORPUS_KEYS = {"file", "expected", "source", "synthetic", "reason", "note", "why"}


#: One source thread in EVAL_SHARE goes to the held-back ``eval`` part (by a hash of its URL).
EVAL_SHARE = 3


def corpus_thread(source: str) -> str:
    """The thread a log comes from, normalised: scheme, ``www.``, query, fragment (``#issuecomment-``)
    and a trailing ``/`` dropped; a GitHub pull request and an issue of one number are one thread."""
    from urllib.parse import urlsplit

    text = source.strip()
    parts = urlsplit(text)
    if not parts.netloc:
        return text.lower()
    host = parts.netloc.lower().removeprefix("www.")
    segs = [s for s in parts.path.split("/") if s]
    if host == "github.com" and len(segs) >= 4 and segs[2] in ("issues", "pull", "pulls", "discussions"):
        kind = "discussions" if segs[2] == "discussions" else "issues"
        segs = [segs[0].lower(), segs[1].lower(), kind, segs[3]]
    return host + "/" + "/".join(segs)


def corpus_split(source: str, tuned_threads: Iterable[str] = ()) -> str:
    """``tune`` or ``eval`` for a log of this source, decided once: the threads of the logs the
    rules were written on (``tuned_threads``) are ``tune``; any other thread is ``eval`` when the
    first 8 bytes of the SHA-256 of :func:`corpus_thread` are 0 modulo :data:`EVAL_SHARE`."""
    import hashlib

    thread = corpus_thread(source)
    if thread in set(tuned_threads):
        return "tune"
    digest = hashlib.sha256(thread.encode("utf-8")).digest()
    return "eval" if int.from_bytes(digest[:8], "big") % EVAL_SHARE == 0 else "tune"


def load_corpus(logs_dir: str | Path) -> list[dict[str, Any]]:
    """The entries of ``index.toml`` and every ``index-*.toml`` in ``logs_dir``, each with
    ``index`` (its index file) and ``split`` (``tune``/``eval``, :func:`corpus_split`) added."""
    root = Path(logs_dir)
    files = [root / CORPUS_INDEX] + sorted(p for p in root.glob(CORPUS_EXTRA_GLOB) if p.is_file())
    entries: list[dict[str, Any]] = []
    for path in files:
        try:
            doc = tomllib.loads(path.read_text(encoding="utf-8"))
        except tomllib.TOMLDecodeError as exc:
            raise ValueError(f"{path}: not valid TOML: {exc}") from None
        for entry in doc.get("log", []):
            entries.append({**entry, "index": path.name})
    tuned = {corpus_thread(e["source"]) for e in entries if e["index"] == CORPUS_INDEX}
    for entry in entries:
        entry["split"] = "tune" if entry["index"] == CORPUS_INDEX else corpus_split(entry["source"], tuned)
    return entries


def accuracy(
    entries: Sequence[Mapping[str, Any]], logs_dir: str | Path, engine: str | None = None
) -> dict[str, Any]:
    """Diagnose every corpus log and measure, per split (``tune``, ``eval``, ``all``): how often the
    expected root id comes first, false alarms on the controls (``expected = []``: any finding), and
    per id precision and recall of the root (the first finding)."""
    root = Path(logs_dir)
    rows = []
    rules = load_knowledge()
    for entry in entries:
        report = diagnose_path(root / entry["file"], rules=rules, workers=1, engine=engine)
        want = entry["expected"][0] if entry["expected"] else None
        got = report.ids[0] if report.ids else None
        rows.append({"file": entry["file"], "split": entry["split"], "expected": want, "got": got,
                     "ids": report.ids})
    out: dict[str, Any] = {"logs": rows}
    for split in ("tune", "eval", "all"):
        part = [r for r in rows if split == "all" or r["split"] == split]
        failing = [r for r in part if r["expected"]]
        controls = [r for r in part if not r["expected"]]
        per_id: dict[str, dict[str, int]] = {}
        for r in part:
            for rid in {r["expected"], r["got"]} - {None}:
                per_id.setdefault(rid, {"tp": 0, "fp": 0, "fn": 0})
            if r["expected"] and r["got"] == r["expected"]:
                per_id[r["expected"]]["tp"] += 1
                continue
            if r["expected"]:
                per_id[r["expected"]]["fn"] += 1
            if r["got"]:
                per_id[r["got"]]["fp"] += 1
        out[split] = {
            "logs": len(part),
            "failing": len(failing),
            "root_first": sum(r["got"] == r["expected"] for r in failing),
            "controls": len(controls),
            "false_alarms": sum(bool(r["ids"]) for r in controls),
            "misses": [r for r in failing if r["got"] != r["expected"]],
            "alarms": [r for r in controls if r["ids"]],
            "per_id": dict(sorted(per_id.items())),
        }
    return out
