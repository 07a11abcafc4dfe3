"""Running a manifest over the world: where we run (environment), the pure run plan and schedule, the MPI work queue,
a group's protocol, the job kinds and the runner's loop, progress.

May import: render, gigapixel (its job kind), parallel (groups), models, output and the input (config, manifest,
errors). Nothing below imports run, except the gigapixel kind (its interface: kinds, protocol, environment, progress).
"""
