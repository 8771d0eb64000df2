"""A CPU model of vLLM's custom all-reduce ops (the `ipc-in-extension` generation, vLLM >= 0.8.3), for the tests.

Loaded by data/verify_dist.py as an op library (``--libs tests/custom_ar_model.py``), in every rank's process.
It registers the `_C_custom_ar` schemas that vLLM 0.21's csrc/torch_bindings.cpp declares, with CPU kernels
that behave like vLLM's in what the harness relies on: buffers shared between processes through handles that
must be exchanged and opened (POSIX shared memory here, CUDA IPC there), a signal buffer that every rank
waits on (the kernel's barrier), the input copied into the registered buffer and summed over every rank's
buffer.  It logs each call to ``$CUSTOM_AR_MODEL_LOG/<pid>.jsonl`` so the tests can check the set-up and the
teardown, and ``CUSTOM_AR_MODEL_WRONG_RANK=r`` makes rank r's result wrong (a failing comparison).
"""

import json
import os
import struct
import time
from multiprocessing import shared_memory

import torch

SCHEMAS = [
    "init_custom_ar(int[] ipc_tensors, Tensor rank_data, int rank, bool fully_connected) -> int",
    "all_reduce(int fa, Tensor inp, Tensor! out, int reg_buffer, int reg_buffer_sz_bytes) -> ()",
    "dispose(int fa) -> ()",
    "meta_size() -> int",
    "register_buffer(int fa, int[] ipc_tensors) -> ()",
    "get_graph_buffer_ipc_meta(int fa) -> (int[], int[])",
    "register_graph_buffers(int fa, int[][] handles, int[][] offsets) -> ()",
    "allocate_shared_buffer_and_handle(int size) -> (int, Tensor)",
    "open_mem_handle(Tensor mem_handle) -> int",
    "free_shared_buffer(int ptr) -> ()",
]
HANDLE_BYTES = 64
TIMEOUT_S = 30

_segments: dict[int, shared_memory.SharedMemory] = {}
_owned: set[int] = set()
_fas: dict[int, dict] = {}
_ids = iter(range(1, 1 << 30))


def _log(event, **kw):
    folder = os.environ.get("CUSTOM_AR_MODEL_LOG")
    if folder:
        with open(os.path.join(folder, f"{os.getpid()}.jsonl"), "a") as f:
            f.write(json.dumps({"event": event, **kw}) + "\n")


def allocate_shared_buffer_and_handle(size):
    shm = shared_memory.SharedMemory(create=True, size=size)  # zero-filled, as vLLM's cudaMemset leaves it
    ptr = next(_ids)
    _segments[ptr] = shm
    _owned.add(ptr)
    name = shm.name.encode()
    handle = torch.zeros(HANDLE_BYTES, dtype=torch.uint8)
    handle[:len(name)] = torch.tensor(list(name), dtype=torch.uint8)
    _log("allocate", ptr=ptr, name=shm.name, size=size)
    return ptr, handle


def open_mem_handle(mem_handle):
    name = bytes(mem_handle.tolist()).rstrip(b"\0").decode()
    # the ranks are spawned from one parent and share its resource tracker: the owner's unlink unregisters it
    shm = shared_memory.SharedMemory(name=name)
    ptr = next(_ids)
    _segments[ptr] = shm
    _log("open", ptr=ptr, name=name)
    return ptr


def free_shared_buffer(ptr):
    shm = _segments.pop(ptr)
    _owned.discard(ptr)
    name = shm.name
    shm.close()
    shm.unlink()
    _log("free", ptr=ptr, name=name)


def meta_size():
    return 64


def init_custom_ar(ipc_tensors, rank_data, rank, fully_connected):
    fa = next(_ids)
    _fas[fa] = {"meta": list(ipc_tensors), "rank": rank, "world": len(ipc_tensors), "count": 0, "buffers": None}
    _log("init", fa=fa, rank=rank, world=len(ipc_tensors))
    return fa


def register_buffer(fa, ipc_tensors):
    _fas[fa]["buffers"] = list(ipc_tensors)
    _log("register_buffer", fa=fa, n=len(ipc_tensors))


def _barrier(st):
    """Each rank raises its counter in its own signal buffer, then waits for every peer's (vLLM's start/end
    flags)."""
    st["count"] += 1
    struct.pack_into("q", _segments[st["meta"][st["rank"]]].buf, 0, st["count"])
    deadline = time.monotonic() + TIMEOUT_S
    for p in st["meta"]:
        while struct.unpack_from("q", _segments[p].buf, 0)[0] < st["count"]:
            if time.monotonic() > deadline:
                raise RuntimeError("custom all-reduce model: a peer never reached the barrier")
            time.sleep(0)


def all_reduce(fa, inp, out, reg_buffer, reg_buffer_sz_bytes):
    st = _fas[fa]
    nbytes = inp.numel() * inp.element_size()
    if reg_buffer == 0 or nbytes > reg_buffer_sz_bytes:
        raise RuntimeError("custom all-reduce model: only the eager path (input copied into the registered "
                           "buffer) is modelled")
    mine = st["buffers"][st["rank"]]
    if reg_buffer != mine:
        raise RuntimeError(f"custom all-reduce model: reg_buffer {reg_buffer} is not this rank's buffer {mine}")
    _segments[mine].buf[:nbytes] = inp.contiguous().view(torch.uint8).numpy().tobytes()
    _barrier(st)
    total = torch.zeros(inp.numel(), dtype=torch.float32)
    for p in st["buffers"]:
        total += torch.frombuffer(_segments[p].buf, dtype=inp.dtype, count=inp.numel()).float()
    out.copy_(total.to(inp.dtype).view(out.shape))
    _barrier(st)  # no rank overwrites its buffer before every peer has read it
    if os.environ.get("CUSTOM_AR_MODEL_WRONG_RANK") == str(st["rank"]):
        out.add_(1)


def dispose(fa):
    _fas.pop(fa)
    _log("dispose", fa=fa)


def _graphs_not_modelled(*args):
    raise NotImplementedError("custom all-reduce model: CUDA graphs are not modelled")


_lib = torch.library.Library("_C_custom_ar", "DEF")
_impls = {"init_custom_ar": init_custom_ar, "all_reduce": all_reduce, "dispose": dispose, "meta_size": meta_size,
          "register_buffer": register_buffer, "get_graph_buffer_ipc_meta": _graphs_not_modelled,
          "register_graph_buffers": _graphs_not_modelled,
          "allocate_shared_buffer_and_handle": allocate_shared_buffer_and_handle,
          "open_mem_handle": open_mem_handle, "free_shared_buffer": free_shared_buffer}
for _schema in SCHEMAS:
    _name = _schema.split("(")[0]
    _lib.define(_schema)
    _lib.impl(_name, _impls[_name], "CompositeExplicitAutograd")
