"""Runs INSIDE the env being verified: the checks that need several GPUs (issues 10, 20).

* p2p: for every ordered GPU pair, whether CUDA grants peer access, the link between them (``nvidia-smi topo
  -m``: NV# or a PCIe path) and the copy bandwidth each way.  No P2P where the topology shows NVLink is a
  failure; no P2P over PCIe is a pass with that reason (vLLM then leaves its custom all-reduce off).
* all-reduce (nccl): torch.distributed across every visible GPU, 8 KB to 1 GB, the sum checked, latency and
  the bus bandwidth NCCL's tests report (algbw * 2(n-1)/n), against the link's peak (NVLink: the per-link
  rates ``nvidia-smi nvlink -s`` reports, summed per GPU; else the PCIe generation and width).
* vllm custom all-reduce: vLLM's own kernel, found in the ``_C_custom_ar`` op namespace of the loaded
  extension (``--libs`` files, else the installed vllm package's ``_C*.so``, loaded without importing vllm),
  recognised by its generation (data/custom_ar_ops.toml: 0.5.5 to the newest release), set up as vLLM's
  CustomAllreduce does (shared IPC buffers, handles exchanged on a gloo group), run on fp16/bf16 tensors at
  the sizes vLLM sends it (8 KB up to its 8 MiB max_size, exclusive), compared with NCCL's result on the same
  input and timed against NCCL size by size: eager (input copied into the registered buffer, as
  CustomAllreduce.all_reduce(registered=False)) and in CUDA graphs (registered inputs and
  register_graph_buffers, as vLLM's decode graphs run it).  Torn down (dispose, IPC mappings closed, buffers
  freed) also when a comparison fails.

With ``--backend gloo`` the same code runs on CPU processes (how it is tested without GPUs): the all-reduce
sweep, and the custom all-reduce when an op library with CPU kernels is given (``--libs tests/
custom_ar_model.py``: a .py file is run, an op library written with torch.library).

Prints one JSON object on the last line: {"world": n, "backend": ..., "gpus": n, "checks": [...], ...}.
"""

import argparse
import ctypes
import glob
import importlib.util
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import time
import traceback
from dataclasses import dataclass

KIB, MIB, GIB = 1 << 10, 1 << 20, 1 << 30
NCCL_SIZES = [8 * KIB * 4 ** k for k in range(8)] + [512 * MIB, GIB]        # 8 KB, 32 KB ... 512 MB, 1 GB
CUSTOM_SIZES = [8 * KIB * 2 ** k for k in range(10)]                        # 8 KB ... 4 MB (< max_size)
GLOO_SIZES = [8 * KIB, 256 * KIB, 4 * MIB]
# NVLink bandwidth per link and direction, GB/s, by the GPU's compute capability major (NVIDIA's datasheets:
# P100 NVLink1 20, V100 NVLink2 25, A100 NVLink3 25 x 12, H100/H200 NVLink4 25 x 18, B200 NVLink5 50 x 18);
# used only when ``nvidia-smi nvlink -s`` gives no rate
NVLINK_GBPS_PER_LINK = {6: 20.0, 7: 25.0, 8: 25.0, 9: 25.0, 10: 50.0, 12: 50.0}
# PCIe usable bandwidth per lane and direction after line coding, GB/s, by generation
PCIE_GBPS_PER_LANE = {1: 0.25, 2: 0.5, 3: 0.985, 4: 1.969, 5: 3.938, 6: 7.563}
ANSI = re.compile(r"\x1b\[[0-9;]*m")


def parse_size(text):
    """'8K', '1M', '1G', '4096' -> bytes."""
    t = text.strip().upper().rstrip("B")
    mult = {"K": KIB, "M": MIB, "G": GIB}.get(t[-1:], 1)
    return int(float(t[:-1] if mult > 1 else t) * mult)


def fmt_bytes(n):
    for unit, m in (("GB", GIB), ("MB", MIB), ("KB", KIB)):
        if n >= m and n % m == 0:
            return f"{n // m} {unit}"
    return f"{n} B"


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ------------------------------------------------------------------------------------------ topology

def _run(argv, timeout=30):
    exe = shutil.which(argv[0])
    if not exe:
        return None
    try:
        r = subprocess.run([exe, *argv[1:]], capture_output=True, text=True, timeout=timeout,
                           stdin=subprocess.DEVNULL)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return r.stdout if r.returncode == 0 else None


def parse_topo(text):
    """``nvidia-smi topo -m`` -> {(i, j): 'NV18' | 'PIX' | 'PHB' | 'NODE' | 'SYS' | ...} over GPU indices."""
    lines = [ANSI.sub("", ln) for ln in (text or "").splitlines() if ln.strip()]
    if not lines:
        return {}
    header = lines[0].split()
    cols = []
    for h in header:
        if not re.fullmatch(r"(GPU|NIC)\d+", h):
            break
        cols.append(h)
    out = {}
    for ln in lines[1:]:
        parts = ln.split()
        m = re.fullmatch(r"GPU(\d+)", parts[0]) if parts else None
        if not m or len(parts) < len(cols) + 1:
            continue
        i = int(m.group(1))
        for k, c in enumerate(cols):
            v = parts[1 + k]
            if c.startswith("GPU") and v != "X":
                out[(i, int(c[3:]))] = v
    return out


def parse_nvlink_rates(text):
    """``nvidia-smi nvlink -s`` -> {gpu: [GB/s per active link]} (inactive links print '<inactive>')."""
    out, gpu = {}, None
    for ln in (text or "").splitlines():
        m = re.match(r"\s*GPU (\d+):", ln)
        if m:
            gpu = int(m.group(1))
            out.setdefault(gpu, [])
            continue
        m = re.match(r"\s*Link \d+: ([\d.]+) GB/s", ln)
        if m and gpu is not None:
            out[gpu].append(float(m.group(1)))
    return out


