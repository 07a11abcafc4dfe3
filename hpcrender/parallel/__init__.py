"""Displaced patch parallelism (DistriFusion) for diffusers UNets and the VAE decoder: bands.py does the arithmetic,
plan.py puts the band layers (conv.py, groupnorm.py, attention.py) around a model and exchange.py moves the data."""
