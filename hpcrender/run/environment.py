"""Where this process runs (launcher, MPI world, node, device, threads) and torch.distributed started from MPI.

The one place SLURM_* variables are read and mpi4py is imported; everything else asks an Environment.
"""

from __future__ import annotations

import enum
import ipaddress
import logging
import os
import re
import socket
import sys
import time
import traceback
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, Callable, NoReturn

from hpcrender.errors import EXIT_INTERRUPTED, EXIT_JOB_FAILED, BadInput, DoesNotFit, HpcrenderError

ABORT_GRACE_S = 0.5  # for stderr to reach the launcher before MPI_Abort
# Ranks meeting at start-up wait this long for each other (a slow node, a busy file system).
RENDEZVOUS_TIMEOUT_S = 600.0
# A client connects after rank 0 opened the store and said where: only an unreachable address takes longer.
CONNECT_TIMEOUT_S = 30.0
# A collective waiting for a rank that died ends the run after this (unless Slurm ends it first). Longer than any
# denoising step or model load seen so far, shorter than the rendezvous: a dead node should not cost 10 minutes.
DEFAULT_COLLECTIVE_TIMEOUT_S = 180.0
COLLECTIVE_TIMEOUT_VAR = "HPCRENDER_COLLECTIVE_TIMEOUT"
MAX_MEMORY_VAR = "HPCRENDER_MAX_MEMORY"
_BINARY_UNITS = {"": 1, "k": 2**10, "m": 2**20, "g": 2**30, "t": 2**40}

log = logging.getLogger("hpcrender")


class Launcher(str, enum.Enum):
    NONE = "none"        # a plain process
    MPIEXEC = "mpiexec"  # mpiexec/mpirun (also when it runs inside a Slurm allocation)
    SRUN = "srun"        # srun starting the ranks itself through PMI


@dataclass(frozen=True)
class SlurmInfo:
    job_id: str
    procid: int | None
    ntasks: int | None          # tasks of this step (of the job in a batch script)
    localid: int | None
    nodeid: int | None
    nodelist: str | None        # the step's nodes when in a step, else the job's
    cpus_per_task: int | None
    restart_count: int
    array_task_id: int | None
    array_task_min: int | None
    array_task_max: int | None
    array_task_step: int | None
    array_task_count: int | None
    step_id: int | None = None  # None in a batch script: only srun steps have one


@dataclass(frozen=True)
class Environment:
    launcher: Launcher
    world_size: int
    rank: int
    local_rank: int
    local_size: int
    node: str                   # hostname
    node_index: int
    device: str                 # "cpu" or "cuda:N"
    slurm: SlurmInfo | None
    threads: int                # torch intra-op threads of this rank
    collective_timeout_s: float = DEFAULT_COLLECTIVE_TIMEOUT_S


class Backend(str, enum.Enum):
    GLOO = "gloo"
    NCCL = "nccl"


def torch_backend(device: str) -> Backend:
    """NCCL alone on GPUs: every tensor a group exchanges lives on its device and small agreements go over MPI, so a
    gloo mesh beside it would be unused, and it binds the hostname's address (127.0.1.1 on many hosts)."""
    return Backend.NCCL if device.split(":")[0] == "cuda" else Backend.GLOO


def collective_timeout_s(environ: Mapping[str, str]) -> float:
    """Seconds a collective may wait for the other ranks: HPCRENDER_COLLECTIVE_TIMEOUT, else the default."""
    value = environ.get(COLLECTIVE_TIMEOUT_VAR, "").strip()
    if not value:
        return DEFAULT_COLLECTIVE_TIMEOUT_S
    try:
        seconds = float(value)
    except ValueError:
        seconds = float("nan")
    if not seconds > 0 or seconds == float("inf"):
        raise BadInput(f"{COLLECTIVE_TIMEOUT_VAR}={value!r}: expected a number of seconds > 0")
    return seconds