def physical_ids(n):
    """torch's device index -> nvidia-smi's index, through CUDA_VISIBLE_DEVICES when it lists numbers."""
    cvd = os.environ.get("CUDA_VISIBLE_DEVICES", "")
    ids = [x.strip() for x in cvd.split(",") if x.strip()]
    if ids and all(x.isdigit() for x in ids) and len(ids) >= n:
        return [int(x) for x in ids[:n]]
    return list(range(n))


def link_facts(torch, ngpu):
    """What the links between the GPUs are and their peak per GPU and direction (GB/s), with the source."""
    phys = physical_ids(ngpu)
    topo_raw = parse_topo(_run(["nvidia-smi", "topo", "-m"]))
    topo = {(a, b): topo_raw.get((phys[a], phys[b])) for a in range(ngpu) for b in range(ngpu) if a != b}
    rates = parse_nvlink_rates(_run(["nvidia-smi", "nvlink", "-s"]))
    facts = {"topology": {f"{a}-{b}": v for (a, b), v in topo.items() if v}, "source": None,
             "peak_gbps": None}
    nv = [rates.get(p) for p in phys]
    if ngpu and all(nv):
        per_gpu = [sum(r) for r in nv]
        facts.update(
            kind="nvlink",
            links=[len(r) for r in nv],
            gbps_per_link=nv[0][0],
            peak_gbps=min(per_gpu),
            source="nvidia-smi nvlink -s (per link and direction, summed per GPU)",
        )
        return facts, topo
    if ngpu and any(v and v.startswith("NV") for v in topo.values()):
        links = min(int(v[2:]) for v in topo.values() if v and v.startswith("NV") and v[2:].isdigit())
        major = torch.cuda.get_device_capability(0)[0]
        per = NVLINK_GBPS_PER_LINK.get(major)
        facts.update(
            kind="nvlink",
            links=[links] * ngpu,
            gbps_per_link=per,
            peak_gbps=links * per if per else None,
            source=f"nvidia-smi topo -m (NV{links}) x {per} GB/s per link for sm {major}x",
        )
        return facts, topo
    q = _run(
        [
            "nvidia-smi",
            "--query-gpu=index,pcie.link.gen.max,pcie.link.width.max",
            "--format=csv,noheader,nounits",
        ]
    )
    gens = {}
    for ln in (q or "").splitlines():
        f = [x.strip() for x in ln.split(",")]
        if len(f) == 3 and f[1].isdigit() and f[2].isdigit():
            gens[int(f[0])] = (int(f[1]), int(f[2]))
    pc = [gens.get(p) for p in phys]
    if ngpu and all(pc):
        peak = min(PCIE_GBPS_PER_LANE.get(g, 0) * w for g, w in pc)
        facts.update(
            kind="pcie",
            pcie=[f"gen{g} x{w}" for g, w in pc],
            peak_gbps=round(peak, 1) or None,
            source="nvidia-smi pcie.link.gen.max / width.max",
        )
    else:
        facts.update(kind="unknown", source="nvidia-smi gave no NVLink or PCIe facts")
    return facts, topo


def _link_kind(v):
    if not v:
        return "unknown"
    return "nvlink" if v.startswith("NV") else "pcie"


def p2p_check(torch, ngpu, topo, nbytes=256 * MIB, iters=10):
    """Peer access and copy bandwidth, each direction of every pair, judged against the topology."""
    pairs = {}
    for i in range(ngpu):
        for j in range(ngpu):
            if i == j:
                continue
            entry = {
                "access": bool(torch.cuda.can_device_access_peer(i, j)),
                "link": topo.get((i, j)) or "unknown",
            }
            try:
                src = torch.empty(nbytes, dtype=torch.uint8, device=f"cuda:{i}")
                dst = torch.empty(nbytes, dtype=torch.uint8, device=f"cuda:{j}")
                dst.copy_(src)
                torch.cuda.synchronize(i)
                torch.cuda.synchronize(j)
                t0 = time.perf_counter()
                for _ in range(iters):
                    dst.copy_(src, non_blocking=True)
                torch.cuda.synchronize(i)
                torch.cuda.synchronize(j)
                entry["gbps"] = round(nbytes / ((time.perf_counter() - t0) / iters) / 1e9, 1)
                del src, dst
            except Exception as e:  # reported in the pair's entry
                entry["error"] = f"{type(e).__name__}: {e}"[:200]
            pairs[f"{i}->{j}"] = entry
    torch.cuda.empty_cache()
    return judge_p2p(pairs, nbytes)


def judge_p2p(pairs, nbytes=0):
    """No peer access where the topology shows NVLink: fail; over PCIe: pass with the reason; with no topology
    to judge: skip."""
    bad, pcie_no_p2p, unknown = [], [], []
    for name, p in pairs.items():
        if not p["access"]:
            kind = _link_kind(None if p["link"] == "unknown" else p["link"])
            (bad if kind == "nvlink" else pcie_no_p2p if kind == "pcie" else unknown).append(
                f"{name} ({p['link']})"
            )
    metrics = {"pairs": pairs, "bytes": nbytes}
    if bad:
        return {
            "name": "p2p",
            "status": "fail",
            "metrics": metrics,
            "id": "p2p-unavailable",
            "reason": f"no peer access where the topology shows NVLink: {', '.join(bad)} (driver, IOMMU/ACS "
            "or VM settings block P2P; vLLM's custom all-reduce and NCCL's P2P path are off)",
        }
    if unknown:
        return {
            "name": "p2p",
            "status": "skip",
            "metrics": metrics,
            "reason": f"no peer access for {', '.join(unknown)} and no topology to judge it (nvidia-smi "
            "topo -m gave nothing)",
        }
    bw = [p["gbps"] for p in pairs.values() if p.get("gbps")]
    summary = f"min {min(bw):.0f} GB/s per direction" if bw else "bandwidth not measured"
    if pcie_no_p2p:
        return {
            "name": "p2p",
            "status": "pass",
            "metrics": metrics,
            "reason": f"PCIe without P2P for {', '.join(pcie_no_p2p)}: copies go through the host "
            f"({summary}); vLLM leaves its custom all-reduce off and uses NCCL",
        }
    return {
        "name": "p2p",
        "status": "pass",
        "metrics": metrics,
        "reason": f"peer access on all {len(pairs)} directions; copy {summary}",
    }


