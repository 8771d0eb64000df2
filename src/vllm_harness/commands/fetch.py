"""`invoke fetch`: the variant's source (or `--source`), and with `--deps` the sources vLLM's CMake
fetches."""

from __future__ import annotations

from pathlib import Path

from vllm_harness.commands.common import print_json
from vllm_harness.pipeline.run import run_single
from vllm_harness.steps import deps_cache
from vllm_harness.steps.fetch import override, parse_source


def task_fetch(ctx, a) -> int:
    """`invoke fetch --variant X [--source PATH|URL@REF|sdist] [--deps]`: the fetch step (with the source
    override, for this run) and, with --deps, vLLM's CMake dependencies into the deps cache."""
    if a.source:
        ctx.variant = override(ctx.variant, parse_source(a.source))
    res = dict(run_single(ctx, "fetch"))
    if a.deps:
        src = Path(res["source"])
        root = deps_cache.cache_root(ctx.layout, ctx.base_env)
        say = (lambda s: None) if a.json else print
        res["deps"] = deps_cache.fill(
            src, root, ctx.base_env, device=ctx.device, every=a.every_arch, log=say, variant=ctx.name
        )
        if not a.json:
            print(
                f"deps: {len(res['deps']['fetched'])} fetched, {len(res['deps']['cached'])} already in {root}"
            )
    if a.json:
        print_json(a, res)
    return 0
