"""Test accuracy of every head of a SplitNet, in large batches without gradients."""

from __future__ import annotations

from collections.abc import Iterable

import torch
import torch.nn.functional as F

from decoupled.model import SplitNet


@torch.no_grad()
def evaluate(net: SplitNet, batches: Iterable[tuple[torch.Tensor, torch.Tensor]]) -> dict:
    """Over ``batches`` (a test set's, on the network's device: ``Dataset.test_set(device).batches(size)``),
    ``test_acc_per_module[k]`` is head k's accuracy; the last one is the network's output,
    which ``test_acc`` is, unless ``model.eval_ensemble`` (``net.ensemble``) is ``layerwise``:
    then ``test_acc`` is that ensemble's and ``test_acc_classifier`` the network's output's."""
    was_training = net.training
    net.eval()
    device = next(net.parameters()).device
    correct = torch.zeros(net.K, dtype=torch.long, device=device)
    ensemble_correct = torch.zeros((), dtype=torch.long, device=device)
    final_loss = torch.zeros((), dtype=torch.float64, device=device)  # summed where computed: no sync per batch
    n = 0
    for xb, yb in batches:
        n += len(yb)
        logits = net.forward_all_heads(xb)
        correct += torch.stack([(out.argmax(1) == yb).sum() for out in logits])
        final_loss += F.cross_entropy(logits[-1], yb, reduction="sum").double()
        if net.ensemble == "layerwise":
            ensemble_correct += (net.layerwise_ensemble(xb).argmax(1) == yb).sum()
    net.train(was_training)
    per_module = (correct.double() / n).tolist()
    result = {"test_acc": per_module[-1], "test_acc_per_module": per_module, "test_loss": final_loss.item() / n, "n_test": n}
    if net.ensemble == "layerwise":
        result.update(test_acc=ensemble_correct.item() / n, test_acc_classifier=per_module[-1])
    return result