# ------------------------------------------------------------------------------------------ op discovery


def load_table(text=None):
    """The generations table: a JSON string from the host, else data/custom_ar_ops.toml read here."""
    if text:
        return json.loads(text)
    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "custom_ar_ops.toml")
    try:
        import tomllib
    except ImportError:
        try:
            import tomli as tomllib  # type: ignore[no-redef]
        except ImportError:
            return None
    with open(path, "rb") as f:
        return tomllib.load(f)


def registered_schemas(torch, namespace):
    """{op name: schema text} of every op registered under ``namespace`` in this process."""
    fn = getattr(torch._C, "_dispatch_get_all_op_names", None)
    names = set(fn()) if fn is not None else {str(s.name) for s in torch._C._jit_get_all_schemas()}
    out = {}
    for full in sorted(names):
        ns, _, name = full.partition("::")
        if ns != namespace or not name:
            continue
        name = name.split(".")[0]
        try:
            schema = str(getattr(getattr(torch.ops, namespace), name).default._schema)
        except Exception:  # an op without an overload still counts as present
            schema = name
        out[name] = schema.split("::", 1)[-1]
    return out


def first_arg_type(schema):
    m = re.match(r"[\w.]+\((.*)\)\s*->", schema or "")
    if not m or not m.group(1).strip():
        return None
    return m.group(1).split(",")[0].strip().rsplit(" ", 1)[0]


def discover(schemas, table):
    """The generation whose ops and init_custom_ar signature the registered ``schemas`` match, else None."""
    for gen in table.get("generation", []):
        if (
            all(op in schemas for op in gen["needs"])
            and first_arg_type(schemas.get("init_custom_ar")) == gen["init_first_arg"]
        ):
            return gen
    return None


def installed_vllm_libs():
    """The installed vllm package's top-level _C libraries, found without importing vllm."""
    try:
        spec = importlib.util.find_spec("vllm")
    except (ImportError, ValueError):
        return []
    if not spec or not spec.submodule_search_locations:
        return []
    out = []
    for d in spec.submodule_search_locations:
        out += sorted(
            glob.glob(os.path.join(d, "_C.*so")) + glob.glob(os.path.join(d, "_C_stable_libtorch*.so"))
        )
    return out


_PY_OP_LIBS = []  # the globals of .py op libraries: their torch.library.Library objects must stay alive


def load_libs(torch, libs):
    """torch.ops.load_library each file (a .py file is run: an op library written with torch.library, such as
    the tests' CPU model of the custom all-reduce); {path: None | error text}."""
    out = {}
    for p in libs:
        try:
            if p.endswith(".py"):
                import runpy

                _PY_OP_LIBS.append(runpy.run_path(p, run_name="verify_dist_op_library"))
            else:
                torch.ops.load_library(p)
            out[p] = None
        except Exception as e:  # reported by the caller
            out[p] = f"{type(e).__name__}: {e}".splitlines()[0][:300]
    return out


# ------------------------------------------------------------------------------------------ vLLM's custom AR


class IpcHandle(ctypes.Structure):
    _fields_ = [
        ("reserved", ctypes.c_ubyte * 64)
    ]  # cudaIpcMemHandle_t (CUDA_IPC_HANDLE_SIZE), passed by value


class CudaRT:
    """The few CUDA runtime calls vLLM 0.6.4-0.8.2 made through ctypes (cuda_wrapper.CudaRTLibrary), on the
    libcudart this process already loaded (torch's)."""

    def __init__(self):
        path = None
        with open("/proc/self/maps") as f:
            for ln in f:
                if "libcudart" in ln and ln.split()[-1].startswith("/"):
                    path = ln.split()[-1]
                    break
        self.lib = ctypes.CDLL(path or "libcudart.so")
        for name, args in (
            ("cudaMalloc", [ctypes.POINTER(ctypes.c_void_p), ctypes.c_size_t]),
            ("cudaFree", [ctypes.c_void_p]),
            ("cudaMemset", [ctypes.c_void_p, ctypes.c_int, ctypes.c_size_t]),
            ("cudaIpcGetMemHandle", [ctypes.POINTER(IpcHandle), ctypes.c_void_p]),
            ("cudaIpcOpenMemHandle", [ctypes.POINTER(ctypes.c_void_p), IpcHandle, ctypes.c_uint]),
            ("cudaIpcCloseMemHandle", [ctypes.c_void_p]),
            ("cudaDeviceSynchronize", []),
        ):
            fn = getattr(self.lib, name)
            fn.argtypes, fn.restype = args, ctypes.c_int
        self.lib.cudaGetErrorString.argtypes, self.lib.cudaGetErrorString.restype = (
            [ctypes.c_int],
            ctypes.c_char_p,
        )

    def _ok(self, rc, what):
        if rc != 0:
            raise RuntimeError(f"{what}: {self.lib.cudaGetErrorString(rc).decode()} ({rc})")

    def malloc(self, size):
        p = ctypes.c_void_p()
        self._ok(self.lib.cudaMalloc(ctypes.byref(p), size), "cudaMalloc")
        self._ok(self.lib.cudaMemset(p, 0, size), "cudaMemset")
        self._ok(self.lib.cudaDeviceSynchronize(), "cudaDeviceSynchronize")
        return p.value

    def ipc_handle(self, ptr):
        h = IpcHandle()
        self._ok(self.lib.cudaIpcGetMemHandle(ctypes.byref(h), ctypes.c_void_p(ptr)), "cudaIpcGetMemHandle")
        return bytes(h)

    def ipc_open(self, handle):
        p = ctypes.c_void_p()
        h = IpcHandle.from_buffer_copy(handle)
        self._ok(
            self.lib.cudaIpcOpenMemHandle(ctypes.byref(p), h, 1), "cudaIpcOpenMemHandle"
        )  # LazyEnablePeer
        return p.value

    def ipc_close(self, ptr):
        self._ok(self.lib.cudaIpcCloseMemHandle(ctypes.c_void_p(ptr)), "cudaIpcCloseMemHandle")

    def free(self, ptr):
        self._ok(self.lib.cudaFree(ctypes.c_void_p(ptr)), "cudaFree")


