"""`invoke patches`: check patches/ against every vLLM release each claims, or dry-run them on one tree."""
from __future__ import annotations

from pathlib import Path

from vllm_harness.commands.common import print_json
from vllm_harness.core.errors import UsageError
from vllm_harness.facts.source_tree import vllm_version
from vllm_harness.facts.toolkit import clean_env
from vllm_harness.steps.patches import apply_all, check_releases, load_patches, release_versions


def task_patches(layout, a) -> int:
    """`invoke patches [--version V] [--source DIR] [--json]`: list the patches, check them against a tree
    (dry run), or -- the default -- against every PyPI release each claims (network)."""

    plist = load_patches(layout.root / "patches")
    env = clean_env()
    if a.source:
        src = Path(a.source).resolve()
        ver = a.version or vllm_version(src)[0]
        res = {
            "source": str(src),
            "vllm_version": ver,
            "patches": apply_all(plist, src, ver, env, apply=False),
        }
        ok = all(p["status"] != "failed" for p in res["patches"])
    else:
        versions = None
        if a.version:
            versions = [(v, u) for v, u in release_versions() if v == a.version]
            if not versions:
                raise UsageError(
                    f"--version {a.version}: PyPI has no vLLM sdist of that version.", "Check it."
                )
        res = check_releases(
            plist,
            layout.cache / "patch-check",
            env,
            versions=versions,
            log=(lambda s: None) if a.json else print,
        )
        ok = res["ok"]
    if a.json:
        print_json(a, res)
    elif a.source:
        for p in res["patches"]:
            st = "applies (dry run)" if p.get("dry_run") else p["status"]
            print(f"{p['name']:<48} {st}" + (f"  ({p['reason']})" if p.get("reason") else ""))
    else:
        print(
            f"patches: {len(plist)} patch(es) x {res['releases_checked']} release(s): "
            f"{len(res['failed'])} failed, {len(res['claims_too_much'])} claimed release(s) where not needed"
        )
        for r in res["failed"]:
            print(f"FAILED {r['patch']} on {r['version']}: {r.get('reason', '')}\n{r.get('hunk', '')}")
    return 0 if ok else 1
