"""The local one-node Slurm of the tests, started once per session by tests/local_slurm.sh: runs srun,
sbatch and scancel in an environment whose tasks find the project's venv first on PATH."""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

TESTS = Path(__file__).resolve().parent
SCRIPT = TESTS / "local_slurm.sh"
# The venv that runs the tests is the one whose hpcrender the Slurm tasks must run (not resolved:
# a venv's python is a link to the base interpreter, whose folder has no hpcrender).
VENV_BIN = Path(sys.executable).parent
DAEMONS = (Path("/usr/sbin/slurmctld"), Path("/usr/sbin/slurmd"), Path("/usr/sbin/munged"))

# Variables that would tie a step to another Slurm or MPI launch: set when the tests themselves run
# inside a cluster job, they would make srun look for that job on the private cluster.
FOREIGN_PREFIXES = ("SLURM_", "SBATCH_", "SRUN_", "SALLOC_", "PMI_", "PMIX_")
TERMINAL_STATES = frozenset({"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "PREEMPTED",
                             "OUT_OF_MEMORY", "BOOT_FAIL", "DEADLINE"})


class SlurmUnavailable(Exception):
    """Slurm cannot run here (not installed and not installable, or not root): the tests skip with this reason."""


def job_env(base: Mapping[str, str], slurm_conf: Path, venv_bin: Path = VENV_BIN) -> dict[str, str]:
    """The environment for srun/sbatch: this cluster's config, the venv first on PATH, one thread per rank.

    srun and sbatch export the caller's environment to the tasks, so this is what every task sees.
    """
    env = {k: v for k, v in base.items() if not k.startswith(FOREIGN_PREFIXES)}
    env.pop("PYTHONHOME", None)
    env["SLURM_CONF"] = str(slurm_conf)
    env["PATH"] = os.pathsep.join([str(venv_bin), *(p for p in env.get("PATH", "").split(os.pathsep)
                                                    if p and p != str(venv_bin))])
    env["VIRTUAL_ENV"] = str(venv_bin.parent)
    # Ranks x threads must not exceed the 2 cores of a CI machine.
    env["OMP_NUM_THREADS"] = "1"
    return env


# scontrol's keys (JobState, Socks/Node, ReqB:S:C:T); a value runs up to the next " KEY=" (it may hold spaces).
_FIELD_RE = re.compile(r"([A-Za-z][\w/:]*)=(.*?)(?=\s+[A-Za-z][\w/:]*=|\s*$)")


def parse_job_records(text: str) -> list[dict[str, str]]:
    """`scontrol -o show job` output: one line per job (array tasks each their own), KEY=VALUE fields."""
    return [dict(_FIELD_RE.findall(line)) for line in text.splitlines() if line.strip()]


def exit_status(record: Mapping[str, str]) -> int:
    """The script's exit status from a job record's ExitCode=STATUS:SIGNAL."""
    return int(record.get("ExitCode", "0:0").split(":")[0])


