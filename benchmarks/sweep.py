"""Images per second of a sweep: plain diffusers' loop against `hpcrender render` of the same samples, in one run.

Plain diffusers is what a user writes instead: the pipeline called once per prompt with its seed's generator (or,
batched, with a list of prompts and a list of generators) and each image saved as a PNG, in P processes of one thread
each, the samples split between them. hpcrender renders the same prompts and seeds as a [[sweeps]] table into tar
shards, on 1 and 2 ranks of one thread. Each side is timed at two sweep sizes and the per-image cost is the marginal
one, (t(N2) - t(N1)) / (N2 - N1), where t is the time of the slowest process's loop (diffusers: after its pipeline
was built; hpcrender: its busiest rank group's time on shards, OUT/.state/groups): the start-up of the processes
(imports, building the model, the plan) varies by seconds between runs, so it is printed apart, from the walls.

    .venv/bin/python benchmarks/sweep.py --model builtin:tiny-sd --size 64 --steps 1 --samples 40,400 \\
        --ranks 1,2 --batch 1,4 --json out/sweep-bench.json
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

VENV_BIN = Path(sys.executable).parent
# Samples per shard: small, so that the ranks' last shards end close together (the run's rate is its slowest rank's).
SHARD = 10
PLAIN = """
import sys, time, torch
from pathlib import Path
from hpcrender.models import load_pipeline
model, side, steps, batch, out = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), Path(sys.argv[5])
samples = [tuple(line.split("\\t")) for line in sys.stdin.read().splitlines()]
pipe = load_pipeline(model)
pipe.set_progress_bar_config(disable=True)
ready = time.perf_counter()
for k in range(0, len(samples), batch):
    chunk = samples[k:k + batch]
    images = pipe(prompt=[p for _, p, _ in chunk], height=side, width=side, num_inference_steps=steps,
                  guidance_scale=5.0, generator=[torch.Generator("cpu").manual_seed(int(s)) for _, _, s in chunk]).images
    for (name, _, _), image in zip(chunk, images):
        image.save(out / f"{name}.png")
print(time.perf_counter() - ready)
"""


def env() -> dict:
    e = {k: v for k, v in os.environ.items() if not k.startswith(("PMI_", "SLURM_", "HYDRA_", "MPI_"))}
    e.update(OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", TRANSFORMERS_VERBOSITY="error", DIFFUSERS_VERBOSITY="error")
    return e


def samples(n: int) -> list[tuple[str, str, int]]:
    """(name, prompt, seed): 10 seeds per prompt, as the sweep's rows x seeds make them."""
    return [(f"s-{i:07d}", f"a photograph of subject {i // 10}", i % 10) for i in range(n)]


def plain(model: str, side: int, steps: int, batch: int, n: int, procs: int, folder: Path) -> tuple[float, float]:
    """(wall seconds of the whole run, seconds of its slowest process after the model was built)."""
    work = samples(n)
    started = time.perf_counter()
    running = []
    for p in range(procs):
        share = work[p::procs]
        proc = subprocess.Popen([sys.executable, "-c", PLAIN, model, str(side), str(steps), str(batch), str(folder)],
                                stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env())
        proc.stdin.write("".join(f"{a}\t{b}\t{c}\n" for a, b, c in share))
        proc.stdin.close()
        running.append(proc)
    loops = [float(proc.stdout.read().strip().splitlines()[-1]) for proc in running]
    if any(proc.wait() for proc in running):
        raise SystemExit("plain diffusers loop failed")
    return time.perf_counter() - started, max(loops)


def hpcrender(model: str, side: int, steps: int, batch: int, n: int, ranks: int, folder: Path) -> tuple[float, float]:
    """(wall seconds of the whole run, seconds its busiest rank group spent on shards: OUT/.state/groups)."""
    prompts = folder / "prompts.txt"
    prompts.write_text("".join(f"a photograph of subject {r}\n" for r in range(n // 10)))
    manifest = folder / "sweep.toml"
    manifest.write_text(f'[defaults]\nmodel = "{model}"\nsteps = {steps}\nwidth = {side}\nheight = {side}\n'
                        f'guidance_scale = 5.0\n\n[[sweeps]]\nname = "s"\nprompts_file = "prompts.txt"\n'
                        f'seeds = {{ start = 0, count = 10 }}\nbatch = {batch}\nshard_size = {SHARD}\n')
    cmd = [str(VENV_BIN / "hpcrender"), "render", str(manifest), "--out", str(folder / "out")]
    if ranks > 1:
        cmd = [str(VENV_BIN / "mpiexec"), "-n", str(ranks), *cmd]
    started = time.perf_counter()
    done = subprocess.run(cmd, capture_output=True, text=True, env=env())
    if done.returncode:
        raise SystemExit(done.stderr)
    wall = time.perf_counter() - started
    groups = [json.loads(p.read_text()) for p in (folder / "out" / ".state" / "groups").glob("*.json")]
    return wall, max(g["busy_seconds"] for g in groups)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="builtin:tiny-sd")
    ap.add_argument("--size", type=int, default=64)
    ap.add_argument("--steps", type=int, default=1)
    ap.add_argument("--samples", default="40,400", help=f"N1,N2: two sweep sizes, multiples of {SHARD}")
    ap.add_argument("--ranks", default="1,2")
    ap.add_argument("--batch", default="1,4")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    n1, n2 = (int(v) for v in args.samples.split(","))
    rows = []
    for batch in (int(b) for b in args.batch.split(",")):
        for ranks in (int(r) for r in args.ranks.split(",")):
            timing = {}
            for side_name, run in (("diffusers", plain), ("hpcrender", hpcrender)):
                walls, loops = [], []
                for n in (n1, n2):
                    with tempfile.TemporaryDirectory(prefix="sweep-bench-") as tmp:
                        wall, loop = run(args.model, args.size, args.steps, batch, n, ranks, Path(tmp))
                    walls.append(wall)
                    loops.append(loop)
                per_image = (loops[1] - loops[0]) / (n2 - n1)
                timing[side_name] = {"wall_s": [round(w, 3) for w in walls], "loop_s": [round(t, 3) for t in loops],
                                     "per_image_s": per_image, "start_s": walls[0] - loops[0]}
            d, h = timing["diffusers"]["per_image_s"], timing["hpcrender"]["per_image_s"]
            row = {"batch": batch, "processes": ranks, "diffusers_img_per_s": 1 / d, "hpcrender_img_per_s": 1 / h,
                   "hpcrender_over_diffusers": h / d - 1, "timing": timing}
            rows.append(row)
            print(f"batch {batch}, {ranks} process(es)/rank(s): diffusers {1 / d:7.2f} img/s, hpcrender "
                  f"{1 / h:7.2f} img/s ({100 * (h / d - 1):+.1f} % per image); start-up diffusers "
                  f"{timing['diffusers']['start_s']:.1f} s, hpcrender {timing['hpcrender']['start_s']:.1f} s",
                  flush=True)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"model": args.model, "size": args.size, "steps": args.steps,
                                         "samples": [n1, n2], "rows": rows}, indent=2) + "\n")


if __name__ == "__main__":
    main()