@dataclass(frozen=True)
class Rank:
    """This process's place in the run: torch and torch.distributed, its ``rank`` of ``world``, its
    ``device`` (``cuda``: a GPU), and ``gloo``: the CPU group the ranks agree on (vLLM's CustomAllreduce
    exchanges its handles there, never on NCCL)."""

    torch: object
    dist: object
    rank: int
    world: int
    device: object
    cuda: bool
    gloo: object

    def all_ok(self, ok):
        return _all_ok(self.torch, self.dist, self.gloo, ok)


class CustomAR:
    """vLLM's CustomAllreduce set-up and teardown for one generation of its ops, on one rank (its group:
    ``g.gloo``)."""

    def __init__(self, g, gen, max_size, fully_connected, namespace="_C_custom_ar"):
        torch = g.torch
        self.torch, self.dist, self.gen, self.group = torch, g.dist, gen["name"], g.gloo
        self.ops = getattr(torch.ops, namespace)
        self.rank, self.world, self.device, self.max_size = g.rank, g.world, g.device, max_size
        self.fully_connected = fully_connected
        self.fa = 0
        self.own, self.peers = [], []
        self.meta = self.buffer = self.rank_data = None
        self._rt = None

    @property
    def rt(self):
        if self._rt is None:
            self._rt = CudaRT()
        return self._rt

    def _gather(self, obj):
        out = [None] * self.world
        self.dist.all_gather_object(out, obj, group=self.group)
        return out

    def _shared(self, size):
        """A buffer of ``size`` bytes on every rank: the list of their pointers as this rank sees them."""
        if self.gen == "ipc-in-extension":
            ptr, handle = self.ops.allocate_shared_buffer_and_handle(size)
        else:
            ptr = self.rt.malloc(size)
            handle = self.rt.ipc_handle(ptr)
        self.own.append(ptr)
        ptrs = []
        for i, h in enumerate(self._gather(handle)):
            if i == self.rank:
                ptrs.append(ptr)
            else:
                p = self.ops.open_mem_handle(h) if self.gen == "ipc-in-extension" else self.rt.ipc_open(h)
                self.peers.append(p)
                ptrs.append(p)
        return ptrs

    def _tensor_ipc(self, t):
        data = t.untyped_storage()._share_cuda_()
        got = self._gather((data[1], data[3]))
        return [h for h, _ in got], [o for _, o in got]

    def setup(self):
        torch, ops = self.torch, self.ops
        self.rank_data = torch.empty(8 * MIB, dtype=torch.uint8, device=self.device)
        if self.gen == "tensor-ipc":
            self.meta = torch.zeros(ops.meta_size() + self.max_size, dtype=torch.uint8, device=self.device)
            self.buffer = torch.empty(self.max_size, dtype=torch.uint8, device=self.device)
            if self.device.type == "cuda":
                torch.cuda.synchronize()
            handles, offsets = self._tensor_ipc(self.meta)
            self.fa = ops.init_custom_ar(
                self.meta, self.rank_data, handles, offsets, self.rank, self.fully_connected
            )
            handles, offsets = self._tensor_ipc(self.buffer)
            ops.register_buffer(self.fa, self.buffer, handles, offsets)
            return
        meta = self._shared(ops.meta_size() + self.max_size)
        self.buffer_ptrs = self._shared(self.max_size)
        self.fa = ops.init_custom_ar(meta, self.rank_data, self.rank, self.fully_connected)
        ops.register_buffer(self.fa, self.buffer_ptrs)

    def all_reduce(self, inp, out):
        """vLLM's eager path (CustomAllreduce.all_reduce(registered=False)): the input is copied into the
        registered buffer, then reduced out of place."""
        if self.gen == "tensor-ipc":
            self.ops.all_reduce_unreg(self.fa, inp, self.buffer, out)
        else:
            self.ops.all_reduce(self.fa, inp, out, self.buffer_ptrs[self.rank], self.max_size)

    def all_reduce_registered(self, inp, out):
        """vLLM's path inside a CUDA graph (registered=True): the input's own address, registered after the
        capture (register_graph_buffers)."""
        if self.gen == "tensor-ipc":
            self.ops.all_reduce_reg(self.fa, inp, out)
        else:
            self.ops.all_reduce(self.fa, inp, out, 0, 0)

    def register_graph_buffers(self):
        """CustomAllreduce.register_graph_buffers: every rank's captured input addresses, exchanged on the
        gloo
        group, opened by the extension."""
        handle, offsets = self.ops.get_graph_buffer_ipc_meta(self.fa)
        if self.gen == "tensor-ipc":
            handle = bytes(handle.tolist())
        got = self._gather([handle, offsets])
        self.ops.register_graph_buffers(self.fa, [h for h, _ in got], [o for _, o in got])

    def close(self):
        """dispose, close the peers' mappings, free this rank's buffers: (what was done, errors); never
        raises."""
        errors, done = [], []
        cuda = self.device.type == "cuda"
        try:
            if cuda:
                self.torch.cuda.synchronize()
        except Exception as e:
            errors.append(f"synchronize: {e}")
        if self.fa:
            try:
                self.ops.dispose(self.fa)
                done.append("dispose")
            except Exception as e:
                errors.append(f"dispose: {e}")
            self.fa = 0
        if self.peers and cuda:
            closed = 0
            for p in self.peers:
                try:
                    self.rt.ipc_close(p)
                    closed += 1
                except Exception as e:
                    errors.append(str(e))
            done.append(f"{closed} peer mappings closed")
        self.peers = []
        try:  # every rank has closed its mappings of this rank's buffers before they are freed
            self.dist.barrier(group=self.group)
        except Exception as e:
            errors.append(f"barrier: {e}")
        freed = 0
        for p in self.own:
            try:
                if self.gen == "ipc-in-extension":
                    self.ops.free_shared_buffer(p)
                else:
                    self.rt.free(p)
                freed += 1
            except Exception as e:
                errors.append(f"free: {e}")
        if self.own:
            done.append(f"{freed} buffers freed")
        self.own = []
        if self.meta is not None:
            done.append("meta and buffer tensors released")
        self.meta = self.buffer = self.rank_data = None
        if cuda:
            self.torch.cuda.empty_cache()
        return done, errors


