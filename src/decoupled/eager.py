"""torch without ``torch._dynamo``: what a job's start-up need not import.

Some of torch's eager code imports ``torch._dynamo`` (a few seconds of each process's start-up;
benchmarks/pipeline_wall.py measures it) only to mark where ``torch.compile`` must not trace:

* functions wrapped by ``torch._disable_dynamo`` (the optimizers' ``add_param_group``,
  ``zero_grad``, ``state_dict``, ``load_state_dict``; a dispatch mode's ``__torch_dispatch__``,
  as ``FlopCounterMode``'s) build a "do not compile" guard on their first call;
* an optimizer's ``step`` ends its no-grad region with ``torch._dynamo.graph_break()``.

Nothing in this package runs under ``torch.compile``, so it skips both; what runs is the same.
"""

from __future__ import annotations

import torch
import torch._compile

_GUARD_WRAPPER_CODE = torch._compile._disable_dynamo(lambda: None).__code__


def prebuild_guards(cls: type) -> type:
    """Give each of ``cls``'s guarded methods itself as its guard, where the wrapper looks first."""
    for klass in cls.__mro__:
        for attribute in vars(klass).values():
            if getattr(attribute, "__code__", None) is _GUARD_WRAPPER_CODE:
                setattr(attribute.__wrapped__, "__dynamo_disable", attribute.__wrapped__)
    return cls


def optimizer(optimizer_class: type[torch.optim.Optimizer]) -> type[torch.optim.Optimizer]:
    """``optimizer_class`` whose ``step`` is the same update, run without the graph break."""
    step = optimizer_class.step.__wrapped__  # the step inside torch's no-grad-and-graph-break wrapper

    def eager_step(self, closure=None):
        with torch.set_grad_enabled(self.defaults["differentiable"]):  # what the wrapper sets
            return step(self, closure)

    eager_step.__doc__ = step.__doc__
    return prebuild_guards(type(optimizer_class.__name__, (optimizer_class,), {"step": eager_step, "__module__": __name__}))
