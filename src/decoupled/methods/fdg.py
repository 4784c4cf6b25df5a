"""DDG with gradient shrinking, FDG (Zhuang et al.): each boundary multiplies the gradient
it passes down by ``train.beta``, so module k's gradient is scaled by beta^(K-1-k). With
beta = 1 it is DDG."""

from decoupled.methods.ddg import DDG


class FDG(DDG):
    name = "fdg"

    def shrink(self, grad):
        return grad * self.train_cfg["beta"]


METHOD = FDG
