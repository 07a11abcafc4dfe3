"""The cluster-facing files without a cluster: shell syntax, sbatch directive placement, example
manifests, the conda file's packages, the Lmod modulefile, and the Slurm fixture's pure parts."""

from __future__ import annotations

import configparser
import os
import re
import subprocess
from pathlib import Path

import pytest

import slurm_fixture
from slurm_fixture import VENV_BIN, SlurmUnavailable, exit_status, job_env, parse_job_records

REPO = Path(__file__).resolve().parent.parent
HPCRENDER = VENV_BIN / "hpcrender"
SKIP_DIRS = {".git", ".venv", "out", "build", "node_modules", "__pycache__"}
LMOD = Path(os.environ.get("LMOD_CMD", "/usr/share/lmod/lmod/libexec/lmod"))
TEMPLATES = sorted((REPO / "jobs").glob("*.sbatch"))
EXAMPLES = sorted((REPO / "jobs" / "examples").glob("*.toml"))


def shell_scripts() -> list[Path]:
    found = []
    for root, dirs, files in os.walk(REPO):
        dirs[:] = [d for d in dirs if d not in SKIP_DIRS and not d.startswith(".venv")]
        found += [Path(root) / f for f in files if f.endswith((".sh", ".sbatch"))]
    return sorted(found)


def test_the_cluster_files_are_there():
    names = {p.relative_to(REPO).as_posix() for p in shell_scripts()}
    assert {"jobs/single.sbatch", "jobs/array.sbatch", "jobs/gigapixel.sbatch", "env/install-site.sh",
            "tests/local_slurm.sh"} <= names
    assert len(EXAMPLES) >= 4


@pytest.mark.parametrize("script", shell_scripts(), ids=lambda p: p.relative_to(REPO).as_posix())
def test_shell_script_parses(script: Path):
    done = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr


def sbatch_directives_after_commands(text: str) -> list[str]:
    """#SBATCH lines that sbatch ignores: it stops reading directives at the first command."""
    late, commands_started = [], False
    for line in text.splitlines():
        stripped = line.strip()
        if stripped.startswith("#SBATCH") and commands_started:
            late.append(stripped)
        elif stripped and not stripped.startswith("#"):
            commands_started = True
    return late


def test_late_sbatch_directive_is_found():
    assert sbatch_directives_after_commands("#!/bin/bash\n#SBATCH -n 2\nset -e\n#SBATCH --requeue\n") == [
        "#SBATCH --requeue"]
    assert sbatch_directives_after_commands("#!/bin/bash\n# note\n\n#SBATCH -n 2\n##SBATCH -p gpu\necho\n") == []


@pytest.mark.parametrize("template", TEMPLATES, ids=lambda p: p.name)
def test_sbatch_template_directives_all_come_before_the_first_command(template: Path):
    text = template.read_text()
    assert text.startswith("#!/bin/bash")
    assert sbatch_directives_after_commands(text) == []
    assert gpu_layout(text) is not None


def gpu_layout(text: str) -> int | None:
    """N when a template asks for N tasks and N GPUs per node and nothing per task (each task then sees all of its
    node's GPUs and takes the one of its local rank, and NCCL can use NVLink between them); else None."""
    directives = dict(re.findall(r"^#SBATCH --([\w-]+)=(\S+)", text, re.M))
    if "gpus-per-task" in directives or "gres" in directives:
        return None
    tasks, gpus = directives.get("ntasks-per-node"), directives.get("gpus-per-node")
    return int(tasks) if tasks is not None and tasks == gpus and tasks.isdigit() else None


def test_gpu_layout_wants_as_many_gpus_as_tasks_per_node_and_none_per_task():
    assert gpu_layout("#SBATCH --ntasks-per-node=4\n#SBATCH --gpus-per-node=4\n") == 4
    assert gpu_layout("#SBATCH --ntasks=4\n#SBATCH --gpus-per-task=1\n") is None
    assert gpu_layout("#SBATCH --ntasks-per-node=4\n#SBATCH --gpus-per-node=4\n#SBATCH --gpus-per-task=1\n") is None
    assert gpu_layout("#SBATCH --ntasks-per-node=4\n#SBATCH --gpus-per-node=2\n") is None
    assert gpu_layout("#SBATCH --ntasks-per-node=2\n") is None


def test_overnight_template_asks_for_the_warning_signal_requeue_and_an_appended_log():
    directives = re.findall(r"^#SBATCH (\S+)", (REPO / "jobs" / "gigapixel.sbatch").read_text(), re.M)
    assert {"--requeue", "--open-mode=append"} <= set(directives)
    assert any(re.fullmatch(r"--signal=B:USR1@\d+", d) for d in directives)


def hpcrender_validate_available() -> bool:
    if not HPCRENDER.exists():
        return False
    return subprocess.run([str(HPCRENDER), "validate", "--help"], capture_output=True).returncode == 0


