"""Where am I running: Slurm variables, launcher detection, threads, devices, hostlists, and real MPI worlds."""

from __future__ import annotations

import functools
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from hpcrender.errors import BadInput, HpcrenderError
from hpcrender.run.environment import (
    CONNECT_TIMEOUT_S, DEFAULT_COLLECTIVE_TIMEOUT_S, RENDEZVOUS_TIMEOUT_S, Backend, Launcher, SlurmInfo, check_master_addr, check_world_size, collective_timeout_s, connect_store, detect_launcher, first_host, MemoryLimit, gpu_identity, is_loopback, launched_size, master_candidate, max_memory_bytes, memory_limit, node_indices, pick_device, ranks_sharing_a_device, slurm_info, threads_per_rank, torch_backend,
)

SCRIPTS = Path(__file__).parent / "mpi_scripts"
BIN = Path(sys.executable).parent
MPIEXEC = BIN / "mpiexec"

# Environments as a real Slurm (22.05, one node "vm") and MPICH's hydra exported them.
SRUN_PMI2 = {  # srun -n 2 --mpi=pmi2, task 1
    "SLURM_JOB_ID": "1", "SLURM_JOBID": "1", "SLURM_STEP_ID": "0", "SLURM_STEPID": "0", "SLURM_PROCID": "1",
    "SLURM_LOCALID": "1", "SLURM_NODEID": "0", "SLURM_NTASKS": "2", "SLURM_NPROCS": "2",
    "SLURM_STEP_NUM_TASKS": "2", "SLURM_JOB_NODELIST": "vm", "SLURM_NODELIST": "vm", "SLURM_STEP_NODELIST": "vm",
    "SLURM_MPI_TYPE": "pmi2", "PMI_FD": "11", "PMI_JOBID": "1.0", "PMI_RANK": "1", "PMI_SIZE": "2",
}
BATCH_SCRIPT = {  # sbatch -n 2: the batch script itself is no step
    "SLURM_JOB_ID": "2", "SLURM_JOBID": "2", "SLURM_PROCID": "0", "SLURM_LOCALID": "0", "SLURM_NODEID": "0",
    "SLURM_NTASKS": "2", "SLURM_NPROCS": "2", "SLURM_JOB_NODELIST": "vm", "SLURM_NODELIST": "vm",
}
MPIEXEC_IN_BATCH = {  # mpiexec -n 2 inside that batch script: hydra starts its proxy with a 1-task srun step
    **BATCH_SCRIPT, "SLURM_STEP_ID": "0", "SLURM_STEPID": "0", "SLURM_STEP_NUM_TASKS": "1", "SLURM_NTASKS": "1",
    "SLURM_STEP_NODELIST": "vm", "MPI_LOCALNRANKS": "2", "MPI_LOCALRANKID": "1", "PMI_FD": "6",
    "PMI_HOSTNAME": "vm", "PMI_RANK": "1", "PMI_SIZE": "2",
}
HYDRA = {"MPI_LOCALNRANKS": "2", "MPI_LOCALRANKID": "0", "PMI_FD": "9", "PMI_HOSTNAME": "vm",
         "PMI_RANK": "0", "PMI_SIZE": "2"}


# --- slurm_info --------------------------------------------------------------------------------------------

def test_no_slurm_job_means_no_slurm_info():
    assert slurm_info({}) is None
    assert slurm_info({"SLURM_PROCID": "0", "PMI_RANK": "0"}) is None


def test_slurm_info_reads_a_step():
    assert slurm_info(SRUN_PMI2) == SlurmInfo(
        job_id="1", procid=1, ntasks=2, localid=1, nodeid=0, nodelist="vm", cpus_per_task=None, restart_count=0,
        array_task_id=None, array_task_min=None, array_task_max=None, array_task_step=None,
        array_task_count=None, step_id=0)


