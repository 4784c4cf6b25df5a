"""The model split and the methods' defining properties, checked against references."""

import copy

import pytest
import torch
import torch.nn.functional as F

from decoupled import config, grid, methods, model
from decoupled.engines.simulated import SimulatedEngine

MODEL = {"widths": [8, 16, 32], "aux_pool": 2, "aux_hidden": 16}


def train_cfg(**changes):
    cfg = config.validate({"experiment": "t", "grid": {"methods": ["dgl"]}})["train"]
    return {**cfg, **changes}


def make(method: str, K: int, seed: int = 0, **train_changes):
    torch.manual_seed(seed)
    net = model.build(MODEL, K, in_channels=1, num_classes=10)
    return net, methods.get(method)(net, train_cfg(**train_changes), total_steps=20)


def batch(seed=1, n=16):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 1, 28, 28, generator=g), torch.randint(0, 10, (n,), generator=g)


@pytest.mark.parametrize("K,expected", [(1, [3]), (2, [1, 2]), (3, [1, 1, 1])])
def test_split_shapes(K, expected):
    assert model.split_layers(3, K) == expected
    net = model.build(MODEL, K, in_channels=1, num_classes=10)
    assert net.K == K and len(net.heads) == K
    x, _ = batch()
    h, channels, size = x, 1, 28
    for k, (block, head) in enumerate(zip(net.blocks, net.heads)):
        h = block(h)
        for _ in range(expected[k]):
            size = (size + 1) // 2  # each layer max-pools by 2 (ceil)
        channels = MODEL["widths"][sum(expected[: k + 1]) - 1]
        assert h.shape == (16, channels, size, size)
        assert head(h).shape == (16, 10)
    assert net(x).shape == (16, 10)


def test_split_rejects_more_modules_than_layers():
    with pytest.raises(ValueError):
        model.split_layers(2, 3)


def test_dgl_blocks_gradients_between_modules():
    """Module k+1's loss must not reach module k, even if handed activations with a graph."""
    net, dgl = make("dgl", K=3)
    x, y = batch()
    h = net.blocks[0](x)  # still attached to module 0's parameters
    assert h.requires_grad
    dgl.module_step(1, h, y)
    assert all(p.grad is None for p in net.blocks[0].parameters())
    assert all(p.grad is not None for p in net.blocks[1].parameters())


def test_dgl_module_update_matches_its_aux_loss_alone():
    net, dgl = make("dgl", K=2, lr_schedule="constant")
    ref = copy.deepcopy(net)
    x, y = batch()
    h0 = dgl.module_step(0, x, y).outputs
    dgl.module_step(1, h0, y)
    cfg = dgl.train_cfg
    for k in range(2):
        params = list(ref.blocks[k].parameters()) + list(ref.heads[k].parameters())
        opt = torch.optim.SGD(params, lr=cfg["lr"], momentum=cfg["momentum"], weight_decay=cfg["weight_decay"])
        inputs = x if k == 0 else ref_h0
        out = ref.blocks[k](inputs)
        if k == 0:
            ref_h0 = out.detach()
        F.cross_entropy(ref.heads[k](out), y).backward()
        opt.step()
    for p, q in zip(net.parameters(), ref.parameters()):
        torch.testing.assert_close(p, q, rtol=0, atol=0)


def run_steps(method: str, K: int, steps: int, **changes):
    net, m = make(method, K, **changes)
    for s in range(steps):
        x, y = batch(seed=100 + s)
        h = x
        for k in range(K):
            h, _ = m.module_step(k, h, y)
    return net


def test_dgl_with_one_module_is_backprop_step_for_step():
    for steps in (1, 3, 6):
        bp, dgl = run_steps("backprop", 1, steps), run_steps("dgl", 1, steps)
        for (name, p), q in zip(bp.state_dict().items(), dgl.state_dict().values()):
            torch.testing.assert_close(p, q, rtol=0, atol=0, msg=f"{name} differs after {steps} steps")


def test_backprop_probe_heads_leave_the_network_unchanged():
    with_probes = run_steps("backprop", 3, 4, probe_heads=True)
    without = run_steps("backprop", 3, 4, probe_heads=False)
    for a, b in zip(with_probes.blocks.parameters(), without.blocks.parameters()):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    for a, b in zip(with_probes.heads[-1].parameters(), without.heads[-1].parameters()):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    # the probes did learn: their weights moved from the shared initialisation
    assert any(not torch.equal(a, b) for a, b in zip(with_probes.heads[0].parameters(), without.heads[0].parameters()))


def test_backprop_gradients_match_autograd_on_the_whole_net():
    net, bp = make("backprop", K=3, probe_heads=False, lr_schedule="constant", momentum=0.0, weight_decay=0.0)
    ref = copy.deepcopy(net)
    x, y = batch()
    h = x
    for k in range(3):
        h, _ = bp.module_step(k, h, y)
    F.cross_entropy(ref(x), y).backward()
    lr = bp.train_cfg["lr"]
    for p, q in zip(net.parameters(), ref.parameters()):
        if q.grad is not None:
            torch.testing.assert_close(p, q - lr * q.grad, rtol=1e-5, atol=1e-6)


def test_engine_is_deterministic_for_a_seed():
    def losses(seed):
        net, m = make("dgl", K=3)
        x, y = batch(n=64)
        engine = SimulatedEngine(m, x, y, batch_size=16, seed=seed)
        return [engine.run_epoch()["train_loss_per_module"] for _ in range(2)]

    assert losses(3) == losses(3)
    assert losses(3) != losses(4)


def test_registry_lists_methods_and_rejects_unknown():
    assert {"backprop", "dgl"} <= set(grid.method_names())
    from decoupled.errors import UserError

    with pytest.raises(UserError, match="unknown method 'nope'"):
        methods.get("nope")
