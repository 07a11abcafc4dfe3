-- Lmod modulefile for hpcrender: `module use /path/to/hpcrender/modules; module load hpcrender`.
-- It puts the venv that env/install-site.sh built on PATH. Lines marked SITE are for the site to
-- fill in: the modules the venv was built against must also be loaded when it runs.

help([[
hpcrender 0.1.0 - batch renderer for diffusion models on HPC clusters: one image on many GPUs
(DistriFusion-style patch parallelism over MPI ranks), TOML manifests of many jobs, HDF5 tile
store, pyramidal export of gigapixel images.

  srun -n 4 hpcrender render MANIFEST --out DIR
  sbatch $HPCRENDER_HOME/jobs/single.sbatch MANIFEST     (also array.sbatch, gigapixel.sbatch)
  hpcrender --help

Installation and pitfalls: $HPCRENDER_HOME/env/README.md
]])

whatis("Name: hpcrender")
whatis("Version: 0.1.0")
whatis("Description: batch renderer for diffusion models on HPC clusters (MPI, Slurm, gigapixel)")

-- The install: by default the checkout this file sits in (ROOT/modules/hpcrender/0.1.0.lua), with
-- the venv env/install-site.sh creates at ROOT/.venv. A site that copies this file to its own
-- module tree writes the checkout's path here instead.
local root = myFileName():match("^(.*)/modules/hpcrender/[^/]+%.lua$") or "/opt/hpcrender/0.1.0"
local venv = pathJoin(root, ".venv")

-- SITE: the Python, CUDA and MPI modules the venv was built with. torch's CUDA build and mpi4py's
-- MPI are bound to them; another MPI at run time fails at start-up or gives one-rank worlds.
-- depends_on("python/3.11")
-- depends_on("cuda/12.4")
-- depends_on("openmpi/4.1")        -- or mpich, cray-mpich, intel-mpi

-- SITE: the PMI that srun must speak to this MPI when the site's MpiDefault does not fit:
-- pmix for Open MPI, pmi2 for MPICH-family MPIs. The wrong one gives N separate one-rank worlds.
-- setenv("SLURM_MPI_TYPE", "pmix")

-- SITE: a shared model cache, filled from a login node (compute nodes are often offline).
-- setenv("HF_HOME", "/shared/models/huggingface")
-- setenv("HF_HUB_OFFLINE", "1")

setenv("HPCRENDER_HOME", root)
-- The venv's own interpreter finds its packages; activating the venv is not needed.
prepend_path("PATH", pathJoin(venv, "bin"))

-- Threads per rank: only inside an allocation and only when the user has not chosen. At login the
-- allocation is unknown, and a value set there would travel into every job (sbatch exports the
-- environment) and override hpcrender's own choice (SLURM_CPUS_PER_TASK, else cores / ranks).
local cpus = os.getenv("SLURM_CPUS_PER_TASK")
if cpus and os.getenv("OMP_NUM_THREADS") == nil then
    setenv("OMP_NUM_THREADS", cpus)
end

if mode() == "load" and not isDir(venv) then
    LmodMessage("hpcrender: no venv at " .. venv .. "; build it with " .. pathJoin(root, "env/install-site.sh"))
end