@dataclass(frozen=True)
class LocalSlurm:
    directory: Path
    env: dict[str, str]

    def run(self, args: Sequence[str], *, timeout: float, cwd: Path | None = None) -> subprocess.CompletedProcess:
        """Run a command in this cluster's environment; output captured as text."""
        return subprocess.run([str(a) for a in args], env=self.env, cwd=cwd, capture_output=True, text=True,
                              timeout=timeout)

    def srun(self, ntasks: int, *command: str | os.PathLike, mpi: str = "pmi2", timeout: float = 120,
             cwd: Path | None = None, kill_on_bad_exit: bool = True) -> subprocess.CompletedProcess:
        """`srun -n NTASKS --mpi=MPI COMMAND`; a task that fails takes the others down instead of leaving them
        waiting (unless kill_on_bad_exit=False: for tasks that all fail alike, so that every exit code counts)."""
        return self.run(["srun", f"--ntasks={ntasks}", f"--mpi={mpi}", f"--kill-on-bad-exit={int(kill_on_bad_exit)}",
                         *command], timeout=timeout, cwd=cwd)

    def sbatch_wait(self, *args: str | os.PathLike, timeout: float = 120,
                    cwd: Path | None = None) -> subprocess.CompletedProcess:
        """`sbatch --wait ARGS`: returns when the job (every task of an array) has ended; the exit
        status is the job's (an array's highest)."""
        return self.run(["sbatch", "--wait", *args], timeout=timeout, cwd=cwd)

    def submit(self, *args: str | os.PathLike, cwd: Path | None = None) -> str:
        """`sbatch ARGS` without waiting; returns the job id."""
        done = self.run(["sbatch", "--parsable", *args], timeout=30, cwd=cwd)
        if done.returncode != 0:
            raise RuntimeError(f"sbatch failed: {done.stderr.strip()}")
        return done.stdout.strip().split(";")[0]

    def jobs(self, job_id: str) -> list[dict[str, str]]:
        """The job's records (one per array task); empty once Slurm has forgotten it (MinJobAge)."""
        done = self.run(["scontrol", "-o", "show", "job", job_id], timeout=30)
        return parse_job_records(done.stdout) if done.returncode == 0 else []

    def wait_until(self, job_id: str, states: frozenset[str], *, timeout: float) -> dict[str, str]:
        """Poll until the (single) job is in one of `states`; returns its record."""
        deadline = time.monotonic() + timeout
        record: dict[str, str] = {}
        while time.monotonic() < deadline:
            records = self.jobs(job_id)
            if records:
                record = records[0]
                if record.get("JobState") in states:
                    return record
            time.sleep(0.25)
        raise TimeoutError(f"job {job_id} not in {sorted(states)} after {timeout} s: {record.get('JobState')}")

    def scancel(self, job_id: str, *options: str) -> subprocess.CompletedProcess:
        return self.run(["scancel", *options, job_id], timeout=30)

    def log_tail(self, lines: int = 30) -> str:
        """The daemons' last log lines, for a failing test's message."""
        out = []
        for name in ("log/slurmctld.log", "log/slurmd.log"):
            path = self.directory / name
            if path.exists():
                out.append(f"--- {path}\n" + "\n".join(path.read_text(errors="replace").splitlines()[-lines:]))
        return "\n".join(out)


def _installable() -> bool:
    return os.geteuid() == 0 and shutil.which("apt-get") is not None


def start_local_slurm() -> LocalSlurm:
    """Start the private cluster (installing slurm-wlm first when missing and possible)."""
    if not all(d.exists() for d in DAEMONS):
        if not _installable():
            raise SlurmUnavailable("slurm-wlm/munge are not installed and cannot be (needs root and apt-get)")
        installing = subprocess.run(["bash", str(SCRIPT), "install"], capture_output=True, text=True, timeout=900)
        if installing.returncode != 0:
            raise SlurmUnavailable(f"installing slurm-wlm and munge failed: {installing.stderr.strip()[-500:]}")
    if os.geteuid() != 0:
        raise SlurmUnavailable("the local Slurm runs its daemons as root; the tests are not running as root")
    started = subprocess.run(["bash", str(SCRIPT), "start"], capture_output=True, text=True, timeout=120)
    if started.returncode != 0:
        raise RuntimeError(f"tests/local_slurm.sh start failed:\n{started.stdout}{started.stderr}")
    exports = dict(pair.split("=", 1) for pair in shlex.split(started.stdout.strip().splitlines()[-1])[1:])
    directory = Path(exports["LOCAL_SLURM_DIR"])
    return LocalSlurm(directory=directory, env=job_env(os.environ, Path(exports["SLURM_CONF"])))


def stop_local_slurm(slurm: LocalSlurm) -> None:
    subprocess.run(["bash", str(SCRIPT), "stop", str(slurm.directory)], capture_output=True, timeout=120)
