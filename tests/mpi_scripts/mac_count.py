"""Multiply-accumulates of a model's forward as it runs, counted from the products it performs: forward hooks on
every nn.Linear, and every F.conv2d and F.scaled_dot_product_attention call (band convolutions and band attention
call those directly), from their operands' shapes."""

from __future__ import annotations

from contextlib import contextmanager

import torch.nn.functional as F
from torch import nn


@contextmanager
def counted_macs(model: nn.Module):
    """Yields a one-element list that holds the MACs performed inside the block."""
    total = [0]
    conv2d, attention = F.conv2d, F.scaled_dot_product_attention

    def counting_conv2d(x, weight, *args, **kwargs):
        out = conv2d(x, weight, *args, **kwargs)
        total[0] += out.numel() * weight.shape[1] * weight.shape[2] * weight.shape[3]
        return out

    def counting_attention(query, key, value, *args, **kwargs):
        batch, heads, queries, depth = query.shape
        total[0] += batch * heads * queries * key.shape[2] * (depth + value.shape[3])
        return attention(query, key, value, *args, **kwargs)

    def on_linear(module, inputs, output):
        total[0] += inputs[0].numel() // module.in_features * module.in_features * module.out_features

    hooks = [m.register_forward_hook(on_linear) for m in model.modules() if isinstance(m, nn.Linear)]
    F.conv2d, F.scaled_dot_product_attention = counting_conv2d, counting_attention
    try:
        yield total
    finally:
        F.conv2d, F.scaled_dot_product_attention = conv2d, attention
        for hook in hooks:
            hook.remove()