@pytest.mark.parametrize("example", EXAMPLES, ids=lambda p: p.name)
def test_example_manifest_is_valid(example: Path):
    if not hpcrender_validate_available():
        pytest.skip("hpcrender validate is not available")
    done = subprocess.run([str(HPCRENDER), "validate", str(example)], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.rstrip().endswith("OK")


def conda_names(dependencies: list) -> set[str]:
    names = set()
    for dep in dependencies:
        if isinstance(dep, str):
            spec = dep.split("::")[-1]
            names.add(re.split(r"[\s=<>!\[]", spec, maxsplit=1)[0].lower())
    return names


def test_conda_environment_has_every_runtime_requirement():
    yaml = pytest.importorskip("yaml")
    env = yaml.safe_load((REPO / "env" / "environment.yml").read_text())
    have = conda_names(env["dependencies"])
    assert "python=3.11" in env["dependencies"]
    assert {"pytorch-cuda", "mpi4py"} <= have
    cfg = configparser.ConfigParser()
    cfg.read(REPO / "setup.cfg")
    required = {re.split(r"[\s=<>!~\[;]", r.strip(), maxsplit=1)[0].lower()
                for r in cfg["options"]["install_requires"].splitlines() if r.strip()}
    # conda calls torch "pytorch".
    missing = {("pytorch" if r == "torch" else r) for r in required} - have
    assert not missing


def test_site_install_stops_before_building_anything_without_the_mpi_compiler(tmp_path):
    venv = tmp_path / "venv"
    done = subprocess.run(["bash", str(REPO / "env" / "install-site.sh")], capture_output=True, text=True,
                          env={**os.environ, "VENV": str(venv), "MPICC": str(tmp_path / "no-mpicc"),
                               "PYTHON": str(VENV_BIN / "python")}, timeout=60)
    assert done.returncode != 0
    assert "load the site's MPI module" in done.stderr
    assert not venv.exists()


def lmod_env(command: str, environ: dict[str, str]) -> dict[str, str]:
    """The environment after `module COMMAND hpcrender` with this checkout's modules/ on MODULEPATH."""
    script = f'eval "$("{LMOD}" bash {command} hpcrender)" && env -0'
    done = subprocess.run(["bash", "-c", script], capture_output=True, text=True, timeout=60,
                          env={**environ, "MODULEPATH": str(REPO / "modules")})
    assert done.returncode == 0, done.stderr
    return dict(item.split("=", 1) for item in done.stdout.split("\0") if "=" in item)


@pytest.fixture
def base_env() -> dict[str, str]:
    if not LMOD.exists():
        pytest.skip("Lmod is not installed (Debian: apt-get install lmod)")
    return {k: v for k, v in os.environ.items()
            if k not in ("OMP_NUM_THREADS", "SLURM_CPUS_PER_TASK", "HPCRENDER_HOME", "LOADEDMODULES")
            and not k.startswith(("_ModuleTable", "__LMOD", "_LMFILES_"))}


def test_module_load_puts_the_checkout_venv_first_on_path(base_env):
    loaded = lmod_env("load", base_env)
    assert loaded["PATH"].split(os.pathsep)[0] == str(REPO / ".venv" / "bin")
    assert loaded["HPCRENDER_HOME"] == str(REPO)
    # Outside an allocation the thread count is left to hpcrender.
    assert "OMP_NUM_THREADS" not in loaded


def test_module_sets_threads_from_the_allocation_only_when_unset(base_env):
    assert lmod_env("load", {**base_env, "SLURM_CPUS_PER_TASK": "6"})["OMP_NUM_THREADS"] == "6"
    chosen = {**base_env, "SLURM_CPUS_PER_TASK": "6", "OMP_NUM_THREADS": "2"}
    assert lmod_env("load", chosen)["OMP_NUM_THREADS"] == "2"


def test_job_env_drops_foreign_slurm_and_pmi_variables_and_puts_the_venv_first(tmp_path):
    base = {"PATH": f"/usr/bin{os.pathsep}/venv/bin", "SLURM_JOB_ID": "77", "SLURM_CONF": "/etc/slurm.conf",
            "PMI_RANK": "3", "SRUN_CPUS_PER_TASK": "8", "HOME": "/root", "PYTHONHOME": "/x"}
    env = job_env(base, tmp_path / "slurm.conf", Path("/venv/bin"))
    assert env["SLURM_CONF"] == str(tmp_path / "slurm.conf")
    assert env["PATH"] == f"/venv/bin{os.pathsep}/usr/bin"
    assert env["VIRTUAL_ENV"] == "/venv"
    assert env["OMP_NUM_THREADS"] == "1"
    assert env["HOME"] == "/root"
    assert not {"SLURM_JOB_ID", "PMI_RANK", "SRUN_CPUS_PER_TASK", "PYTHONHOME"} & set(env)


def test_job_records_parse_one_per_array_task_with_exit_status():
    text = ("JobId=12 ArrayJobId=11 ArrayTaskId=4 JobName=two words JobState=COMPLETED ExitCode=0:0\n"
            "JobId=13 ArrayJobId=11 ArrayTaskId=7 JobName=x JobState=FAILED Restarts=1 Socks/Node=* ExitCode=3:0\n")
    records = parse_job_records(text)
    assert [r["ArrayTaskId"] for r in records] == ["4", "7"]
    assert records[0]["JobName"] == "two words" and records[1]["Socks/Node"] == "*"
    assert [exit_status(r) for r in records] == [0, 3]
    assert records[1]["Restarts"] == "1"


def test_a_session_without_root_gets_a_skip_reason_not_a_failure(monkeypatch):
    monkeypatch.setattr(slurm_fixture.os, "geteuid", lambda: 1000)
    with pytest.raises(SlurmUnavailable, match="root"):
        slurm_fixture.start_local_slurm()