def _env_int(environ: Mapping[str, str], *names: str) -> int | None:
    """The first of `names` that is set, as an int."""
    for name in names:
        value = environ.get(name, "").strip()
        if value:
            try:
                return int(value)
            except ValueError:
                raise BadInput(f"{name}={value!r} is not an integer") from None
    return None


def slurm_info(environ: Mapping[str, str]) -> SlurmInfo | None:
    """What Slurm says about this process, or None outside a Slurm job."""
    job_id = environ.get("SLURM_JOB_ID") or environ.get("SLURM_JOBID")
    if not job_id:
        return None
    return SlurmInfo(
        job_id=job_id,
        procid=_env_int(environ, "SLURM_PROCID"),
        ntasks=_env_int(environ, "SLURM_STEP_NUM_TASKS", "SLURM_NTASKS", "SLURM_NPROCS"),
        localid=_env_int(environ, "SLURM_LOCALID"),
        nodeid=_env_int(environ, "SLURM_NODEID"),
        nodelist=(environ.get("SLURM_STEP_NODELIST") or environ.get("SLURM_JOB_NODELIST")
                  or environ.get("SLURM_NODELIST") or None),
        cpus_per_task=_env_int(environ, "SLURM_CPUS_PER_TASK"),
        restart_count=_env_int(environ, "SLURM_RESTART_COUNT") or 0,
        array_task_id=_env_int(environ, "SLURM_ARRAY_TASK_ID"),
        array_task_min=_env_int(environ, "SLURM_ARRAY_TASK_MIN"),
        array_task_max=_env_int(environ, "SLURM_ARRAY_TASK_MAX"),
        array_task_step=_env_int(environ, "SLURM_ARRAY_TASK_STEP"),
        array_task_count=_env_int(environ, "SLURM_ARRAY_TASK_COUNT"),
        step_id=_env_int(environ, "SLURM_STEP_ID", "SLURM_STEPID"),
    )


def _mpi_rank_size(environ: Mapping[str, str]) -> tuple[int | None, int | None]:
    """Rank and size as the process manager exported them (MPICH/Intel PMI, Open MPI, PMIx)."""
    rank = _env_int(environ, "PMI_RANK", "OMPI_COMM_WORLD_RANK", "PMIX_RANK")
    size = _env_int(environ, "PMI_SIZE", "OMPI_COMM_WORLD_SIZE")
    return rank, size


def _mpiexec_only(environ: Mapping[str, str]) -> bool:
    """Variables only mpiexec/mpirun set (srun never does): Hydra's local rank, Open MPI's world size."""
    return any(k in environ for k in ("MPI_LOCALRANKID", "OMPI_COMM_WORLD_SIZE")) or any(
        k.startswith(("HYDRA_", "HYDI_")) for k in environ)


def detect_launcher(environ: Mapping[str, str]) -> Launcher:
    """Which launcher started this process.

    mpiexec inside an allocation starts its proxies with srun, so a Slurm step alone does not mean srun:
    the PMI rank and size must be Slurm's own task id and count.
    """
    rank, size = _mpi_rank_size(environ)
    slurm = slurm_info(environ)
    if slurm is not None and slurm.step_id is not None and slurm.procid is not None:
        agrees = (rank is None or rank == slurm.procid) and (size is None or size == slurm.ntasks)
        if agrees and not _mpiexec_only(environ):
            return Launcher.SRUN
        return Launcher.MPIEXEC
    if rank is not None or size is not None or _mpiexec_only(environ):
        return Launcher.MPIEXEC
    return Launcher.NONE


def launched_size(launcher: Launcher, environ: Mapping[str, str]) -> int | None:
    """How many ranks the launcher started, as it says itself (None when it does not say)."""
    if launcher is Launcher.SRUN:
        return slurm_info(environ).ntasks
    if launcher is Launcher.MPIEXEC:
        return _mpi_rank_size(environ)[1]
    return None