def test_slurm_info_reads_a_requeued_array_task():
    info = slurm_info({
        "SLURM_JOBID": "77", "SLURM_RESTART_COUNT": "2", "SLURM_CPUS_PER_TASK": "8",
        "SLURM_ARRAY_TASK_ID": "4", "SLURM_ARRAY_TASK_MIN": "1", "SLURM_ARRAY_TASK_MAX": "7",
        "SLURM_ARRAY_TASK_STEP": "3", "SLURM_ARRAY_TASK_COUNT": "3", "SLURM_NODELIST": "gpu[01-04]",
    })
    assert (info.job_id, info.restart_count, info.cpus_per_task) == ("77", 2, 8)
    assert (info.array_task_id, info.array_task_min, info.array_task_max) == (4, 1, 7)
    assert (info.array_task_step, info.array_task_count) == (3, 3)
    assert (info.step_id, info.procid, info.nodelist) == (None, None, "gpu[01-04]")


def test_slurm_info_prefers_the_steps_tasks_and_nodes_to_the_jobs():
    info = slurm_info({"SLURM_JOB_ID": "5", "SLURM_NTASKS": "8", "SLURM_STEP_NUM_TASKS": "2",
                       "SLURM_JOB_NODELIST": "n[1-4]", "SLURM_STEP_NODELIST": "n[3-4]"})
    assert (info.ntasks, info.nodelist) == (2, "n[3-4]")


def test_slurm_info_names_a_malformed_variable():
    with pytest.raises(BadInput, match="SLURM_NTASKS='two'"):
        slurm_info({"SLURM_JOB_ID": "5", "SLURM_NTASKS": "two"})


# --- detect_launcher / world size check ---------------------------------------------------------------------

@pytest.mark.parametrize("environ,launcher", [
    ({}, Launcher.NONE),
    (BATCH_SCRIPT, Launcher.NONE),
    (HYDRA, Launcher.MPIEXEC),
    (MPIEXEC_IN_BATCH, Launcher.MPIEXEC),
    ({**MPIEXEC_IN_BATCH, "PMI_RANK": "0", "PMI_SIZE": "1"}, Launcher.MPIEXEC),  # mpiexec -n 1 in a batch script
    (SRUN_PMI2, Launcher.SRUN),
    ({k: v for k, v in SRUN_PMI2.items() if not k.startswith("PMI_")}, Launcher.SRUN),  # srun --mpi=none
    ({**BATCH_SCRIPT, "SLURM_STEP_ID": "0", "SLURM_PROCID": "1", "SLURM_NTASKS": "2", "PMIX_RANK": "1"},
     Launcher.SRUN),  # srun --mpi=pmix
    ({"OMPI_COMM_WORLD_SIZE": "2", "OMPI_COMM_WORLD_RANK": "0"}, Launcher.MPIEXEC),  # Open MPI's mpirun
    ({"HYDRA_CONTROL_FD": "5"}, Launcher.MPIEXEC),
])
def test_detect_launcher(environ, launcher):
    assert detect_launcher(environ) is launcher


def test_launched_size_is_what_the_launcher_says():
    assert launched_size(Launcher.SRUN, SRUN_PMI2) == 2
    assert launched_size(Launcher.MPIEXEC, MPIEXEC_IN_BATCH) == 2  # hydra's, not the proxy step's 1
    assert launched_size(Launcher.NONE, BATCH_SCRIPT) is None


def test_a_world_of_one_under_srun_with_two_tasks_is_refused_with_the_fix():
    with pytest.raises(BadInput, match="srun started 2 ranks but MPI sees a world of 1: .*--mpi=pmi2"):
        check_world_size(Launcher.SRUN, 2, 1)
    with pytest.raises(BadInput, match="mpiexec started 4 ranks but MPI sees a world of 1"):
        check_world_size(Launcher.MPIEXEC, 4, 1)
    check_world_size(Launcher.SRUN, 2, 2)
    check_world_size(Launcher.NONE, None, 1)


# --- threads, devices, nodes -------------------------------------------------------------------------------