# ------------------------------------------------------------------------------------------ workers


def _tolerance(torch, dtype, world, scale):
    return float(torch.finfo(dtype).eps) * max(scale, 1.0) * max(world - 1, 1)


def _all_ok(torch, dist, group, ok):
    """Every rank's ``ok``, ANDed (on the gloo group): no rank starts a custom kernel that waits on a peer
    that will not come."""
    t = torch.tensor([1 if ok else 0], dtype=torch.int32)
    dist.all_reduce(t, op=dist.ReduceOp.MIN, group=group)
    return bool(t.item())


def _timed(g, fn, iters, warmup=3):
    """Microseconds per call: CUDA events around ``iters`` back-to-back calls (wall clock on CPU), the
    slowest rank's figure (agreed on ``g.gloo``)."""
    torch, dist, group, cuda = g.torch, g.dist, g.gloo, g.cuda
    for _ in range(warmup):
        fn()
    if cuda:
        torch.cuda.synchronize()
    dist.barrier(group=group)
    if cuda:
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        s.record()
        for _ in range(iters):
            fn()
        e.record()
        e.synchronize()
        us = s.elapsed_time(e) * 1000 / iters
    else:
        t0 = time.perf_counter()
        for _ in range(iters):
            fn()
        us = (time.perf_counter() - t0) * 1e6 / iters
    t = torch.tensor([us], dtype=torch.float64)
    dist.all_reduce(t, op=dist.ReduceOp.MAX, group=group)
    return float(t.item())


def _sig(x, digits=4):
    return float(f"{x:.{digits}g}")


def _iters_for(nbytes, cap=200):
    return max(10, min(cap, int(4 * GIB / max(nbytes, 1))))


def sweep(g, sizes):
    """all_reduce over the default group: the sum checked at each size, latency and bus bandwidth."""
    torch, dist, rank, world, device, cuda = g.torch, g.dist, g.rank, g.world, g.device, g.cuda
    out = []
    for nbytes in sizes:
        n = max(1, nbytes // 4)
        x = torch.full((n,), float(rank + 1), device=device, dtype=torch.float32)
        dist.all_reduce(x)
        ok = bool(torch.all(x == world * (world + 1) / 2).item())
        del x
        scratch = torch.zeros(n, device=device, dtype=torch.float32)
        us = _timed(g, lambda s=scratch: dist.all_reduce(s), _iters_for(n * 4))
        del scratch
        algbw = n * 4 / (us * 1e-6) / 1e9
        out.append(
            {
                "bytes": n * 4,
                "elements": n,
                "ok": ok,
                "us": round(us, 2),
                "algbw_gbps": _sig(algbw),
                "bus_gbps": _sig(algbw * 2 * (world - 1) / world),
            }
        )
    if cuda:
        torch.cuda.empty_cache()
    return out


GRAPH_CALLS = 20  # all-reduces captured in one CUDA graph
GRAPH_REPLAYS = 20


def _graph_pair(g, ar, inp, out, scratch):
    """CUDA graphs of GRAPH_CALLS custom all-reduces (registered input, as vLLM's decode graphs run them) and
    of
    as many NCCL all-reduces; (custom graph, NCCL graph) or the reason they could not be captured on a
    rank."""
    torch, dist = g.torch, g.dist
    graphs, err = None, None
    try:
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):  # warm-up outside the capture, as torch.cuda.graphs asks
            dist.all_reduce(scratch)
        torch.cuda.current_stream().wait_stream(side)
        torch.cuda.synchronize()
        gc, gn = torch.cuda.CUDAGraph(), torch.cuda.CUDAGraph()
        # thread_local: ProcessGroupNCCL's watchdog thread queries CUDA events while this thread captures
        with torch.cuda.graph(gc, capture_error_mode="thread_local"):
            for _ in range(GRAPH_CALLS):
                ar.all_reduce_registered(inp, out)
        with torch.cuda.graph(gn, capture_error_mode="thread_local"):
            for _ in range(GRAPH_CALLS):
                dist.all_reduce(scratch)
        graphs = (gc, gn)
    except Exception as e:  # reported in the row; no graph is replayed unless every rank has them
        err = f"{type(e).__name__}: {e}".splitlines()[0][:300]
    if not g.all_ok(graphs is not None):
        return None, err or "capture failed on another rank"
    ar.register_graph_buffers()
    return graphs, None


