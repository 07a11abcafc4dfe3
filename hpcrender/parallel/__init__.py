"""Displaced patch parallelism (DistriFusion) for diffusers UNets, diffusion transformers and the VAE: bands.py does
the arithmetic, parallelize.py puts the band layers around a model, exchange.py moves the data.

May import: the input (config, errors) only; it knows nothing of manifests, Slurm, stores or the work queue.
"""
