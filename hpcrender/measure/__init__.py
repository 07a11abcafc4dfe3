"""Measuring renders: `bench` (time per step, memory, against diffusers' own pipeline), `verify` (a parallel mode
against one process), projections to K ranks, image metrics.

May import: anything below the CLI (run, render, parallel, models, output, the input); only cli.py imports it.
"""