def custom_run(g, cfg):  # one sequence, as vLLM runs it
    """vLLM's custom all-reduce against NCCL on the same fp16/bf16 inputs, size by size: eager (the input
    copied into the registered buffer, one Python call each) and in CUDA graphs (registered inputs, launch
    cost out of the figure)."""
    torch, dist, rank, world, device = g.torch, g.dist, g.rank, g.world, g.device
    table = cfg["table"]
    res = {"libs": load_libs(torch, cfg["libs"])}
    schemas = registered_schemas(torch, table["namespace"])
    gen = discover(schemas, table)
    found = g.all_ok(gen is not None)
    if not found:
        res["skip"] = "the custom all-reduce ops are not registered in every rank"
        return res
    ar = CustomAR(g, gen, table["max_size"], cfg["fully_connected"], table["namespace"])
    rows, errors = [], []
    graph_error = None
    try:
        try:
            ar.setup()
            ok = True
        except Exception as e:  # every rank learns of it before any kernel
            errors.append(f"set-up on rank {rank}: {type(e).__name__}: {e}"[:400])
            ok = False
        if not g.all_ok(ok):
            res["error"] = errors[0] if errors else "set-up failed on another rank"
            return res
        cuda = device.type == "cuda"

        def sync():
            if cuda:
                torch.cuda.synchronize()

        gen_ = torch.Generator(device=device)
        for dtype in (torch.float16, torch.bfloat16):
            for nbytes in cfg["sizes"]:
                n = nbytes // 2
                gen_.manual_seed(1000 * rank + n)
                inp = torch.randn(n, dtype=dtype, device=device, generator=gen_)
                out = torch.empty_like(inp)
                ref = inp.clone()
                dist.all_reduce(ref)
                ar.all_reduce(inp, out)
                sync()
                err = float((out.float() - ref.float()).abs().max().item())
                tol = _tolerance(torch, dtype, world, float(ref.float().abs().max().item()))
                row = {
                    "dtype": str(dtype).replace("torch.", ""),
                    "bytes": nbytes,
                    "max_abs_err": err,
                    "exact": bool(torch.equal(out, ref)),
                    "ok": err <= tol,
                    "tolerance": tol,
                }
                # every rank's verdict: a wrong result on any rank fails the row
                row["ok"] = g.all_ok(row["ok"])
                iters = _iters_for(nbytes, cap=500)
                row["custom_us"] = round(
                    _timed(g, lambda i=inp, o=out: ar.all_reduce(i, o), iters), 2
                )
                scratch = torch.zeros_like(inp)
                row["nccl_us"] = round(
                    _timed(g, lambda s=scratch: dist.all_reduce(s), iters), 2
                )
                row["speedup"] = round(row["nccl_us"] / row["custom_us"], 3) if row["custom_us"] else None
                if cuda and cfg.get("graphs", True) and graph_error is None:
                    graphs, graph_error = _graph_pair(g, ar, inp, out, scratch)
                    if graphs:
                        gc, gn = graphs
                        calls = GRAPH_CALLS * GRAPH_REPLAYS
                        row["graph_custom_us"] = round(
                            _timed(g, gc.replay, GRAPH_REPLAYS, warmup=2) / GRAPH_CALLS,
                            2,
                        )
                        # the graph's output, replayed: still NCCL's sum of the same input
                        row["graph_ok"] = g.all_ok(
                            bool(torch.equal(out, ref))
                            or float((out.float() - ref.float()).abs().max().item()) <= tol,
                        )
                        row["graph_nccl_us"] = round(
                            _timed(g, gn.replay, GRAPH_REPLAYS, warmup=2) / GRAPH_CALLS,
                            2,
                        )
                        row["graph_speedup"] = (
                            round(row["graph_nccl_us"] / row["graph_custom_us"], 3)
                            if row["graph_custom_us"]
                            else None
                        )
                        row["graph_calls"] = calls
                        del gc, gn, graphs
                        sync()
                rows.append(row)
                del inp, out, ref, scratch
    finally:
        res["teardown"], res["teardown_errors"] = ar.close()
        res["rows"] = rows
        res["generation"] = gen["name"]
        res["ops"] = sorted(schemas)
        res["graph_error"] = graph_error
    return res


def _worker(rank, world, cfg, queue):
    out = {"rank": rank}
    try:
        import torch
        import torch.distributed as dist

        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(cfg["port"]))
        cuda = cfg["backend"] == "nccl"
        if cuda:
            torch.cuda.set_device(rank)
            device = torch.device("cuda", rank)
            dist.init_process_group("nccl", rank=rank, world_size=world, device_id=device)
        else:
            device = torch.device("cpu")
            dist.init_process_group("gloo", rank=rank, world_size=world)
        # vLLM's CustomAllreduce exchanges its handles on a CPU (gloo) group, never NCCL
        gloo = dist.new_group(backend="gloo") if cuda else dist.group.WORLD
        g = Rank(torch, dist, rank, world, device, cuda, gloo)
        try:
            if "sweep" in cfg["tasks"]:
                t0 = time.perf_counter()
                out["sweep"] = sweep(g, cfg["sizes"])
                out["sweep_seconds"] = round(time.perf_counter() - t0, 3)
            if "custom" in cfg["tasks"]:
                t0 = time.perf_counter()
                out["custom"] = custom_run(g, cfg["custom"])
                out["custom_seconds"] = round(time.perf_counter() - t0, 3)
        finally:
            dist.destroy_process_group()
    except BaseException as e:  # reported to the parent
        out["error"] = f"{type(e).__name__}: {e}"[:600]
        out["traceback"] = traceback.format_exc()[-2000:]
    queue.put(out)


def run_workers(world, cfg, timeout=540):
    """One process per rank (spawned); every rank's result, or an error naming the ranks that did not end."""
    import torch.multiprocessing as mp

    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    cfg = dict(cfg, port=_free_port())
    procs = [ctx.Process(target=_worker, args=(r, world, cfg, queue)) for r in range(world)]
    for p in procs:
        p.start()
    results, deadline = {}, time.monotonic() + timeout
    try:
        while len(results) < world and time.monotonic() < deadline:
            try:
                r = queue.get(timeout=1)
                results[r["rank"]] = r
            except Exception:  # queue.Empty: poll the processes
                if all(not p.is_alive() for p in procs) and queue.empty():
                    break
    finally:
        for p in procs:
            p.join(timeout=30)
            if p.is_alive():
                p.terminate()
                p.join(timeout=10)
            if p.is_alive():
                p.kill()
    missing = [r for r in range(world) if r not in results]
    if missing:
        codes = {r: procs[r].exitcode for r in missing}
        raise RuntimeError(f"rank(s) {missing} gave no result in {timeout}s (exit codes {codes})")
    return [results[r] for r in range(world)]


