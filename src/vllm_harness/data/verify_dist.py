"""Runs INSIDE the env being verified: the checks that need several GPUs (issue 10).

* P2P: which GPU pairs can access each other's memory (consumer GPUs often cannot: vLLM's custom
  all-reduce then falls back to NCCL).
* all-reduce through torch.distributed across every visible GPU (NCCL), checked for the right sum, with
  the bus bandwidth NCCL's tests report (2 * (n-1)/n * bytes / time).  With ``--backend gloo`` the same code
  runs on CPU processes, which is how it is tested on machines without GPUs.
* vLLM's custom all-reduce: whether the build has the op (``_C_custom_ar`` / ``_C.all_reduce``); running it
  needs vLLM's own IPC set-up and is reported as a skip with that reason when vLLM's Python side is absent.

Prints one JSON object on the last line: {"world": n, "backend": ..., "checks": [...]}.
"""

import argparse
import json
import os
import socket
import time


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank, world, backend, port, sizes, iters, queue):
    import torch
    import torch.distributed as dist
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group(backend, rank=rank, world_size=world)
    device = torch.device("cuda", rank) if backend == "nccl" else torch.device("cpu")
    if backend == "nccl":
        torch.cuda.set_device(rank)
    out = []
    try:
        for n in sizes:
            x = torch.full((n,), float(rank + 1), device=device, dtype=torch.float32)
            dist.all_reduce(x)  # warm-up (and NCCL's communicator set-up)
            expected = world * (world + 1) / 2
            ok = bool(torch.allclose(x, torch.full_like(x, expected)))
            x = torch.full((n,), float(rank + 1), device=device, dtype=torch.float32)
            if backend == "nccl":
                torch.cuda.synchronize()
            dist.barrier()
            t0 = time.perf_counter()
            for _ in range(iters):
                dist.all_reduce(x)
            if backend == "nccl":
                torch.cuda.synchronize()
            dt = (time.perf_counter() - t0) / iters
            nbytes = n * 4
            out.append({"elements": n, "ok": ok, "seconds": dt,
                        "bus_gbps": 2 * (world - 1) / world * nbytes / dt / 1e9})
    finally:
        dist.destroy_process_group()
    if rank == 0:
        queue.put(out)


def all_reduce_check(world, backend, sizes, iters):
    import torch.multiprocessing as mp
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    port = _free_port()
    procs = [ctx.Process(target=_worker, args=(r, world, backend, port, sizes, iters, queue)) for r in range(world)]
    for p in procs:
        p.start()
    try:
        result = queue.get(timeout=300)
    finally:
        for p in procs:
            p.join(timeout=60)
            if p.is_alive():
                p.terminate()
    bad = [p.exitcode for p in procs if p.exitcode not in (0, None)]
    if bad:
        raise RuntimeError(f"a worker exited with {bad}")
    return result


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--backend", choices=["nccl", "gloo"], default="nccl")
    ap.add_argument("--world", type=int, default=0, help="processes (default: the GPUs visible)")
    ap.add_argument("--sizes", default="1024,1048576,16777216")
    ap.add_argument("--iters", type=int, default=10)
    a = ap.parse_args()
    import torch
    checks = []
    ngpu = torch.cuda.device_count() if torch.cuda.is_available() else 0
    world = a.world or (ngpu if a.backend == "nccl" else 2)
    out = {"world": world, "backend": a.backend, "gpus": ngpu, "checks": checks}

    if a.backend == "nccl":
        pairs = {}
        for i in range(ngpu):
            for j in range(ngpu):
                if i != j:
                    pairs[f"{i}->{j}"] = bool(torch.cuda.can_device_access_peer(i, j))
        if ngpu < 2:
            checks.append({"name": "p2p", "status": "skip", "reason": f"{ngpu} GPU(s) visible: needs 2 or more",
                           "metrics": {}})
        else:
            checks.append({"name": "p2p", "status": "pass" if all(pairs.values()) else "skip",
                           "reason": "" if all(pairs.values()) else
                           "no P2P between some GPUs: vLLM's custom all-reduce will not be used there",
                           "metrics": {"pairs": pairs}})
    if world < 2:
        checks.append({"name": f"all-reduce ({a.backend})", "status": "skip",
                       "reason": f"{world} worker(s): needs 2 or more GPUs", "metrics": {}})
    else:
        sizes = [int(s) for s in a.sizes.split(",") if s]
        try:
            res = all_reduce_check(world, a.backend, sizes, a.iters)
            wrong = [r for r in res if not r["ok"]]
            best = max(r["bus_gbps"] for r in res)
            checks.append({"name": f"all-reduce ({a.backend}, {world} ranks)",
                           "status": "fail" if wrong else "pass",
                           "reason": f"wrong sum at {wrong[0]['elements']} elements" if wrong else "",
                           "metrics": {"sizes": res, "best_bus_gbps": round(best, 3)}})
        except Exception as e:  # noqa: BLE001 - reported as a failed check
            checks.append({"name": f"all-reduce ({a.backend}, {world} ranks)", "status": "fail",
                           "reason": f"{type(e).__name__}: {e}"[:400], "metrics": {}})
    has_custom = False
    for ns in ("_C_custom_ar", "_C"):
        try:
            has_custom = has_custom or hasattr(getattr(torch.ops, ns), "all_reduce")
        except (AttributeError, RuntimeError):
            pass
    checks.append({"name": "vllm custom all-reduce", "status": "skip",
                   "reason": ("op present; running it needs vLLM's CustomAllreduce IPC set-up (vllm.distributed)"
                              if has_custom else "op not in this build (or the extension is not loaded)"),
                   "metrics": {"present": has_custom}})
    print(json.dumps(out))


if __name__ == "__main__":
    main()
