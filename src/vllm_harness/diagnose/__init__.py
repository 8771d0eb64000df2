"""diagnose: name the root cause of a failed build, install or run log, with its fix.

    rules.py      data/failures.toml loaded and checked; the literals (anchors) each pattern needs
    normalize.py  lines as a person reads them; wrapped messages joined again
    engine.py     the streaming scan: a literal prefilter (Hyperscan, else ``re``), the full patterns on the
                  lines that hold an anchor, parallel parts for big files
    rank.py       root cause first, and why
    render.py     the table for people
    corpus.py     the real-log corpus, its tune/eval split and the accuracy measure
"""

from vllm_harness.diagnose.corpus import accuracy, corpus_split, corpus_thread, load_corpus
from vllm_harness.diagnose.engine import ENGINES, default_engine
from vllm_harness.diagnose.render import render_table
from vllm_harness.diagnose.rules import (
    CONTEXT_KEYS,
    DEFAULT_KNOWLEDGE,
    Finding,
    Report,
    Rule,
    load_knowledge,
    render_fix,
)
from vllm_harness.diagnose.stream import diagnose_path, diagnose_stream

__all__ = [
    "CONTEXT_KEYS",
    "DEFAULT_KNOWLEDGE",
    "ENGINES",
    "Finding",
    "Report",
    "Rule",
    "accuracy",
    "corpus_split",
    "corpus_thread",
    "default_engine",
    "diagnose_path",
    "diagnose_stream",
    "load_corpus",
    "load_knowledge",
    "render_fix",
    "render_table",
]