# ------------------------------------------------------------------------------------------ checks


def sweep_check(backend, world, results, link):
    name = f"all-reduce ({backend}, {world} ranks)"
    errs = [r for r in results if r.get("error")]
    if errs:
        return {
            "name": name,
            "status": "fail",
            "reason": f"rank {errs[0]['rank']}: {errs[0]['error']}",
            "metrics": {"traceback": errs[0].get("traceback", "")},
        }
    rows = results[0].get("sweep") or []
    wrong = [r for res in results for r in res.get("sweep", []) if not r["ok"]]
    best = max(rows, key=lambda r: r["bus_gbps"])
    m = {
        "sizes": rows,
        "best_bus_gbps": best["bus_gbps"],
        "best_at_bytes": best["bytes"],
        "seconds": results[0].get("sweep_seconds"),
    }
    if link and link.get("peak_gbps"):
        m.update(
            peak_gbps=link["peak_gbps"],
            peak_source=link["source"],
            fraction_of_peak=round(best["bus_gbps"] / link["peak_gbps"], 3),
        )
    if wrong:
        return {
            "name": name,
            "status": "fail",
            "metrics": m,
            "id": "all-reduce-wrong",
            "reason": f"wrong sum at {fmt_bytes(wrong[0]['bytes'])}",
        }
    peak = (
        f" = {m['fraction_of_peak']:.0%} of the link's {link['peak_gbps']:.0f} GB/s"
        if "fraction_of_peak" in m
        else ""
    )
    return {
        "name": name,
        "status": "pass",
        "metrics": m,
        "reason": f"sums right at {len(rows)} sizes ({fmt_bytes(rows[0]['bytes'])} - "
                  f"{fmt_bytes(rows[-1]['bytes'])}); "
        f"bus bandwidth {best['bus_gbps']:.3g} GB/s at {fmt_bytes(best['bytes'])}{peak}",
    }