def check_world_size(launcher: Launcher, launched: int | None, world_size: int) -> None:
    """A launcher and MPI library that do not speak the same PMI give N separate worlds of one rank each."""
    if launched is None or launched == world_size:
        return
    if launcher is Launcher.SRUN:
        hint = "srun needs --mpi=pmi2 for MPICH (the .venv's mpich) or --mpi=pmix for Open MPI"
    else:
        hint = "use the mpiexec of the MPI that mpi4py is built against (.venv/bin/mpiexec with the .venv's mpich)"
    raise BadInput(f"{launcher.value} started {launched} ranks but MPI sees a world of {world_size}: {hint}")


def threads_per_rank(cpus: int, local_size: int, environ: Mapping[str, str]) -> int:
    """Intra-op threads for one rank: OMP_NUM_THREADS if set, else SLURM_CPUS_PER_TASK, else a fair share."""
    omp = environ.get("OMP_NUM_THREADS", "").split(",")[0].strip()  # OpenMP allows a per-level list
    if omp.isdigit() and int(omp) > 0:
        return int(omp)
    slurm = slurm_info(environ)
    if slurm is not None and slurm.cpus_per_task:
        return slurm.cpus_per_task
    return max(1, cpus // max(1, local_size))


def pick_device(local_rank: int, cuda_count: int) -> str:
    """`cuda:local_rank % count`: with --gpus-per-task=1 every task sees only its own device 0."""
    return f"cuda:{local_rank % cuda_count}" if cuda_count > 0 else "cpu"


def node_indices(leaders: Sequence[int]) -> tuple[int, ...]:
    """Index of each rank's node, given each rank's node leader (lowest global rank on its node)."""
    order = {leader: i for i, leader in enumerate(sorted(set(leaders)))}
    return tuple(order[leader] for leader in leaders)


def ranks_sharing_a_device(devices: Sequence[str]) -> tuple[int, ...]:
    """The ranks on the first device that more than one rank uses (empty when each has its own)."""
    for device in devices:
        owners = tuple(r for r, d in enumerate(devices) if d == device)
        if len(owners) > 1:
            return owners
    return ()


def max_memory_bytes(environ: Mapping[str, str]) -> int | None:
    """HPCRENDER_MAX_MEMORY: the memory one rank may use ("40G", "512MiB", a number of bytes), or None."""
    value = environ.get(MAX_MEMORY_VAR, "").strip()
    if not value:
        return None
    found = re.fullmatch(r"(\d+(?:\.\d+)?)\s*([kmgt]?)(?:i?b)?", value, re.IGNORECASE)
    size = int(float(found[1]) * _BINARY_UNITS[found[2].lower()]) if found else 0
    if size < 1:
        raise BadInput(f"{MAX_MEMORY_VAR}={value!r}: expected a size such as 40G, 512M or a number of bytes")
    return size


@dataclass(frozen=True)
class MemoryLimit:
    bytes: int
    source: str  # what sets it, for the message that refuses a job


def memory_limit(device: str, device_total: int | None, max_memory: int | None) -> MemoryLimit | None:
    """What one rank may use: the smaller of its GPU's memory and HPCRENDER_MAX_MEMORY; None when neither is known
    (a CPU without the variable: nothing is refused)."""
    known = []
    if device_total is not None:
        known.append(MemoryLimit(device_total, f"the memory of {device}"))
    if max_memory is not None:
        known.append(MemoryLimit(max_memory, MAX_MEMORY_VAR))
    return min(known, key=lambda limit: limit.bytes) if known else None


def rank_memory_limit(device: str, environ: Mapping[str, str]) -> MemoryLimit | None:
    """memory_limit for this rank's device (ranks are assumed alike: rank 0 checks for all of them)."""
    total = None
    if torch_backend(device) is Backend.NCCL:
        import torch

        total = int(torch.cuda.get_device_properties(device).total_memory)
    return memory_limit(device, total, max_memory_bytes(environ))


def gpu_identity(index: int, uuid: str | None, visible: str | None,
                 nvml_uuid: Callable[[int], str | None] | None) -> str | None:
    """What names the physical GPU behind torch's device `index` alike in every process that uses it; None when
    nothing can tell (older torch without device UUIDs, no NVML).

    Never the bare index: with one GPU per task every task calls its own GPU device 0. CUDA_VISIBLE_DEVICES maps
    the index to the driver's name for the device: a UUID already, or an index that NVML turns into one.
    """
    if uuid:
        return uuid
    entries = [e.strip() for e in visible.split(",")] if visible is not None else None
    if entries is not None:
        if index >= len(entries) or not entries[index]:
            return None
        entry = entries[index]
        if entry.startswith(("GPU-", "MIG-")):
            return entry
        if not entry.isdigit():
            return None
        index = int(entry)
    return nvml_uuid(index) if nvml_uuid is not None else None


def _nvml_uuid() -> Callable[[int], str | None] | None:
    """NVML's UUID of a device by its driver index, when pynvml is installed and the driver answers."""
    try:
        import pynvml

        pynvml.nvmlInit()
    except Exception:  # noqa: BLE001 - no NVML of any kind: the caller skips the check
        return None

    def uuid(index: int) -> str | None:
        try:
            value = pynvml.nvmlDeviceGetUUID(pynvml.nvmlDeviceGetHandleByIndex(index))
        except Exception:  # noqa: BLE001
            return None
        return value.decode() if isinstance(value, bytes) else str(value)

    return uuid


def first_host(nodelist: str) -> str:
    """First host of a Slurm hostlist: "node[01-04,07],gpu3" -> "node01"; "rack[2-3]-n[5-6]" -> "rack2-n5"."""
    out: list[str] = []
    i, text = 0, nodelist.strip()
    while i < len(text) and text[i] != ",":
        if text[i] == "[":
            end = text.find("]", i)
            if end < 0:
                raise BadInput(f"hostlist {nodelist!r}: unclosed '['")
            start = text[i + 1:end].split(",")[0].split("-")[0].strip()
            if not start.isdigit():
                raise BadInput(f"hostlist {nodelist!r}: range {text[i:end + 1]!r} does not start with a number")
            out.append(start)  # keeps the zero padding: node[01-04] -> node01
            i = end + 1
        elif text[i] == "]":
            raise BadInput(f"hostlist {nodelist!r}: ']' without '['")
        else:
            out.append(text[i])
            i += 1
    host = "".join(out)
    if not host:
        raise BadInput(f"hostlist {nodelist!r} names no host")
    return host


def _short(host: str) -> str:
    return host.split(".")[0]


def master_candidate(n_nodes: int, rank0_host: str, nodelist: str | None) -> str | None:
    """The rendezvous address when it follows from names alone, else None (resolve rank 0's host).

    One node: loopback. Several: the first Slurm host, which every node resolves, when rank 0 runs there.
    """
    if n_nodes == 1:
        return "127.0.0.1"
    if nodelist:
        host = first_host(nodelist)
        if _short(host) == _short(rank0_host):
            return host
    return None


def is_loopback(address: str) -> bool:
    """A literal loopback address or a name that only ever means this host."""
    if address.strip().lower() in ("localhost", "localhost.localdomain", "ip6-localhost", "ip6-loopback"):
        return True
    try:
        return ipaddress.ip_address(address.strip().strip("[]")).is_loopback
    except ValueError:
        return False


def check_master_addr(address: str, n_nodes: int) -> None:
    """A MASTER_ADDR inherited from a login shell (127.0.0.1, localhost) cannot bring several nodes together: the
    other nodes would try to reach the store on their own loopback until the rendezvous timeout."""
    if n_nodes > 1 and is_loopback(address):
        raise BadInput(f"MASTER_ADDR={address} is a loopback address but the job spans {n_nodes} nodes: unset "
                       "MASTER_ADDR (hpcrender then meets at the job's first host) or give an address every node "
                       "reaches")


def idle_barrier(comm, poll_s: float = 0.001, timeout_s: float | None = None) -> bool:
    """An MPI barrier whose waiting ranks sleep between tests of it. MPI's own barrier spins a core for as long as
    the slowest rank takes (rank 0 loading a manifest, or composing a gigapixel level for minutes), taking it from
    the ranks that work when ranks share cores; the price is at most poll_s of latency. With timeout_s: False when
    not every rank arrived in time (the request is left pending)."""
    request = comm.Ibarrier()
    deadline = None if timeout_s is None else time.monotonic() + timeout_s
    while not request.Test():
        if deadline is not None and time.monotonic() > deadline:
            return False
        time.sleep(poll_s)
    return True


def connect_store(address: str, port: int, world_size: int, connect_s: float, timeout_s: float, store_cls=None):
    """A client of rank 0's rendezvous store: a short connect timeout (rank 0 opened the store before it sent the
    address), then the rendezvous timeout for what is waited for in it."""
    import torch.distributed as dist

    cls = store_cls or dist.TCPStore
    try:
        store = cls(address, port, world_size, is_master=False, timeout=timedelta(seconds=connect_s))
    except (RuntimeError, OSError) as e:
        first = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise HpcrenderError(f"cannot reach the rendezvous store at {address}:{port} within {connect_s:g} s "
                             f"(MASTER_ADDR, or the interface hpcrender chose): {first}") from None
    store.set_timeout(timedelta(seconds=timeout_s))
    return store


def _routable_address(host: str, peers: Sequence[str]) -> str:
    """An address of this host that other nodes reach; `gethostbyname` may answer 127.0.1.1 on Debian."""
    try:
        address = socket.gethostbyname(host)
        if not address.startswith("127."):
            return address
    except OSError:
        pass
    for peer in peers:
        try:
            # Connecting a UDP socket sends nothing; it only picks the interface that routes to the peer.
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
                s.connect((peer, 9))
                address = s.getsockname()[0]
            if not address.startswith("127."):
                return address
        except OSError:
            continue
    return host


def _cpus_of_this_process() -> frozenset[int]:
    try:
        return frozenset(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return frozenset(range(os.cpu_count() or 1))


class World:
    """The MPI world of this run (or a plain single process) plus torch.distributed once started."""

    def __init__(self, env: Environment, comm: Any, hosts: Sequence[str], leaders: Sequence[int]):
        self.env = env
        self.comm = comm
        self._hosts = tuple(hosts)      # hostname of each rank
        self._leaders = tuple(leaders)  # node leader of each rank

    @classmethod
    def start(cls) -> World:
        """Join the MPI world (a plain process is a world of one) and work out this rank's environment."""
        # mpi4py's rc defaults are kept (thread level "multiple": gloo and NCCL run threads beside MPI);
        # MPI4PY_RC_* variables still override them.
        from mpi4py import MPI

        environ = os.environ
        comm = MPI.COMM_WORLD
        launcher = detect_launcher(environ)
        check_world_size(launcher, launched_size(launcher, environ), comm.Get_size())
        rank, size = comm.Get_rank(), comm.Get_size()
        node = socket.gethostname()

        local = comm.Split_type(MPI.COMM_TYPE_SHARED, key=rank)
        local_rank, local_size = local.Get_rank(), local.Get_size()
        leader = local.bcast(rank, root=0)
        # Ranks bound to disjoint CPU sets (srun --cpu-bind) each own their set; unbound ranks share one.
        cpus = len(frozenset().union(*local.allgather(_cpus_of_this_process())))
        local.Free()
        leaders = comm.allgather(leader)
        hosts = comm.allgather(node)

        import torch

        threads = threads_per_rank(cpus, local_size, environ)
        torch.set_num_threads(threads)
        cuda_count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        env = Environment(
            launcher=launcher, world_size=size, rank=rank, local_rank=local_rank, local_size=local_size,
            node=node, node_index=node_indices(leaders)[rank], device=pick_device(local_rank, cuda_count),
            slurm=slurm_info(environ), threads=threads, collective_timeout_s=collective_timeout_s(environ),
        )
        return cls(env, comm, hosts, leaders)

    @property
    def n_nodes(self) -> int:
        return len(set(self._leaders))

    def bcast(self, obj: Any, root: int = 0) -> Any:
        """The root's `obj` on every rank; the others wait for the root without spinning (idle_barrier)."""
        idle_barrier(self.comm)
        return self.comm.bcast(obj, root=root)

    def allgather(self, obj: Any) -> list:
        return self.comm.allgather(obj)

    def barrier(self) -> None:
        idle_barrier(self.comm)

    def allreduce_max(self, x: Any) -> Any:
        from mpi4py import MPI

        return self.comm.allreduce(x, op=MPI.MAX)

    def split(self, color: int) -> Any:
        """The MPI communicator of the ranks that pass the same `color` (collective over the world): small
        agreements inside a rank group that must not queue behind the group's torch.distributed traffic."""
        return self.comm.Split(color, self.env.rank)

    def _rendezvous(self) -> tuple[str, int | None, HpcrenderError | None]:
        """On rank 0: (address, port or None for any free one, error)."""
        try:
            given = os.environ.get("MASTER_ADDR")
            if given:
                check_master_addr(given, self.n_nodes)
            address = given or master_candidate(
                self.n_nodes, self._hosts[0], self.env.slurm.nodelist if self.env.slurm else None)
            if address is None:
                address = _routable_address(self._hosts[0], [h for h in self._hosts if h != self._hosts[0]])
            port = os.environ.get("MASTER_PORT")
            return address, int(port) if port else None, None
        except BadInput as e:
            return "", None, e
        except (ValueError, HpcrenderError) as e:
            return "", None, BadInput(f"cannot choose the rendezvous address: {e}")

    def _check_own_gpus(self) -> None:
        """Refuse ranks that share a GPU (NCCL would fail later, at the first collective, and less clearly); skip
        the check, saying so, where the GPUs cannot be told apart."""
        import torch

        env = self.env
        props = torch.cuda.get_device_properties(env.device)
        uuid = getattr(props, "uuid", None)
        identity = gpu_identity(torch.device(env.device).index or 0, str(uuid) if uuid else None,
                                os.environ.get("CUDA_VISIBLE_DEVICES"), None if uuid else _nvml_uuid())
        gpus = self.comm.allgather(None if identity is None else f"{env.node}/{identity}")
        if None in gpus:
            if env.rank == 0:
                log.warning("cannot tell which GPU ranks %s use (torch without device UUIDs, no NVML): the check "
                            "for ranks sharing a GPU is skipped", ", ".join(str(r) for r, g in enumerate(gpus)
                                                                          if g is None))
            return
        sharing = ranks_sharing_a_device(gpus)
        if sharing:
            raise DoesNotFit(f"ranks {', '.join(map(str, sharing))} share {env.device} on "
                             f"{gpus[sharing[0]].split('/')[0]}: NCCL needs a GPU of its own for each rank; "
                             "start no more ranks per node than it has GPUs")

    def init_torch_distributed(self) -> None:
        """Start torch.distributed over this world (NCCL on GPUs, gloo on CPUs); a world of one too."""
        import torch
        import torch.distributed as dist

        if dist.is_initialized():
            return
        env, timeout = self.env, timedelta(seconds=RENDEZVOUS_TIMEOUT_S)
        backend = torch_backend(env.device)
        if backend is Backend.NCCL:
            torch.cuda.set_device(env.device)
            self._check_own_gpus()
        if env.world_size == 1:
            store = dist.HashStore()
        else:
            store, error = None, None
            if env.rank == 0:
                address, port, error = self._rendezvous()
                if error is None:
                    try:
                        # Port 0 lets the kernel pick a free port with no window for another process to take it.
                        store = dist.TCPStore(address, port or 0, env.world_size, is_master=True,
                                              timeout=timeout, wait_for_workers=False)
                        port = store.port
                    except (RuntimeError, OSError) as e:
                        error = HpcrenderError(f"cannot open the rendezvous store on {address}:{port or 0}: {e}")
                offer = (address, port, error)
            else:
                offer = None
            # Every rank learns of a failure on rank 0 and raises, instead of waiting in the store forever.
            address, port, error = self.comm.bcast(offer, root=0)
            if error is not None:
                raise error
            if store is None:
                store = connect_store(address, port, env.world_size, CONNECT_TIMEOUT_S, RENDEZVOUS_TIMEOUT_S)
        dist.init_process_group(backend.value, store=store, rank=env.rank, world_size=env.world_size,
                                timeout=timedelta(seconds=env.collective_timeout_s))
        log.debug("torch.distributed %s: rank %d of %d, collectives time out after %g s", backend.value, env.rank,
                  env.world_size, env.collective_timeout_s)

    def new_groups(self, groups: Sequence[Sequence[int]]) -> list:
        """A torch.distributed group for each list of ranks, created on every rank in the same order.

        Returns each group's handle, or None where this rank is not in the group.
        """
        import torch.distributed as dist

        for members in groups:
            if not members or len(set(members)) != len(members) or not all(
                    0 <= r < self.env.world_size for r in members):
                raise BadInput(f"ranks {list(members)} do not form a group of a world of {self.env.world_size}")
        handles = []
        # A new group does not inherit the world's timeout: without it, torch's default (10 or 30 minutes).
        timeout = timedelta(seconds=self.env.collective_timeout_s)
        for members in groups:
            handle = dist.new_group(ranks=sorted(members), timeout=timeout)
            handles.append(handle if self.env.rank in members else None)
        return handles

    def abort(self, message: str, code: int = EXIT_JOB_FAILED) -> NoReturn:
        """One line to stderr, then every rank of the world ends at once with `code`."""
        sys.stdout.flush()
        print(f"hpcrender: rank {self.env.rank} on {self.env.node}: {message}", file=sys.stderr, flush=True)
        logging.shutdown()  # the per-rank logs keep what led here
        if self.env.world_size == 1:
            # Alone: no interpreter teardown either. An HDF5 file that could not be closed (a full disk) would
            # crash the library's exit handler; the stores are flushed tile by tile and need no close.
            sys.stderr.flush()
            os._exit(code)
        # Give the launcher's output forwarding a moment: Abort tears the ranks down with their pipes unread.
        time.sleep(ABORT_GRACE_S)
        try:
            # MPICH repeats the line above in its own words on the aborting rank.
            os.dup2(os.open(os.devnull, os.O_WRONLY), 2)
        except OSError:
            pass
        self.comm.Abort(code)
        os._exit(code)

    def close(self) -> None:
        """Tear down torch.distributed (MPI finalises itself at exit)."""
        import torch.distributed as dist

        if dist.is_initialized():
            dist.destroy_process_group()


@contextmanager
def guarded(world: World, debug: bool = False) -> Iterator[World]:
    """An exception on any rank ends the whole world within seconds instead of hanging the others.

    The message is one line; the traceback only with `debug`. A user error keeps its exit code.
    """
    try:
        yield world
    except KeyboardInterrupt:
        if debug:
            traceback.print_exc()
        world.abort("interrupted", EXIT_INTERRUPTED)
    except HpcrenderError as e:
        if debug:
            traceback.print_exc()
        world.abort(str(e), e.exit_code)
    except Exception as e:  # noqa: BLE001 - any other failure on one rank must still end them all
        if debug:
            traceback.print_exc()
        world.abort(f"{type(e).__name__}: {e}", EXIT_JOB_FAILED)
