#!/usr/bin/env bash
# The GPU measurements of BENCHMARKS.md in one run on a machine with one CUDA GPU; every output under OUT.
#
#   benchmarks/device.sh OUT                   builtin:sdxl, fp16: diffusers' own loop against hpcrender on one
#                                              rank at 1024, 2048 and 3840 px square, and at 3840 px the projected
#                                              displaced scaling to 2, 4 and 8 GPUs (bench --project)
#   DEVICE_SMOKE=1 benchmarks/device.sh OUT    the same steps with the tiny builtin model at small sizes on
#                                              whatever device there is: checks the script itself
#
# Run from the repository root. The checkout is imported from PYTHONPATH (nothing is installed); Python packages
# missing on the machine can be given as wheels in .whl/ (installed into /tmp/site). The lent H200 image has
# torch, h5py, mpi4py, click, pillow and tifffile but no diffusers: before the run, here,
#   python3 -m pip download --no-deps --only-binary=:all: -d .whl diffusers==0.42.1
# (.whl/ ignored by git, carried with the run). Each bench has its own time limit (DEVICE_STEP_TIMEOUT, seconds),
# so a hang costs one measurement, not the machine's time.
set -uo pipefail

out=${1:?usage: benchmarks/device.sh OUT}
mkdir -p "$out"
py=${PYTHON:-python3}
limit=${DEVICE_STEP_TIMEOUT:-300}
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1

if compgen -G ".whl/*.whl" > /dev/null; then
    "$py" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
        || { echo "device.sh: installing .whl/ failed" >&2; exit 1; }
    export PYTHONPATH="$PYTHONPATH:/tmp/site"
fi

if [ -n "${DEVICE_SMOKE:-}" ]; then
    model=builtin:tiny-sdxl sizes="128" largest=256 steps=4 dtype=float32
else
    model=builtin:sdxl sizes="1024 2048" largest=3840 steps=6 dtype=float16
fi

{
    echo "date: $(date -u +%Y-%m-%dT%H:%M:%SZ)"
    echo "commit: $(git rev-parse HEAD 2>/dev/null || echo unknown)"
    command -v nvidia-smi > /dev/null && nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
    "$py" -c "import sys, torch, diffusers; print('python', sys.version.split()[0], '| torch', torch.__version__,
'| cuda', torch.version.cuda, '| diffusers', diffusers.__version__, '| gpu', torch.cuda.is_available() and
torch.cuda.get_device_name(0))"
} > "$out/machine.txt" 2>&1
cat "$out/machine.txt"

failed=0
bench() {  # NAME ARGS...: one bench, its table in NAME.txt and its JSON in NAME.json
    local name=$1; shift
    echo "== $name: hpcrender bench $*"
    if timeout "$limit" "$py" -m hpcrender bench --model "$model" --steps "$steps" --dtype "$dtype" \
            --json "$out/$name.json" "$@" > "$out/$name.txt" 2>&1; then
        grep -v '^\[transformers\]' "$out/$name.txt"
    else
        echo "device.sh: $name failed (exit $?); the end of its output:"; tail -20 "$out/$name.txt"; failed=1
    fi
}

for size in $sizes; do
    bench "bench-$size" --size "${size}x${size}"
done
# The largest size once: its one-rank rows and the projection from them.
bench "bench-$largest-project" --size "${largest}x${largest}" --project 2,4,8

exit $failed