@pytest.mark.parametrize("cpus", range(1, 9))
@pytest.mark.parametrize("local_size", range(1, 9))
def test_threads_default_to_a_fair_share_of_the_node(cpus, local_size):
    threads = threads_per_rank(cpus, local_size, {})
    assert threads == max(1, cpus // local_size)
    if local_size <= cpus:
        assert local_size * threads <= cpus


def test_omp_num_threads_wins_then_slurm_cpus_per_task():
    slurm = {"SLURM_JOB_ID": "1", "SLURM_CPUS_PER_TASK": "6"}
    assert threads_per_rank(16, 2, {"OMP_NUM_THREADS": "3", **slurm}) == 3
    assert threads_per_rank(16, 2, {"OMP_NUM_THREADS": "4,2"}) == 4  # OpenMP's per-level list
    assert threads_per_rank(16, 2, slurm) == 6
    assert threads_per_rank(16, 2, {"OMP_NUM_THREADS": "0", **slurm}) == 6
    assert threads_per_rank(16, 2, {"OMP_NUM_THREADS": "many"}) == 8
    assert threads_per_rank(16, 2, {"SLURM_CPUS_PER_TASK": "6"}) == 8  # not in a Slurm job: ignored


@pytest.mark.parametrize("local_rank", range(0, 8))
@pytest.mark.parametrize("cuda_count", range(0, 5))
def test_device_is_local_rank_modulo_visible_gpus(local_rank, cuda_count):
    device = pick_device(local_rank, cuda_count)
    assert device == ("cpu" if cuda_count == 0 else f"cuda:{local_rank % cuda_count}")


def test_gpus_per_task_1_puts_every_task_on_its_device_0():
    assert {pick_device(r, 1) for r in range(4)} == {"cuda:0"}


@pytest.mark.parametrize("leaders,indices", [
    ([0], (0,)),
    ([0, 0, 2, 2, 4, 4], (0, 0, 1, 1, 2, 2)),  # block placement
    ([0, 1, 0, 1], (0, 1, 0, 1)),              # cyclic placement
    ([0, 0, 0], (0, 0, 0)),
])
def test_node_index_ranks_nodes_by_their_lowest_rank(leaders, indices):
    assert node_indices(leaders) == indices


@pytest.mark.parametrize("devices,sharing", [
    ([], ()),
    (["a/gpu0"], ()),
    (["a/gpu0", "a/gpu1", "b/gpu0", "b/gpu1"], ()),
    (["a/gpu0", "a/gpu0"], (0, 1)),
    (["a/gpu0", "a/gpu1", "a/gpu1", "a/gpu0"], (0, 3)),
])
def test_ranks_sharing_a_gpu_are_found(devices, sharing):
    assert ranks_sharing_a_device(devices) == sharing


@pytest.mark.parametrize("device,backend", [("cpu", Backend.GLOO), ("cuda:0", Backend.NCCL), ("cuda:3", Backend.NCCL),
                                            ("cuda", Backend.NCCL)])
def test_gpus_use_nccl_alone_and_cpus_gloo(device, backend):
    assert torch_backend(device) is backend


def nvml(uuids: dict[int, str]):
    """A stand-in for NVML: UUIDs by driver index; records what it was asked."""
    asked = []

    def uuid(index: int) -> str | None:
        asked.append(index)
        return uuids.get(index)

    uuid.asked = asked
    return uuid


def test_torch_s_own_uuid_names_the_gpu_before_anything_else():
    fake = nvml({0: "GPU-nvml"})
    assert gpu_identity(0, "GPU-torch", "3", fake) == "GPU-torch"
    assert fake.asked == []


def test_without_torch_uuids_one_gpu_per_task_is_told_apart_through_visible_devices_and_nvml():
    # --gpus-per-task=1 on a 4-GPU node: every task's only device is torch's cuda:0.
    fake = nvml({i: f"GPU-{i}" for i in range(4)})
    names = [gpu_identity(0, None, visible, fake) for visible in ("0", "1", "2", "3")]
    assert names == ["GPU-0", "GPU-1", "GPU-2", "GPU-3"]
    assert len(set(ranks_sharing_a_device([f"n1/{n}" for n in names]))) == 0


def test_without_torch_uuids_ranks_on_one_gpu_still_share_it():
    fake = nvml({i: f"GPU-{i}" for i in range(4)})
    names = [f"n1/{gpu_identity(r % 2, None, None, fake)}" for r in range(4)]  # 4 ranks, 2 GPUs
    assert ranks_sharing_a_device(names) == (0, 2)


def test_visible_devices_given_as_uuids_name_the_gpu_without_nvml():
    assert gpu_identity(1, None, "GPU-aa, GPU-bb", None) == "GPU-bb"
    assert gpu_identity(0, None, "MIG-cc", None) == "MIG-cc"


@pytest.mark.parametrize("visible", [None, "0", "0,1"])
def test_without_torch_uuids_or_nvml_nothing_names_the_gpu_and_the_check_is_skipped(visible):
    assert gpu_identity(0, None, visible, None) is None


@pytest.mark.parametrize("index,visible", [(2, "0,1"), (0, ""), (0, "weird")])
def test_a_device_visible_devices_cannot_map_is_not_named(index, visible):
    assert gpu_identity(index, None, visible, nvml({0: "GPU-0"})) is None


def test_a_gpu_nvml_cannot_answer_for_is_not_named():
    assert gpu_identity(0, None, "5", nvml({0: "GPU-0"})) is None


# --- memory a rank may use -----------------------------------------------------------------------------------

@pytest.mark.parametrize("value,size", [
    ("", None), ("1048576", 2**20), ("512M", 512 * 2**20), ("40G", 40 * 2**30), ("40GiB", 40 * 2**30),
    ("40gb", 40 * 2**30), ("1.5T", int(1.5 * 2**40)), (" 64k ", 64 * 2**10),
])
def test_max_memory_reads_sizes_in_binary_units(value, size):
    assert max_memory_bytes({"HPCRENDER_MAX_MEMORY": value}) == size


@pytest.mark.parametrize("value", ["0", "lots", "-4G", "4X", "G"])
def test_a_bad_max_memory_is_refused_naming_the_variable(value):
    with pytest.raises(BadInput, match=f"HPCRENDER_MAX_MEMORY='{value}'"):
        max_memory_bytes({"HPCRENDER_MAX_MEMORY": value})


def test_memory_limit_is_the_smaller_of_the_gpu_and_the_setting_and_none_on_a_bare_cpu():
    assert memory_limit("cpu", None, None) is None
    assert memory_limit("cpu", None, 8 << 30) == MemoryLimit(8 << 30, "HPCRENDER_MAX_MEMORY")
    assert memory_limit("cuda:1", 80 << 30, None) == MemoryLimit(80 << 30, "the memory of cuda:1")
    assert memory_limit("cuda:1", 80 << 30, 40 << 30).source == "HPCRENDER_MAX_MEMORY"
    assert memory_limit("cuda:1", 80 << 30, 100 << 30).bytes == 80 << 30


# --- timeouts and the rendezvous store ---------------------------------------------------------------------

def test_collective_timeout_is_its_own_setting_shorter_than_the_rendezvous_by_default():
    assert collective_timeout_s({}) == DEFAULT_COLLECTIVE_TIMEOUT_S < RENDEZVOUS_TIMEOUT_S
    assert collective_timeout_s({"HPCRENDER_COLLECTIVE_TIMEOUT": " 75 "}) == 75.0
    assert collective_timeout_s({"HPCRENDER_COLLECTIVE_TIMEOUT": "0.5"}) == 0.5


@pytest.mark.parametrize("value", ["0", "-3", "soon", "inf", "nan"])
def test_a_bad_collective_timeout_is_refused_naming_the_variable(value):
    with pytest.raises(BadInput, match=f"HPCRENDER_COLLECTIVE_TIMEOUT='{value}'"):
        collective_timeout_s({"HPCRENDER_COLLECTIVE_TIMEOUT": value})


class FakeStore:
    """Records how a rendezvous client was made; fails to connect when `reachable` is False."""

    made: list = []
    reachable = True

    def __init__(self, address, port, world_size, is_master, timeout):
        FakeStore.made.append(self)
        self.args = (address, port, world_size, is_master)
        self.timeouts = [timeout.total_seconds()]
        if not FakeStore.reachable:
            raise RuntimeError("The client socket has timed out after 30000ms while trying to connect\nmore")

    def set_timeout(self, timeout):
        self.timeouts.append(timeout.total_seconds())


def test_a_store_client_connects_with_a_short_timeout_then_waits_the_rendezvous_timeout(monkeypatch):
    monkeypatch.setattr(FakeStore, "made", [])
    store = connect_store("10.0.0.1", 29500, 4, CONNECT_TIMEOUT_S, RENDEZVOUS_TIMEOUT_S, FakeStore)
    assert store.args == ("10.0.0.1", 29500, 4, False)
    assert store.timeouts == [CONNECT_TIMEOUT_S, RENDEZVOUS_TIMEOUT_S]
    assert CONNECT_TIMEOUT_S < RENDEZVOUS_TIMEOUT_S


def test_an_unreachable_store_is_one_line_naming_the_address(monkeypatch):
    monkeypatch.setattr(FakeStore, "reachable", False)
    with pytest.raises(HpcrenderError) as err:
        connect_store("10.0.0.1", 29500, 4, 30, 600, FakeStore)
    assert "10.0.0.1:29500 within 30 s" in str(err.value) and "\n" not in str(err.value)


@pytest.mark.parametrize("address,loopback", [
    ("127.0.0.1", True), ("127.0.1.1", True), ("localhost", True), ("LOCALHOST", True), ("::1", True),
    ("[::1]", True), ("10.1.2.3", False), ("node01", False), ("node01.ib.cluster", False), ("fe80::1", False),
])
def test_loopback_addresses_are_recognised(address, loopback):
    assert is_loopback(address) is loopback


def test_a_loopback_master_addr_is_refused_on_several_nodes_only():
    check_master_addr("127.0.0.1", 1)
    check_master_addr("localhost", 1)
    check_master_addr("node01", 3)
    for address in ("127.0.0.1", "localhost", "127.0.1.1"):
        with pytest.raises(BadInput, match=f"MASTER_ADDR={address} is a loopback address but the job spans 2 nodes"):
            check_master_addr(address, 2)


# --- hostlists and the rendezvous address ------------------------------------------------------------------

@pytest.mark.parametrize("nodelist,host", [
    ("vm", "vm"),
    ("node[01-04,07],gpu3", "node01"),
    ("gpu3,node[01-04]", "gpu3"),
    ("node[07,01-04]", "node07"),
    ("node[5]", "node5"),
    ("node[1-3]-ib", "node1-ib"),
    ("rack[2-3]-n[05-06]", "rack2-n05"),
    ("cn-12.cluster.org", "cn-12.cluster.org"),
    (" a[009-010] ", "a009"),
])
def test_first_host_of_a_slurm_hostlist(nodelist, host):
    assert first_host(nodelist) == host


@pytest.mark.parametrize("nodelist", ["", ",n1", "node[01-", "node]1", "node[a-b]", "[]"])
def test_first_host_refuses_malformed_hostlists(nodelist):
    with pytest.raises(BadInput):
        first_host(nodelist)


def test_rendezvous_address_follows_from_names_when_it_can():
    assert master_candidate(1, "vm", None) == "127.0.0.1"
    assert master_candidate(1, "node07", "node[01-04]") == "127.0.0.1"
    assert master_candidate(2, "node01.cluster.org", "node[01-04]") == "node01"
    # Rank 0 is not on the first node: only its own address will do, never loopback.
    assert master_candidate(2, "node03", "node[01-04]") is None
    assert master_candidate(2, "node01", None) is None


# --- real MPI worlds ---------------------------------------------------------------------------------------

def run_ranks(n: int | None, script: str, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HPCRENDER_COLLECTIVE_TIMEOUT": "45"}
    for name in ("MASTER_ADDR", "MASTER_PORT"):
        env.pop(name, None)
    command = [sys.executable, str(SCRIPTS / script), *args]
    if n is not None:
        command = [str(MPIEXEC), "-n", str(n), *command]
    return subprocess.run(command, env=env, capture_output=True, text=True, timeout=timeout)


def reports(result: subprocess.CompletedProcess) -> list[dict]:
    assert result.returncode == 0, result.stderr
    return sorted((json.loads(line) for line in result.stdout.splitlines() if line.startswith("{")),
                  key=lambda r: r["rank"])


@functools.cache
def world_reports(n: int | None, group_size: int) -> list[dict]:
    """One launch of env_world.py per (ranks, group size), shared by the tests that read it."""
    return reports(run_ranks(n, "env_world.py", str(group_size)))


needs_mpiexec = pytest.mark.skipif(not MPIEXEC.exists(), reason=f"no mpiexec beside {sys.executable}")
WORLDS = [(2, 2), (3, 1)]  # (ranks, group size): one group of the whole world; a group of one per rank


@pytest.mark.mpi
@needs_mpiexec
@pytest.mark.parametrize("n,group_size", WORLDS)
def test_mpiexec_world_starts_torch_distributed_over_every_rank(n, group_size):
    got = world_reports(n, group_size)
    assert [r["rank"] for r in got] == list(range(n))
    for r in got:
        assert (r["world_size"], r["dist_size"], r["launcher"]) == (n, n, "mpiexec")
        assert (r["local_rank"], r["local_size"], r["node_index"]) == (r["rank"], n, 0)
        assert r["device"] == "cpu" and r["threads"] == 1
        assert r["sum"] == r["device_sum"] == n * (n + 1) / 2  # all_reduce over torch.distributed
        assert r["max"] == n - 1 and r["ranks"] == list(range(n))  # MPI collectives
        assert r["backend"] == "gloo" and r["collective_timeout_s"] == 45


@pytest.mark.mpi
@needs_mpiexec
@pytest.mark.parametrize("n,group_size", WORLDS)
def test_ranks_waiting_in_a_world_barrier_sleep_instead_of_spinning(n, group_size):
    """Rank 0 reaches the barrier 0.5 s late; MPI's own barrier would spin the others' cores all that time."""
    for r in world_reports(n, group_size)[1:]:
        assert r["barrier_wall_s"] > 0.3, r
        assert r["barrier_cpu_s"] < 0.5 * r["barrier_wall_s"], r


@pytest.mark.mpi
@needs_mpiexec
@pytest.mark.parametrize("n,group_size", WORLDS)
def test_new_groups_give_each_rank_only_its_own_group(n, group_size):
    for r in world_reports(n, group_size):
        first = r["rank"] // group_size * group_size
        members = list(range(first, first + group_size))
        assert r["groups_joined"] == 1
        assert r["group_members"] == members
        assert r["group_sum"] == sum(m + 1 for m in members)
        # torch gives a new group its own default (30 minutes for gloo) unless told
        assert r["group_timeout_s"] == 45


def test_a_plain_process_is_a_world_of_one():
    (r,) = world_reports(None, 1)
    assert (r["world_size"], r["rank"], r["local_rank"], r["launcher"]) == (1, 0, 0, "none")
    assert (r["dist_size"], r["sum"], r["group_sum"]) == (1, 1.0, 1.0)


@pytest.mark.mpi
@needs_mpiexec
@pytest.mark.parametrize("kind,code,line", [
    ("runtime", 1, "hpcrender: rank 1 on {host}: RuntimeError: boom in the denoising loop"),
    ("badinput", 2, "hpcrender: rank 1 on {host}: width must be a multiple of 8"),
])
def test_a_failure_on_one_rank_ends_the_whole_world_with_one_line(kind, code, line):
    started = time.monotonic()
    result = run_ranks(2, "env_crash.py", "1", kind, timeout=60)  # rank 0 meanwhile waits in all_reduce
    assert time.monotonic() - started < 60
    assert result.returncode == code, result.stderr
    assert result.stderr.splitlines() == [line.format(host=socket.gethostname())]
    assert "unreachable" not in result.stdout


@pytest.mark.mpi
@needs_mpiexec
def test_debug_adds_the_traceback():
    result = run_ranks(2, "env_crash.py", "0", "runtime", "--debug", timeout=60)
    assert result.returncode == 1
    assert "Traceback (most recent call last)" in result.stderr
    assert f"hpcrender: rank 0 on {socket.gethostname()}: RuntimeError: boom" in result.stderr


def test_a_failure_in_a_plain_process_exits_with_its_code():
    result = run_ranks(None, "env_crash.py", "0", "badinput", timeout=60)
    assert result.returncode == 2
    assert result.stderr.splitlines() == [f"hpcrender: rank 0 on {socket.gethostname()}: width must be a multiple of 8"]
