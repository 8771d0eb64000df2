"""The contract (docs/contract/, the names others depend on) holds: its failure ids are in data/failures.toml,
its commands and flags exist in the one command table, its machine-profile keys are in the schema."""

from __future__ import annotations

import re

import pytest
from conftest import ROOT

from vllm_harness.commands.table import BY_NAME
from vllm_harness.core.safeio import tomllib  # the one TOML shim (tomli on 3.10)
from vllm_harness.facts.machine_profile import GPU_KEYS, MACHINE_KEYS

DOCS = ROOT / "docs" / "contract"
IDS = {f["id"] for f in tomllib.loads((ROOT / "src" / "vllm_harness" / "data" / "failures.toml").read_text())
       ["failure"]}


def test_every_contract_failure_id_is_in_failures_toml():
    listed = re.findall(r"^\| `([a-z0-9-]+)` \|", (DOCS / "failure-ids.md").read_text(), re.M)
    assert len(listed) >= 30
    assert not [i for i in listed if i not in IDS]


def _task_rows():
    for line in (DOCS / "cli.md").read_text().splitlines():
        m = re.match(r"^\| `invoke ([a-z-]+)` \| ([^|]*) \|", line)
        if m:
            yield m.group(1), re.findall(r"`(--[a-z-]+)", m.group(2))


@pytest.mark.parametrize("task,flags", list(_task_rows()), ids=lambda x: x if isinstance(x, str) else "")
def test_every_contract_task_and_flag_exists(task, flags):
    assert task in BY_NAME, task
    have = {a.flag for a in BY_NAME[task].args}
    assert set(flags) <= have, set(flags) - have


def test_every_contract_profile_key_is_in_the_schema():
    text = (DOCS / "machine-profile.md").read_text()
    block = text.split("```toml", 1)[1].split("```", 1)[0]
    keys = set(re.findall(r"^([a-z_]+) = ", block, re.M))
    assert keys and keys <= set(MACHINE_KEYS) | set(GPU_KEYS), keys - set(MACHINE_KEYS) - set(GPU_KEYS)
