"""DDG and FDG: delays as in their authors' code, the weights a delayed gradient is taken at,
and beta inside whole training runs.

The two reference loops below follow the authors' code step by step (slowbull/DDG main.py,
ZHUANGHP/FDG FDG.py): live modules whose weights SGD updates in place through ``.data``, as
PyTorch 0.4/1.0's optimizers did, under graphs stored at the forward. Our methods, run by the
lockstep engine, must land on the same weights.
"""

import collections
import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from decoupled import grid
from test_methods import assert_same_params, batch, make, run_engine_steps

DEEP = {"widths": [8, 8, 16, 16], "aux_pool": 2, "aux_hidden": 16}  # 4 layers: K up to 4
PLAIN_SGD = {"probe_heads": False, "lr_schedule": "constant", "momentum": 0.0, "weight_decay": 0.0, "lr": 0.1}


def sgd(module: nn.Module, lr: float) -> None:
    """PyTorch 0.4's SGD without momentum: in place through .data, which autograd does not see."""
    for p in module.parameters():
        if p.grad is not None:
            p.data.add_(p.grad, alpha=-lr)


def zero_grad(module: nn.Module) -> None:
    for p in module.parameters():
        p.grad = None


def stages(net):
    """The authors' modules: the last one ends with the classifier."""
    return [*net.blocks[:-1], nn.Sequential(net.blocks[-1], net.heads[-1])]


def ddg_reference(net, batches, lr):
    """slowbull/DDG's main.py in one process. In step t every module forwards batch t; then,
    top first, the last module back-propagates its loss, and module k < K-1 back-propagates the
    gradient received at the end of step t-1 through the graph it stored K-1-k steps ago
    (skipping its first K-1-k steps), updates, sends its input's gradient down and receives
    the one the module above sent in this step."""
    K = net.K
    blocks = stages(net)
    delay = [K - 1 - k for k in range(K)]
    outputs, inputs = [collections.deque() for _ in range(K)], [collections.deque() for _ in range(K)]
    received, sent = [None] * K, [None] * K
    for x, y in batches:
        h = x
        for k in range(K):
            h = h.detach().requires_grad_(k > 0)
            inputs[k].append(h)
            h = blocks[k](h)
            outputs[k].append(h)
        for k in reversed(range(K)):
            zero_grad(blocks[k])
            if k == K - 1:
                F.cross_entropy(outputs[k].pop(), y).backward()
                sent[k] = inputs[k].pop().grad
            elif delay[k] > 0:
                delay[k] -= 1
            else:
                delay[k] = -1
                outputs[k].popleft().backward(received[k])
                sent[k] = inputs[k].popleft().grad if k > 0 else None
            sgd(blocks[k], lr)
            if k < K - 1 and delay[k] <= 0:
                received[k] = sent[k + 1]
    return net


def fdg_reference(net, batches, lr, beta, steps):
    """ZHUANGHP/FDG's FDG.py in one process, as its threads compute it. In step t module k < K-1
    back-propagates beta times the gradient its upper neighbour computed in step t-1 through
    the graph it stored 2(K-1-k) steps ago, updates, then forwards what the module below
    produced in step t-1; the last module applies its previous gradient, then forwards and
    back-propagates its loss. Returns each module's state right after its update in step
    ``steps`` + k: the state our lockstep run has after ``steps`` steps."""
    K = net.K
    blocks = stages(net)
    delay = [2 * (K - 1 - k) for k in range(K)]
    graphs = [collections.deque([None] * d, maxlen=d) for d in delay]
    stored = [collections.deque([None] * (d + 1), maxlen=d + 1) for d in delay]  # full: an append drops the oldest
    inputs, dg, input_grad = [None] * K, [None] * K, [None] * K
    labels, target = collections.deque([None] * (K - 2)), None
    snapshots = {}
    for t, (x, y) in enumerate(batches):
        inputs[0] = x
        labels.append(y)
        for k in range(K):
            if inputs[k] is None or (k == K - 1 and target is None):
                continue
            if k < K - 1:
                zero_grad(blocks[k])
                graph = graphs[k].popleft()
                if dg[k] is not None and graph is not None:
                    graph.backward(beta * dg[k])
                sgd(blocks[k], lr)
            else:
                sgd(blocks[k], lr)  # the gradients of its previous step
            if t == steps + k:
                snapshots[k] = copy.deepcopy(blocks[k].state_dict())
            out = blocks[k](inputs[k])
            if k < K - 1:
                graphs[k].append(out)
                if k > 0:
                    stored[k].append(inputs[k])
                    old = stored[k].popleft()
                    input_grad[k] = None if old is None else old.grad
            else:
                zero_grad(blocks[k])
                F.cross_entropy(out, target).backward()
                input_grad[k] = inputs[k].grad
        for k in reversed(range(1, K)):
            newest = graphs[k - 1][-1]
            inputs[k] = None if newest is None else newest.detach().clone().requires_grad_()
        for k in range(K - 1):
            dg[k] = None if input_grad[k + 1] is None else input_grad[k + 1].clone()
        target = labels.popleft()
    return snapshots


