"""The handlers behind ``compat`` and ``plan`` (cli.py keeps only the argument table)."""

from __future__ import annotations

import sys
from pathlib import Path

from vllm_harness.commands.common import layout_of, print_json
from vllm_harness.core import masking, writer
from vllm_harness.core.errors import EXIT_OK, EXIT_PROBLEM, UsageError
from vllm_harness.facts import compat, fleet, machine, machine_profile, planner
from vllm_harness.facts import index_metadata as im

#: the first line of the generated lock: how a file `compat --refresh --out` may replace is known
LOCK_MARK = im.LOCK_HEADER.splitlines()[0].encode()


def compat_command(a, layout, out) -> int:
    lock = Path(a.out) if getattr(a, "out", None) else compat.LOCK_PATH
    cache = layout.state / "cache" / "index"
    if a.refresh:
        for flag, url in (("--index-url", a.index_url), ("--pytorch-index", a.pytorch_index)):
            if url:   # before any request: a URL an HTTP client would misread (and print) is refused
                masking.check_url(url, flag)
        # the target is judged before the index is read: a link, a hard link or a file the harness did not
        # write (its GENERATED line) is refused now, unless --force for the last
        writer.check_target(lock, what="compat --out", force=getattr(a, "force", False), marker=LOCK_MARK,
                            fix="Give a new --out FILE, or pass --force to replace it.")
        layout.ensure()   # the cache lives in the state folder, which carries the harness's marker
        with writer.permitted(lock if getattr(a, "force", False) else None):
            res = im.refresh(out_path=lock, index=a.index_url or im.DEFAULT_INDEX,
                             pytorch_index=a.pytorch_index or im.PYTORCH_INDEX, cache_dir=cache,
                             progress=not a.json and sys.stderr.isatty())
        compat.load.cache_clear()
        if a.json:
            out(a, res.to_dict())
        else:
            for n in res.notes:
                print(f"note: {n}")
            for s in res.skipped:
                print(f"skipped (malformed metadata, not written): {s}")
            c = res.counts
            print(f"compat: {lock} {'updated' if res.changed else 'unchanged'} (generated {res.generated}): "
                  f"{c['vllm']} vLLM, {c['torch']} torch, {c['xformers']} xformers releases; {res.requests} "
                  f"requests, {res.cache_hits} from the cache, {res.seconds:.1f}s")
        return EXIT_OK
    data = compat.load_file(compat.DATA_PATH, lock)
    info = {"hand_file": str(compat.DATA_PATH), "lock_file": str(lock) if lock.is_file() else None,
            "generated": data.generated, "age_days": data.age_days(), "last_refresh": im.last_refresh(cache),
            "newest": {"vllm": data.newest("vllm"), "torch": data.newest("torch")}}
    if a.json:
        out(a, info)
    elif data.generated is None:
        print(f"compat: no generated data ({lock} missing): hand-kept data only, newest vLLM "
              f"{info['newest']['vllm']}. Run `invoke compat --refresh`.")
    else:
        print(
            f"compat: index data generated {data.generated} ({info['age_days']} days ago; last refresh "
            f"{info['last_refresh'] or 'not on this machine'}); newest vLLM {info['newest']['vllm']}, torch "
            f"{info['newest']['torch']}"
        )
    return EXIT_OK


def plan_command(a, layout, out) -> int:
    machines = a.machine if isinstance(a.machine, list) else ([a.machine] if a.machine else [])
    if len(machines) > 1:
        return _fleet(a, machines, out)
    if a.write:  # the name and the target before anything is probed or read
        planner.check_write(Path(a.write), getattr(a, "force", False))
    if machines:
        profile, name = machine_profile.load_profile(Path(machines[0])), Path(machines[0]).stem
    else:
        profile, name = machine.probe(layout.state), "this machine"
    data = compat.load()
    report = planner.plan(profile, data, name)
    written = None
    if a.write:
        written = planner.write_variant(report, data, Path(a.write), force=getattr(a, "force", False))
    pub = planner.public(report)
    if written is not None:
        pub["written"] = str(written)
    if a.json:
        out(a, pub)
    else:
        planner.render_table(pub)
        if written is not None:
            print(f"wrote {written}: build it with `nox -s build-{written.stem}`")
    return EXIT_OK if report.get("recommendation") else EXIT_PROBLEM


def _fleet(a, machines: list[str], out) -> int:
    """Several --machine: the fewest variants that serve them all (facts/fleet.py)."""
    if a.write:
        raise UsageError(
            "plan --write writes one machine's variant; with several --machine, plan prints the "
            "fleet's variants and writes nothing.",
            "Write each variant with `invoke plan --machine FILE --write envs/NAME.toml` for a machine "
            "it serves.",
        )
    names = [Path(m).stem for m in machines]
    if len(set(names)) != len(names):
        raise UsageError(
            f"plan --machine: two profiles share a name ({', '.join(sorted(names))}); each machine "
            "is named by its file's stem.",
            "Give each profile a file name of its own.",
        )
    profiles = [(Path(m).stem, machine_profile.load_profile(Path(m))) for m in machines]
    rep = fleet.plan_fleet(profiles, compat.load())
    if a.json:
        out(a, rep)
    else:
        fleet.render_fleet(rep)
    return EXIT_OK if not rep["unserved"] else EXIT_PROBLEM


def cmd_compat(a) -> int:
    return compat_command(a, layout_of(a), print_json)


def cmd_plan(a) -> int:
    return plan_command(a, layout_of(a), print_json)
