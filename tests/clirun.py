"""Running the installed `hpcrender` command from tests: as one plain process or under the venv's mpiexec."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

VENV_BIN = Path(sys.executable).parent
HPCRENDER = VENV_BIN / "hpcrender"
MPIEXEC = VENV_BIN / "mpiexec"


def clean_env(**extra: str) -> dict[str, str]:
    """One thread per rank (2 cores), never the network."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PMI_", "SLURM_", "HYDRA_", "MPI_"))}
    env.update({"OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"})
    env.update(extra)
    return env


def hpcrender(*args: str, ranks: int | None = None, timeout: float = 300, cwd=None, **env) -> subprocess.CompletedProcess:
    """`hpcrender ARGS` (ranks=None) or `mpiexec -n RANKS hpcrender ARGS`."""
    cmd = [str(HPCRENDER), *map(str, args)]
    if ranks is not None:
        cmd = [str(MPIEXEC), "-n", str(ranks), *cmd]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=clean_env(**env), cwd=cwd)


def write_manifest(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def status_of(out: Path) -> dict:
    return json.loads((out / "status.json").read_text())


def meta_of(out: Path, job: str) -> dict:
    return json.loads((out / job / "meta.json").read_text())
