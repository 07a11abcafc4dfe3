"""What a render leaves behind: tile and level stores (HDF5), exports (PNG, TIFF, DeepZoom and its viewer), records
(meta.json, status.json, job states), atomic writes.

May import: the input (config, errors) only; no torch, no torch.distributed: the stores and exports read alike after
the run.
"""