@pytest.mark.parametrize("K", [2, 3])
def test_ddg_computes_what_the_authors_code_computes(K):
    net, ddg = make("ddg", K=K, **PLAIN_SGD)
    reference = ddg_reference(copy.deepcopy(net), [batch(seed=100 + s) for s in range(7)], PLAIN_SGD["lr"])
    run_engine_steps(net, ddg, 7)
    assert_same_params(net, reference, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("K,beta", [(2, 1.0), (3, 0.5), (4, 0.5)])
def test_fdg_computes_what_the_authors_code_computes(K, beta):
    steps = 8
    net, fdg = make("fdg", K=K, beta=beta, model_cfg=DEEP, **PLAIN_SGD)
    model = copy.deepcopy(net)
    snapshots = fdg_reference(model, [batch(seed=100 + s) for s in range(steps + K)], PLAIN_SGD["lr"], beta, steps)
    run_engine_steps(net, fdg, steps)
    for k, ours in enumerate(stages(net)):
        for (name, a), b in zip(ours.state_dict().items(), snapshots[k].values(), strict=True):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=lambda m: f"module {k} {name}: {m}")


def test_the_delays_are_the_methods_own_unless_the_config_sets_one():
    def job(method, **train):
        cfg = {"experiment": "t", "grid": {"methods": [method]}, "model": DEEP, "train": train}
        return grid.job_config(cfg, grid.RunKey(method, "sync", 4, 0, "beta0.5" if method == "fdg" else "default"))

    assert job("ddg")["train"]["gradient_delay"] == 1 and job("fdg")["train"]["gradient_delay"] == 2
    assert job("ddg", gradient_delay=3)["train"]["gradient_delay"] == 3
    assert "gradient_delay" not in job("dgl")["train"]  # a setting DGL does not have
    _, ddg = make("ddg", K=4, model_cfg=DEEP)
    _, fdg = make("fdg", K=4, model_cfg=DEEP)
    assert [ddg.gradient_delay(k) for k in range(4)] == [3, 2, 1, 0]
    assert [fdg.gradient_delay(k) for k in range(4)] == [5, 3, 1, 0]


@pytest.mark.parametrize("method,expected", [("ddg", [2, 1]), ("fdg", [3, 1]), ("dni", [0, 0]), ("cdni", [0, 0])])
def test_each_module_applies_the_gradient_of_the_batch_it_forwarded_that_many_steps_earlier(method, expected):
    K, steps = 3, 9
    net, m = make(method, K=K)
    forwarded, received = [[] for _ in range(K)], []
    module_step, receive = m.module_step, m.receive_gradient

    def spy_step(k, inputs, labels):
        forwarded[k].append(labels)
        return module_step(k, inputs, labels)

    def spy_receive(k, grad):
        # the batch this gradient belongs to (gradients come back in order) and the step now
        received.append((k, sum(r[0] == k for r in received), len(forwarded[0]) - 1))
        return receive(k, grad)

    m.module_step, m.receive_gradient = spy_step, spy_receive
    run_engine_steps(net, m, steps)
    for k in range(K - 1):
        deliveries = [(b, now) for j, b, now in received if j == k]
        assert len(deliveries) == steps - expected[k]
        assert all(now - b == expected[k] for b, now in deliveries)


