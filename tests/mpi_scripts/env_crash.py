"""One rank fails inside `guarded` while the others wait in a collective: the whole world must end.

usage: env_crash.py FAILING_RANK (runtime|badinput) [--debug]
"""

from __future__ import annotations

import sys

import torch
import torch.distributed as dist

from hpcrender.errors import BadInput
from hpcrender.run.environment import World, guarded

failing, kind = int(sys.argv[1]), sys.argv[2]
world = World.start()
with guarded(world, debug="--debug" in sys.argv):
    world.init_torch_distributed()
    if world.env.rank == failing:
        if kind == "badinput":
            raise BadInput("width must be a multiple of 8")
        raise RuntimeError("boom in the denoising loop")
    dist.all_reduce(torch.ones(1))  # never completes: the failing rank does not join
print("unreachable: a collective completed without the failing rank", flush=True)
