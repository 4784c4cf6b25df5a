"""Fully decoupled training with delayed gradients and gradient shrinking, FDG (Zhuang et al.).

DDG with the forward pass unlocked too: in the authors' code each module, in every step,
first applies the delayed gradient that has arrived, then forwards what the module below
produced in the step before. A gradient thus needs ``train.gradient_delay`` = 2 steps per
boundary, and module k works with the gradient of the batch it forwarded 2(K-1-k) steps
earlier, one update before its own forward of the next batch: in a lockstep schedule (which
computes the same updates with time relabelled) that is 2(K-1-k) - 1 steps. Each boundary
multiplies the gradient it passes down by ``train.beta``, so module k's gradient is scaled by
beta^(K-1-k). With beta = 1 FDG is still not DDG: unlocking the forward costs staleness
(module k: 2(K-1-k) - 1 steps against DDG's K-1-k; the same at K = 2).
"""

from decoupled.methods.ddg import DDG

# FDG (ZHUANGHP/FDG) unlocks the forward too: a module forwards what the one below produced
# a step earlier, so a gradient needs two steps per boundary
TRAITS = {"gradient_delay": 2, "sweeps_beta": True, "sends_gradients": True,
          "reads": ["train.probe_heads", "train.beta", "train.gradient_delay", "train.delayed_grad_weights"], "report_order": 5}


class FDG(DDG):
    name = "fdg"

    def gradient_delay(self, k):
        # the gradient arriving for module k is applied before the step's forward: one step less
        return max(super().gradient_delay(k) - 1, 0)

    def shrink(self, grad):
        return grad * self.train_cfg["beta"]


METHOD = FDG