def _median(xs):
    xs = sorted(xs)
    return xs[len(xs) // 2] if xs else None


def custom_check(results, gen, lib_status, table, backend="nccl"):
    name = "vllm custom all-reduce"
    base = {
        "generation": gen["name"],
        "releases": gen["releases"],
        "namespace": table["namespace"],
        "libraries": lib_status,
    }
    errs = [r for r in results if r.get("error")]
    if errs:
        return {
            "name": name,
            "status": "fail",
            "reason": f"rank {errs[0]['rank']}: {errs[0]['error']}",
            "metrics": {**base, "traceback": errs[0].get("traceback", "")},
        }
    cs = [r.get("custom") or {} for r in results]
    c0 = cs[0]
    if c0.get("skip"):
        return {"name": name, "status": "skip", "reason": c0["skip"], "metrics": base}
    teardown = [f"rank {r}: {e}" for r, c in enumerate(cs) for e in c.get("teardown_errors", [])]
    rows = c0.get("rows", [])
    m = {
        **base,
        "sizes": rows,
        "teardown": {f"rank {r}": ", ".join(c.get("teardown", [])) for r, c in enumerate(cs)},
        "teardown_errors": teardown,
        "max_size": table["max_size"],
        "seconds": results[0].get("custom_seconds"),
        "graph_error": c0.get("graph_error"),
    }
    setup_err = next((c["error"] for c in cs if c.get("error")), None)
    if setup_err:
        return {"name": name, "status": "fail", "reason": setup_err, "metrics": m}
    wrong = [r for r in rows if not r["ok"] or r.get("graph_ok") is False]
    if wrong:
        w = wrong[0]
        where = (
            "in a CUDA graph (registered input)"
            if w["ok"]
            else f"max abs err {w['max_abs_err']:.3g} > {w['tolerance']:.3g}"
        )
        return {
            "name": name,
            "status": "fail",
            "id": "custom-all-reduce-wrong",
            "metrics": m,
            "reason": f"differs from {backend}'s sum: {w['dtype']} {fmt_bytes(w['bytes'])}: {where}",
        }
    if teardown:
        return {"name": name, "status": "fail", "metrics": m, "reason": f"teardown: {teardown[0]}"}
    if not rows:
        return {"name": name, "status": "fail", "metrics": m, "reason": "no size was run"}

    def summary(key, label):
        sp = [r[key] for r in rows if r.get(key)]
        if not sp:
            return None
        wins = sum(x > 1 for x in sp)
        return (
            f"{label}: faster than {backend} at {wins} of {len(sp)} points (median {_median(sp):.2f}x, "
            f"{min(sp):.2f}x-{max(sp):.2f}x)"
        )

    parts = [p for p in (summary("graph_speedup", "in CUDA graphs"), summary("speedup", "eager")) if p]
    if m["graph_error"]:
        parts.append(f"CUDA graphs not timed: {m['graph_error']}")
    m["faster_than_nccl_at"] = [
        [r["dtype"], r["bytes"]] for r in rows if (r.get("graph_speedup") or r.get("speedup") or 0) > 1
    ]
    return {
        "name": name,
        "status": "pass",
        "metrics": m,
        "reason": f"{gen['name']} ops ({gen['releases']}); same sum as {backend} in fp16/bf16 at "
        f"{len({r['bytes'] for r in rows})} sizes ({fmt_bytes(rows[0]['bytes'])} - "
        f"{fmt_bytes(rows[-1]['bytes'])}); " + "; ".join(parts),
    }


def _no_custom_ops(table, gen, schemas, lib_status, world):
    """Why vLLM's custom all-reduce cannot be run (no op table, no known generation of its ops, a world size
    vLLM does not run it on), or None."""
    if not table:
        return "no op table: pass --custom-ar-table (tomllib/tomli not importable here)"
    if gen is None:
        if schemas:
            return f"{table['namespace']} has ops {sorted(schemas)} matching no known generation"
        loaded = [p for p, e in lib_status.items() if e is None]
        failed = [f"{os.path.basename(p)}: {e}" for p, e in lib_status.items() if e]
        return (
            f"op not registered: none of the {len(loaded)} loaded libraries registers "
            f"{table['namespace']}::init_custom_ar in a known generation"
            if loaded
            else f"vLLM's library did not load ({'; '.join(failed)[:300]})"
            if failed
            else "no vLLM extension loaded: pass --libs (vllm/_C.abi3.so) or install vllm"
        )
    if world < 2:
        return f"{gen['name']} ops found; {world} GPU: needs 2 or more"
    if world not in table["world_sizes"]:
        return f"world size {world}: vLLM runs its custom all-reduce only on {table['world_sizes']} GPUs"
    return None


def _custom_off_by_links(checks, world, fully):
    """Why vLLM would leave its custom all-reduce off on these GPUs' links (NCCL is used), or None."""
    p2p = next((c for c in checks if c["name"] == "p2p"), {})
    if not all(p["access"] for p in p2p.get("metrics", {}).get("pairs", {}).values()):
        return "no P2P between some GPUs: vLLM leaves its custom all-reduce off (NCCL is used)"
    if world > 2 and not fully:
        return "more than two GPUs not all on NVLink: vLLM leaves its custom all-reduce off"
    return None


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--backend", choices=["nccl", "gloo"], default="nccl")
    ap.add_argument("--world", type=int, default=0, help="processes (default: the GPUs visible; gloo: 2)")
    ap.add_argument(
        "--sizes",
        default="",
        help="all-reduce sizes in bytes (8K, 1M, 1G; default 8 KB - 1 GB on GPUs, 8 KB - 4 MB on gloo)",
    )
    ap.add_argument(
        "--custom-sizes", dest="custom_sizes", default="", help="custom all-reduce sizes in bytes"
    )
    ap.add_argument(
        "--libs",
        default="",
        help="vLLM extension libraries to load (comma-separated); default: "
        "the installed vllm package's _C libraries",
    )
    ap.add_argument(
        "--custom-ar-table",
        dest="table",
        default="",
        help="data/custom_ar_ops.toml as JSON (the host passes it; else read here with tomllib)",
    )
    ap.add_argument("--p2p-bytes", dest="p2p_bytes", default="256M", help="bytes per P2P copy (bandwidth)")
    a = ap.parse_args()
    import torch

    t_start = time.perf_counter()
    checks = []
    ngpu = torch.cuda.device_count() if torch.cuda.is_available() else 0
    world = a.world or (ngpu if a.backend == "nccl" else 2)
    out = {"world": world, "backend": a.backend, "gpus": ngpu, "checks": checks}
    table = load_table(a.table)
    libs = [p for p in a.libs.split(",") if p] or installed_vllm_libs()
    lib_status = load_libs(torch, libs)
    out["libraries"] = lib_status
    schemas = registered_schemas(torch, table["namespace"]) if table else {}
    gen = discover(schemas, table) if table else None
    out["custom_ar_ops"] = schemas
    link, topo = (None, {})
    if a.backend == "nccl":
        link, topo = link_facts(torch, ngpu)
        out["link"] = link
        if ngpu < 2:
            checks.append(
                {
                    "name": "p2p",
                    "status": "skip",
                    "reason": f"{ngpu} GPU(s) visible: needs 2 or more",
                    "metrics": {},
                }
            )
        else:
            checks.append(p2p_check(torch, ngpu, topo, nbytes=parse_size(a.p2p_bytes)))
    sizes = [parse_size(s) for s in a.sizes.split(",") if s] or (
        NCCL_SIZES if a.backend == "nccl" else GLOO_SIZES
    )
    custom_sizes = [parse_size(s) for s in a.custom_sizes.split(",") if s] or CUSTOM_SIZES
    custom_reason = _no_custom_ops(table, gen, schemas, lib_status, world)
    fully = bool(topo) and all(_link_kind(v) == "nvlink" for v in topo.values())
    if custom_reason is None and a.backend == "nccl":
        custom_reason = _custom_off_by_links(checks, world, fully)
    tasks = ["sweep"] if world >= 2 else []
    if custom_reason is None:
        tasks.append("custom")
    results = []
    if tasks:
        cfg = {
            "backend": a.backend,
            "tasks": tasks,
            "sizes": sizes,
            "custom": {
                "table": table,
                "libs": [p for p, e in lib_status.items() if e is None],
                "sizes": custom_sizes,
                "fully_connected": fully,
            },
        }
        try:
            results = run_workers(world, cfg)
        except Exception as e:  # reported as failed checks
            results = [{"rank": -1, "error": f"{type(e).__name__}: {e}"[:600]}]
    if world < 2:
        checks.append(
            {
                "name": f"all-reduce ({a.backend})",
                "status": "skip",
                "reason": f"{world} worker(s): needs 2 or more GPUs",
                "metrics": {},
            }
        )
    else:
        checks.append(sweep_check(a.backend, world, results, link))
    if custom_reason is not None:
        checks.append(
            {
                "name": "vllm custom all-reduce",
                "status": "skip",
                "reason": custom_reason,
                "metrics": {
                    "generation": gen["name"] if gen else None,
                    "ops": sorted(schemas),
                    "libraries": lib_status,
                },
            }
        )
    else:
        checks.append(custom_check(results, gen, lib_status, table, a.backend))
    out["seconds"] = round(time.perf_counter() - t_start, 3)
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
