"""The post-install step: the packages vLLM needs at run time (xformers from its index), torch kept."""
from __future__ import annotations

from pathlib import Path

from vllm_harness.core.runner import run_commands
from vllm_harness.steps.context import Ctx, index_or_local, torch_kept


def do_post_install(ctx: Ctx, log: Path) -> dict:
    pk = ctx.variant.post_install
    if pk["packages"]:
        local = index_or_local(
            pk["index_url"], f"{ctx.variant.path.name} [post_install]", pk["packages"], ctx.env()
        )
        run_commands(
            "post-install",
            [ctx.install_cmd(pk["packages"], pk["index_url"], local=local)],
            log,
            ctx.env(),
            quiet=ctx.options.quiet,
        )
        torch_kept(ctx, log)
    return {"note": ", ".join(pk["packages"]) or "nothing to install"}