def test_forward_weights_give_the_gradient_at_the_weights_of_the_forward():
    """delayed_grad_weights: forward (DDG's equations): the update applied to module 1 is the
    gradient of its forward, at the weights it had then, on the stored input."""
    K = 3
    net, ddg = make("ddg", K=K, delayed_grad_weights="forward", gradient_delay=2, **PLAIN_SGD)
    applied, expected, moved = [], [], []
    receive = ddg.receive_gradient

    def spy_receive(k, grad):
        if k == 1:
            inputs, _, weights = ddg.pending[1][0]
            block = copy.deepcopy(ddg.net.blocks[1])
            moved.append(any(not torch.equal(w, p) for w, p in zip(weights.values(), block.parameters())))
            with torch.no_grad():
                for p, w in zip(block.parameters(), weights.values()):
                    p.copy_(w)
            x = inputs.detach().requires_grad_()
            block(x).backward(grad)
            expected.append([p.grad for p in block.parameters()] + [x.grad])
        return receive(k, grad)

    def before_step(optimizer, args, kwargs):
        applied.append([p.grad.clone() for p in ddg.net.blocks[1].parameters()])

    ddg.receive_gradient = spy_receive
    ddg.optimizers[1].register_step_pre_hook(before_step)
    run_engine_steps(net, ddg, 8)
    assert len(applied) == len(expected) == 8 - 2
    assert moved == [False] + [True] * 5  # but for the first, the weights had moved since the forward
    for ours, theirs in zip(applied, expected):
        for a, b in zip(ours, theirs):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("mode", ["current", "forward"])
def test_the_two_weight_choices_differ_once_weights_move(mode):
    """Both choices are real: after a few updates they give other networks."""
    runs = {}
    for choice in ("current", "forward"):
        net, ddg = make("ddg", K=3, delayed_grad_weights=choice, gradient_delay=2, **PLAIN_SGD)
        runs[choice] = run_engine_steps(net, ddg, 6)
    with pytest.raises(AssertionError):
        assert_same_params(runs["current"], runs["forward"], rtol=1e-5, atol=1e-6)


def test_ddg_with_zero_delay_is_backprop_step_for_step():
    bp_net, bp = make("backprop", K=3, probe_heads=False)
    ddg_net, ddg = make("ddg", K=3, probe_heads=False, gradient_delay=0)
    run_engine_steps(bp_net, bp, 5)
    run_engine_steps(ddg_net, ddg, 5)
    assert_same_params(bp_net, ddg_net, rtol=1e-5, atol=1e-6)


def test_ddg_backward_through_stored_graph_survives_updates():
    """The FDG code fails here on torch 2.x (in-place modification of saved weights)."""
    net, ddg = make("ddg", K=2, probe_heads=True, gradient_delay=3)
    run_engine_steps(net, ddg, 6)
    assert all(torch.isfinite(p).all() for p in net.parameters())


def test_fdg_shrinks_the_gradient_by_beta_at_every_boundary():
    _, fdg = make("fdg", K=3, probe_heads=False, beta=0.5, gradient_delay=0)
    _, ddg = make("ddg", K=3, probe_heads=False, gradient_delay=0)
    seen = {}
    for name, m in (("fdg", fdg), ("ddg", ddg)):
        receive = m.receive_gradient

        def spy(k, grad, _name=name, _receive=receive):
            seen[(_name, k)] = grad.clone()
            return _receive(k, grad)

        m.receive_gradient = spy
        x, y = batch()
        h = x
        for k in range(3):
            h, _, g = m.module_step(k, h, y)
            if g is not None:
                pending = g
        for k in (1, 0):
            pending = m.receive_gradient(k, pending)
    torch.testing.assert_close(seen[("fdg", 1)], 0.5 * seen[("ddg", 1)])
    torch.testing.assert_close(seen[("fdg", 0)], 0.25 * seen[("ddg", 0)], rtol=1e-5, atol=1e-8)
