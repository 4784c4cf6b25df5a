"""The numerics a job computes in: ``train.precision`` and ``train.memory_format``.

One place for both, so that every method and engine runs in them alike: ``train.fit`` (and
``decoupled evaluate``) enter ``autocast`` around everything a job computes (forward passes of
the modules, the aux heads, DNI's synthesizers, DDG's stored graphs, the quantizers, the
evaluation), and ``place`` lays the network out once it is built.

* ``bf16``: ``torch.autocast`` with bfloat16. Convolutions and matrix products run in bf16; the
  parameters, their gradients, the optimizers' state and the losses stay float32 (autocast keeps
  losses and reductions in float32), so no loss scaling is needed. The activations handed from
  one module to the next are bf16, which halves the bytes the distributed engine sends.
* ``channels_last``: the network's convolution weights in NHWC order; a convolution then writes
  its output in that order too, so the whole forward pass runs in it (the images need no copy).
"""

from __future__ import annotations

import contextlib

import torch

PRECISIONS = {"fp32": None, "bf16": torch.bfloat16}
MEMORY_FORMATS = {"contiguous": torch.contiguous_format, "channels_last": torch.channels_last}


def autocast(train_cfg: dict, device: torch.device | str):
    """The job's precision as a context: autocast to bf16, or nothing for fp32."""
    dtype = PRECISIONS[train_cfg.get("precision", "fp32")]
    if dtype is None:
        return contextlib.nullcontext()
    # No cast cache: autocast keeps each weight's bf16 copy until its outermost context exits,
    # and this one spans the whole job, so a cached copy would freeze the weights as they were
    # at the first step.
    return torch.autocast(torch.device(device).type, dtype=dtype, cache_enabled=False)


def place(net: torch.nn.Module, train_cfg: dict) -> torch.nn.Module:
    """``net`` in the job's memory format (in place; returned for chaining)."""
    memory_format = MEMORY_FORMATS[train_cfg.get("memory_format", "contiguous")]
    if memory_format is not torch.contiguous_format:
        net.to(memory_format=memory_format)
    return net
