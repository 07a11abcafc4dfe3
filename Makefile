# hpcrender: set-up, demo and tests on a fresh machine.
#   make demo   - .venv + render jobs/demo.toml on 2 MPI ranks into out/demo/
#   make test   - .venv + the whole test suite (MPI and local-Slurm tests included)

PYTHON ?= python3
VENV   ?= .venv
# The CPU wheel on machines without a GPU; on clusters install the site's CUDA build first (env/).
TORCH_SPEC ?= torch==2.13.0
PIP    = $(VENV)/bin/pip
RANKS  ?= 2
# pytest workers: each test file runs whole on one worker (its module fixtures once).
TEST_WORKERS ?= 2

.PHONY: venv demo test slurm-deps viewer-deps reader-deps clean

venv: $(VENV)/.installed

$(VENV)/.installed: setup.cfg pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q "$(TORCH_SPEC)"
	$(PIP) install -q mpich
	$(PIP) install -q -e '.[test]'
	@touch $@

demo: venv
	$(VENV)/bin/mpiexec -n $(RANKS) $(VENV)/bin/hpcrender render jobs/demo.toml --out out/demo

# Debian's Slurm and munge for the local one-node Slurm that the tests start (root only).
slurm-deps:
	@if command -v slurmctld >/dev/null 2>&1; then :; \
	elif [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	  echo "installing slurm-wlm and munge"; \
	  apt-get update -qq >/dev/null && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq slurm-wlm munge >/dev/null; \
	else echo "slurm-wlm missing and not root: the Slurm tests will be skipped"; fi

# Chromium, in which the tests open a DeepZoom export's OpenSeadragon page headless (root only).
viewer-deps:
	@if command -v chromium >/dev/null 2>&1 || command -v chromium-browser >/dev/null 2>&1; then :; \
	elif [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	  echo "installing chromium"; \
	  apt-get update -qq >/dev/null && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null; \
	else echo "chromium missing and not root: the DeepZoom viewer test will be skipped"; fi

# Other readers of the outputs (root only): Debian's HDF5 1.10 tools, which the store tests read every dataset with,
# and OpenSlide's and libvips' command-line tools for the TIFF tests.
reader-deps:
	@if command -v h5dump >/dev/null 2>&1 && command -v openslide-show-properties >/dev/null 2>&1 \
	  && command -v vips >/dev/null 2>&1; then :; \
	elif [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	  echo "installing hdf5-tools, openslide-tools and libvips-tools"; \
	  apt-get update -qq >/dev/null && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq hdf5-tools \
	    openslide-tools libvips-tools >/dev/null; \
	else echo "hdf5-tools, openslide-tools or libvips-tools missing and not root: the HDF5 reader and TIFF" \
	  "reader tests will be skipped"; fi

test: venv slurm-deps viewer-deps reader-deps
	$(VENV)/bin/python -m pytest -n $(TEST_WORKERS) --dist loadfile

clean:
	rm -rf $(VENV) out build *.egg-info
