"""The model split and the methods' defining properties, checked against references."""

import copy

import pytest
import torch
import torch.nn.functional as F

from decoupled import config, grid, methods, model
from decoupled.data.batches import BatchStream
from decoupled.engines.simulated import SimulatedEngine

MODEL = {"widths": [8, 16, 32], "aux_pool": 2, "aux_hidden": 16}


def train_cfg(**changes):
    cfg = config.validate({"experiment": "t", "grid": {"methods": ["dgl"]}})["train"]
    return {**cfg, **changes}


def make(method: str, K: int, seed: int = 0, model_cfg: dict = MODEL, total_steps: int = 20, **train_changes):
    torch.manual_seed(seed)
    net = model.build(model_cfg, K, in_channels=1, num_classes=10)
    return net, methods.get(method)(net, train_cfg(**train_changes), total_steps=total_steps)


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


def test_cnn_aux_heads_are_the_dgl_codes_dni_comparison_heads():
    cfg = {**MODEL, "aux_head": "cnn", "kernel_size": 5, "aux_pool": 1, "aux_hidden": 0}
    net = model.build(cfg, 3, in_channels=1, num_classes=10)
    for k, width in enumerate(MODEL["widths"][:2]):
        head = net.heads[k]
        convs = [m for m in head.modules() if isinstance(m, torch.nn.Conv2d)]
        assert [(c.in_channels, c.out_channels, c.kernel_size, c.padding) for c in convs] == [(width, width, (5, 5), (2, 2))] * 3
        assert sum(isinstance(m, torch.nn.BatchNorm2d) for m in head.modules()) == 2
        assert not convs[-1].weight.any() and convs[-1].bias.any()  # weights zero, bias as initialised
        assert head(torch.randn(4, width, 7, 7)).shape == (4, 10)
    # the last module's head is the network's classifier: pooling and a linear layer
    assert not any(isinstance(m, torch.nn.Conv2d) for m in net.heads[2].modules())


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
            h = m.module_step(k, h, y).outputs
    return net


@pytest.mark.parametrize("method", ["dgl", "dni", "cdni", "ddg", "fdg"])
def test_with_one_module_every_method_is_backprop_step_for_step(method):
    """Nothing to decouple: no aux loss below, no synthetic or delayed gradient, no β (DNI's
    synthesizer between the block and the classifier decouples them, so it is left out here)."""
    for steps in (1, 3, 6):
        bp, other = run_steps("backprop", 1, steps), run_steps(method, 1, steps, beta=0.5, synth_last_block=False)
        for (name, p), q in zip(bp.state_dict().items(), other.state_dict().values()):
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
        h = bp.module_step(k, h, y).outputs
    F.cross_entropy(ref(x), y).backward()
    lr = bp.train_cfg["lr"]
    for p, q in zip(net.parameters(), ref.parameters()):
        if q.grad is not None:
            torch.testing.assert_close(p, q - lr * q.grad, rtol=1e-5, atol=1e-6)


def test_engine_is_deterministic_for_a_seed():
    def losses(seed):
        net, m = make("dgl", K=3)
        x, y = batch(n=64)
        engine = SimulatedEngine(m, BatchStream(x, y, 16, seed))
        return [engine.run_epoch()["train_loss_per_module"] for _ in range(2)]

    assert losses(3) == losses(3)
    assert losses(3) != losses(4)


def test_registry_lists_methods_and_rejects_unknown():
    assert {"backprop", "dgl"} <= set(grid.method_names())
    from decoupled.errors import UserError

    with pytest.raises(UserError, match=r"unknown method 'nope' \(known: backprop, cdni, ddg, dgl, dni, fdg, gn_dgl\)"):
        methods.get("nope")


def run_engine_steps(net, method, steps, K=None):
    """Drive ``method`` through the sync engine's epoch on the fixed batches 100, 101, ..."""
    batches = iter([batch(seed=100 + s) for s in range(steps)])
    engine = SimulatedEngine(method, BatchStream(torch.zeros(16 * steps, 1, 28, 28), torch.zeros(16 * steps, dtype=torch.long), 16, 0))
    engine.batches.next = lambda: next(batches)
    engine.run_epoch()
    return net


def assert_same_params(a, b, rtol=0.0, atol=0.0):
    for (name, p), q in zip(a.state_dict().items(), b.state_dict().values()):
        torch.testing.assert_close(p, q, rtol=rtol, atol=atol, msg=lambda m: f"{name}: {m}")


class OracleDNI(methods.get("dni")):
    """DNI whose synthesizers return the true gradient, computed by backprop on a copy of the net."""

    def module_step(self, k, inputs, labels):
        if k == 0:
            reference = copy.deepcopy(self.net)
            h, self.true_grads = inputs, []
            for block in reference.blocks:
                h = block(h)
                h.retain_grad()
                self.true_grads.append(h)
            F.cross_entropy(reference.heads[-1](h), labels).backward()
        return super().module_step(k, inputs, labels)

    def synthetic_gradient(self, k, h, labels):
        return self.true_grads[k].grad


@pytest.mark.parametrize("synth_last_block", [True, False])
def test_dni_with_true_gradients_is_backprop(synth_last_block):
    bp_net, bp = make("backprop", K=3, probe_heads=False, lr_schedule="constant")
    torch.manual_seed(0)
    dni_net = model.build(MODEL, 3, in_channels=1, num_classes=10)
    dni = OracleDNI(dni_net, train_cfg(probe_heads=False, lr_schedule="constant", synth_last_block=synth_last_block), total_steps=20)
    run_engine_steps(bp_net, bp, 4, 3)
    run_engine_steps(dni_net, dni, 4, 3)
    assert_same_params(bp_net, dni_net, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("method", ["dni", "cdni"])
def test_dni_synthesizer_regresses_onto_the_gradient_it_receives(method):
    net, dni = make(method, K=2, probe_heads=False)
    x, y = batch(n=32)
    h0 = dni.module_step(0, x, y).outputs
    assert dni.module_step(1, h0, y).input_grad.shape == h0.shape and len(dni.waiting[0]) == 1
    # A target the synthesizer can represent (the real gradient of this tiny net is mostly
    # beyond a local conv's reach): regression onto it must fit it.
    true_grad = 1e-3 * h0 + 1e-4

    def relative_error():
        return (F.mse_loss(dni.synthetic_gradient(0, h0, y), true_grad) / true_grad.pow(2).mean()).item()

    assert relative_error() == 1.0  # zero-initialised last layer: it predicts zero
    for _ in range(60):
        dni.receive_gradient(0, true_grad)
        dni.waiting[0].append((h0, y))
    assert relative_error() < 0.2


@pytest.mark.parametrize("label_input", ["maps", "linear"])
def test_cdni_differs_from_dni_only_by_the_label_context(label_input):
    _, dni = make("dni", K=2)
    _, cdni = make("cdni", K=2, synth_label_input=label_input)
    x, y = batch()
    h = torch.randn(16, 8, 14, 14)
    first = cdni.synthesizers[0].first
    if label_input == "maps":  # one-hot maps as 10 more input channels of the first conv
        assert first.in_channels == 8 + 10 and cdni.synthesizers[0].label is None
    else:  # the authors' form: a linear map of the one-hot label, added to the first conv's output
        assert first.in_channels == 8 and cdni.synthesizers[0].label.in_features == 10
    assert dni.synthesizers[0].first.in_channels == 8 and dni.synthesizers[0].label is None
    # synthesizers start at zero, so the first step is the same for both...
    dni.module_step(0, x, y), cdni.module_step(0, x, y)
    assert_same_params(dni.net.blocks[0], cdni.net.blocks[0])
    # ...and once trained, only cDNI's prediction depends on the label
    with torch.no_grad():
        for s in (dni.synthesizers[0], cdni.synthesizers[0]):
            s.rest[-1].weight.normal_()
    other = (y + 1) % 10
    assert torch.equal(dni.synthetic_gradient(0, h, y), dni.synthetic_gradient(0, h, other))
    assert not torch.equal(cdni.synthetic_gradient(0, h, y), cdni.synthetic_gradient(0, h, other))
    if label_input == "linear":  # the label moves the first conv's output by a per-class bias
        one_hot = F.one_hot(y, 10).float()
        with torch.no_grad():
            expected = first(h) + cdni.synthesizers[0].label(one_hot)[:, :, None, None]
            torch.testing.assert_close(cdni.synthesizers[0].rest(expected), cdni.predict(0, h, y))


@pytest.mark.parametrize("method", ["dni", "cdni"])
def test_dni_lower_modules_learn_from_the_synthetic_gradient(method):
    """Modules below the last move by their synthesizer's predictions: with the predictions
    zeroed (a synthesizer that never learns) the same run ends elsewhere."""
    nets = {}
    for zeroed in (False, True):
        net, dni = make(method, K=3)
        if zeroed:
            dni.synthetic_gradient = lambda k, h, labels: torch.zeros_like(h)
        nets[zeroed] = run_engine_steps(net, dni, 6)
        if not zeroed:
            assert all(s.rest[-1].weight.abs().sum() > 0 for s in dni.synthesizers)  # they learned
    for k in (0, 1):
        assert any(not torch.equal(a, b) for a, b in zip(nets[False].blocks[k].parameters(), nets[True].blocks[k].parameters()))


@pytest.mark.parametrize("method", ["dni", "cdni"])
def test_with_synth_last_block_the_last_block_steps_on_its_synthesizer_not_the_true_loss(method):
    """The DGL code's form: a synthesizer between the last block and the classifier. The last
    block moves by that synthesizer's predictions alone (zeroed, the block stays where it was
    while its classifier learns), so it ends elsewhere than a last block on the true loss."""
    ends = {}
    for last_synthesized, zeroed in ((True, False), (True, True), (False, False)):
        net, dni = make(method, K=3, weight_decay=0.0, synth_last_block=last_synthesized)
        assert len(dni.synthesizers) == (3 if last_synthesized else 2)
        start = copy.deepcopy(net)
        if zeroed:
            made = dni.synthetic_gradient
            dni.synthetic_gradient = lambda k, h, labels: made(k, h, labels) * (0 if k == 2 else 1)
        ends[last_synthesized, zeroed] = run_engine_steps(net, dni, 6)
        moved = {part: any(not torch.equal(a, b) for a, b in zip(getattr(net, part)[2].parameters(), getattr(start, part)[2].parameters()))
                 for part in ("blocks", "heads")}
        assert moved == {"blocks": not zeroed, "heads": True}
    assert any(not torch.equal(a, b) for a, b in zip(ends[True, False].blocks[2].parameters(), ends[False, False].blocks[2].parameters()))


@pytest.mark.parametrize("method", ["dni", "cdni"])
@pytest.mark.parametrize("target", ["per_sample", "batch_mean"])
def test_the_last_synthesizer_is_fitted_to_the_classifiers_gradient_of_the_same_batch(method, target):
    """Its target: d (the classifier's true loss) / d (the last block's output), of the batch its
    prediction was made for (and, cDNI, with that batch's labels), at the classifier's weights
    before this step; fitted in the last module's own step, in the form train.synth_target says."""
    _, dni = make(method, K=2, synth_target=target, synth_zero_bias=False)
    for s in (1, 2):  # a step first, so the synthesizer and the classifier are no longer as made
        x, y = batch(seed=s)
        inputs = dni.module_step(0, x, y).outputs
        if s == 2:
            block, head, synthesizer = (copy.deepcopy(m) for m in (dni.net.blocks[1], dni.net.heads[1], dni.synthesizers[1]))
            h = block(inputs).detach().requires_grad_()
            (true_grad,) = torch.autograd.grad(F.cross_entropy(head(h), y), h)
            prediction = synthesizer(h.detach(), F.one_hot(y, 10).float() if dni.conditioned else None)
            loss = F.mse_loss(prediction, true_grad * 16) if target == "per_sample" else ((prediction - true_grad) ** 2).sum() / 16
            loss.backward()
            seen = []
            dni.synth_optimizers[1].register_step_pre_hook(lambda opt, args, kwargs: seen.append([p.grad.clone() for p in dni.synthesizers[1].parameters()]))
        dni.module_step(1, inputs, y)
    assert len(seen) == 1
    for ours, theirs in zip(seen[0], synthesizer.parameters(), strict=True):
        torch.testing.assert_close(ours, theirs.grad)


@pytest.mark.parametrize("method", ["dni", "cdni"])
def test_each_synthesizer_regresses_on_the_gradient_of_its_own_batch(method):
    """Async, with the top module slowed, several activations wait for their true gradients:
    each gradient must meet the activation (and labels) it is the gradient of."""
    from decoupled.engines.simulated_async import AsyncSimulator
    from test_async import async_cfg, data

    _, dni = make(method, K=3)
    made, checked, regressed_on = {}, [], []
    module_step, receive, prediction_for = dni.module_step, dni.receive_gradient, dni.prediction_for

    def spy_step(k, inputs, labels):
        step = module_step(k, inputs, labels)
        if step.input_grad is not None:
            made[id(step.input_grad)] = (inputs.detach().clone(), labels.clone())
        return step

    def spy_prediction_for(k, h, labels):
        regressed_on.append((h, labels))
        return prediction_for(k, h, labels)

    def spy_receive(k, grad):
        inputs, labels = made[id(grad)]
        passed = receive(k, grad)
        h, their_labels = regressed_on[-1]  # what the synthesizer was just fitted on
        checked.append(torch.equal(h, inputs) and torch.equal(labels, their_labels))
        return passed

    dni.module_step, dni.receive_gradient, dni.prediction_for = spy_step, spy_receive, spy_prediction_for
    x, y = data(n=16 * 20)
    sim = AsyncSimulator(dni, BatchStream(x, y, 16, 0), 0, async_cfg(schedule="event", slowdown_factor=3, slowed_module=2, buffer_size=3, budget="time"))
    sim.run_epoch()
    assert len(checked) > 10 and all(checked)
    assert max(sim.grad_staleness[0]) >= 2  # several activations waited at once


@pytest.mark.parametrize("target", ["per_sample", "batch_mean"])
def test_synthesizers_fit_the_gradient_in_the_chosen_form(target):
    """per_sample: B x the gradient by mean squared error; batch_mean (koz4k/dni-pytorch): the
    gradient itself by squared error summed over the batch, divided by its size."""
    _, dni = make("dni", K=2, synth_target=target, synth_zero_bias=False, synth_lr=0.05)
    assert dni.synthesizers[0].rest[-1].bias.any()  # only the weights start at zero, as theirs
    x, y = batch()
    h0 = dni.module_step(0, x, y).outputs
    grad = dni.module_step(1, h0, y).input_grad
    reference = copy.deepcopy(dni.synthesizers[0])
    prediction = reference(h0)
    loss = F.mse_loss(prediction, grad * 16) if target == "per_sample" else ((prediction - grad) ** 2).sum() / 16
    loss.backward()
    seen = []
    dni.synth_optimizers[0].register_step_pre_hook(lambda opt, args, kwargs: seen.append([p.grad.clone() for p in dni.synthesizers[0].parameters()]))
    dni.receive_gradient(0, grad)
    for ours, theirs in zip(seen[0], reference.parameters(), strict=True):
        torch.testing.assert_close(ours, theirs.grad)
    # stepped by Adam at synth_lr: a first step moves each weight by about lr
    moved = max((p - q).abs().max().item() for p, q in zip(dni.synthesizers[0].parameters(), reference.parameters()))
    assert moved == pytest.approx(0.05, rel=1e-3)
    scale = 16 if target == "per_sample" else 1  # what the module receives: the prediction scaled back
    torch.testing.assert_close(dni.synthetic_gradient(0, h0, y), dni.predict(0, h0, y).detach() / scale)


@pytest.mark.parametrize("method", ["dni", "cdni"])
def test_in_sync_mode_a_synthesizer_runs_once_per_batch(method):
    """The prediction made for the module keeps its graph, and the regression onto the true
    gradient, which in sync mode arrives before the synthesizer steps again, reuses it."""
    net, dni = make(method, K=3)
    forwards = [0, 0, 0]
    for k, synthesizer in enumerate(dni.synthesizers):
        synthesizer.register_forward_hook(lambda *_, k=k: forwards.__setitem__(k, forwards[k] + 1))
    run_engine_steps(net, dni, 4)
    assert forwards == [4, 4, 4]  # the last one between the last block and the classifier
    assert dni.kept == [None, None, None]  # no graph held past the step that used it


@pytest.mark.parametrize("method", ["dni", "cdni"])
def test_a_synthesizer_regresses_at_its_current_weights_when_it_stepped_since_its_prediction(method):
    """Async: module 0 makes two batches before the first true gradient arrives. Each regression
    is the synthesizer's error on its own batch at the weights it has then; the second batch's
    prediction, made before the first regression's step, must be made again."""
    _, dni = make(method, K=2, synth_zero_bias=False, synth_lr=0.05)
    with torch.no_grad():
        dni.synthesizers[0].rest[-1].weight.normal_(std=0.1)
    batches = [batch(seed=s) for s in (1, 2)]
    outputs = [dni.module_step(0, x, y).outputs for x, y in batches]
    grads = [torch.randn_like(h) * 1e-2 for h in outputs]
    seen = []
    dni.synth_optimizers[0].register_step_pre_hook(lambda opt, args, kwargs: seen.append([p.grad.clone() for p in dni.synthesizers[0].parameters()]))
    for (_, y), h, grad in zip(batches, outputs, grads, strict=True):
        reference = copy.deepcopy(dni.synthesizers[0])  # the weights as they are now
        one_hot = F.one_hot(y, 10).float() if dni.conditioned else None
        F.mse_loss(reference(h, one_hot), grad * 16).backward()
        dni.receive_gradient(0, grad)
        for ours, theirs in zip(seen[-1], reference.parameters(), strict=True):
            torch.testing.assert_close(ours, theirs.grad)


def test_a_loaded_state_regresses_on_a_prediction_made_at_the_loaded_weights():
    """Loading a state replaces the synthesizers' weights: a prediction kept from before is not
    reused, even for a batch the state holds as the same tensors (autograd would refuse it)."""
    _, dni = make("dni", K=2)
    x, y = batch()
    dni.module_step(0, x, y)
    dni.load_state_dict(dni.state_dict())
    dni.receive_gradient(0, torch.ones_like(dni.waiting[0][0][0]))
    assert dni.synthesizers[0].rest[-1].weight.abs().sum() > 0  # it stepped


@pytest.mark.parametrize("layers,kernel,batchnorm", [(2, 3, False), (3, 5, True), (4, 1, False)])
def test_synthesizer_has_the_layers_kernel_and_batchnorm_it_is_configured_with(layers, kernel, batchnorm):
    """synth_layers convs (each hidden one followed by BatchNorm if synth_batchnorm, then ReLU),
    synth_kernel x synth_kernel, resolution kept; the last conv starts at zero."""
    from decoupled.methods.dni import Synthesizer

    synth = Synthesizer(8, 16, layers=layers, kernel=kernel, batchnorm=batchnorm, zero_bias=True, classes=0, label_input="maps")
    hidden = [torch.nn.Conv2d, *([torch.nn.BatchNorm2d] if batchnorm else []), torch.nn.ReLU]
    assert [type(m) for m in [synth.first, *synth.rest]] == hidden * (layers - 1) + [torch.nn.Conv2d]
    convs = [m for m in synth.modules() if isinstance(m, torch.nn.Conv2d)]
    shapes = [(c.in_channels, c.out_channels, c.kernel_size, c.padding) for c in convs]
    assert shapes == [(8, 16, (kernel, kernel), (kernel // 2,) * 2)] + [(16, 16, (kernel, kernel), (kernel // 2,) * 2)] * (layers - 2) + [(16, 8, (kernel, kernel), (kernel // 2,) * 2)]
    assert all(bn.num_features == 16 for bn in synth.modules() if isinstance(bn, torch.nn.BatchNorm2d))
    h = torch.randn(4, 8, 7, 7)
    assert synth(h).shape == h.shape and not synth(h).any()  # zero synthetic gradients at first
    assert not convs[-1].weight.any() and not convs[-1].bias.any()


@pytest.mark.parametrize("method", ["backprop", "dgl", "dni", "cdni", "ddg", "fdg"])
def test_every_method_reports_each_modules_loss_and_trains_its_probe_heads(method):
    """With train.probe_heads every module reports a training loss (its aux head's, or the
    network's at the last module) and every head learns; without, the methods whose lower
    modules have no loss of their own report none there and leave those heads alone."""
    for probe_heads in (True, False):
        net, m = make(method, K=3, probe_heads=probe_heads)
        initial = copy.deepcopy(net)
        x, y = batch(n=64)
        losses = SimulatedEngine(m, BatchStream(x, y, 16, 0)).run_epoch()["train_loss_per_module"]
        own_loss = probe_heads or method == "dgl"
        assert [loss is not None and loss > 0 for loss in losses] == [own_loss, own_loss, True], losses
        for k in range(3):
            moved = any(not torch.equal(a, b) for a, b in zip(net.heads[k].parameters(), initial.heads[k].parameters()))
            assert moved == (own_loss or k == 2), f"head {k}"


@pytest.mark.parametrize("method", ["dni", "ddg", "fdg"])
def test_the_first_module_sends_no_gradient_to_the_images(method):
    """Module 0 has no module below it: it computes no input gradient (wasted work) and passes none on."""
    _, m = make(method, K=2)
    x, y = batch()
    step = m.module_step(0, x, y)
    assert step.input_grad is None
    grad = m.module_step(1, step.outputs, y).input_grad
    assert grad is not None and m.receive_gradient(0, grad) is None


class ReadRecorder(dict):
    """A settings mapping that remembers which keys were read."""

    def __init__(self, *args):
        super().__init__(*args)
        self.read = set()

    def __getitem__(self, key):
        self.read.add(key)
        return super().__getitem__(key)

    def get(self, key, default=None):
        self.read.add(key)
        return super().get(key, default)


@pytest.mark.parametrize("method", ["backprop", "dgl", "dni", "cdni", "ddg", "fdg"])
def test_a_method_reads_exactly_the_method_specific_settings_declared_for_it(method):
    """methods.settings_of() (the methods' reads traits) decides which settings a job keeps (and MLflow shows): a method reading
    a setting it is not declared for would find it missing, one declared for a setting it never
    reads would show a param that changes nothing."""
    specific = {path.split(".")[1] for path, readers in methods.settings_of().items() if path.startswith("train.")}
    cfg = ReadRecorder(train_cfg(gradient_delay=1))
    torch.manual_seed(0)
    net = model.build(MODEL, 3, in_channels=1, num_classes=10)
    run_engine_steps(net, methods.get(method)(net, cfg, total_steps=20), steps=4)
    declared = {path.split(".")[1] for path, readers in methods.settings_of().items() if path.startswith("train.") and method in readers}
    assert cfg.read & specific == declared
    # and the async section's: replay-buffer settings for the methods that replay their inputs
    assert ("dgl" in methods.settings_of()["async.max_reuse"]) and all(
        (m in methods.settings_of()["async.max_reuse"]) == (methods.traits(m).input_buffer == "replay") for m in grid.method_names())


@pytest.mark.parametrize("method", ["backprop", "dgl", "dni", "cdni", "ddg", "fdg"])
@pytest.mark.parametrize("mode", ["sync", "async"])
def test_a_job_config_holds_only_the_settings_that_apply_to_it(method, mode):
    if mode == "async" and methods.traits(method).sync_only:
        return
    exp = config.validate({"experiment": "t", "grid": {"methods": [method], "modes": [mode], "K": [2]}})
    job = grid.job_config(exp, grid.runs(exp)[0])
    assert ("async" in job) == (mode == "async")
    assert ("gradient_delay" in job["train"]) == (mode == "sync" and methods.traits(method).gradient_delay is not None)
    for path, readers in methods.settings_of().items():
        section, name = path.split(".")
        if section in job and path != "train.gradient_delay":
            assert (name in job[section]) == (method in readers), path
    assert {"lr", "momentum", "batch_size"} <= set(job["train"])  # shared settings stay


TOY_METHOD = '''"""A method of one's own, outside the package: each module learns from its own head on a
detached input, and its async inputs come from a replay buffer (DGL under another name)."""

from decoupled.methods.base import Method, ModuleStep
from decoupled.optim import make_optimizer

TRAITS = {"input_buffer": "replay"}


class Toy(Method):
    name = "toy"

    def __init__(self, net, train_cfg, total_steps):
        super().__init__(net, train_cfg, total_steps)
        pairs = [make_optimizer(list(b.parameters()) + list(h.parameters()), train_cfg, total_steps) for b, h in zip(net.blocks, net.heads)]
        self.optimizers = [o for o, _ in pairs]
        self.schedulers = [s for _, s in pairs]

    def module_step(self, k, inputs, labels):
        return ModuleStep(*self.train_on_own_loss(k, inputs.detach(), labels))


METHOD = Toy
'''


def test_a_method_is_one_file_and_its_name_in_a_config(fashion_subset, tmp_path):
    """A toy method from a file in a folder of its own (DECOUPLED_METHOD_DIRS), no other file
    edited: the grid plans it (async too, from its traits), the workflow runs its code, a job
    trains it in async mode (its replay buffer), and an edit to its file re-runs its jobs only."""
    import json
    import os
    import subprocess
    import sys

    import yaml

    from conftest import REPO

    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "toy.py").write_text(TOY_METHOD)
    env = {**{k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}, "DECOUPLED_METHOD_DIRS": str(tmp_path / "mine")}
    cfg = {"experiment": "toy", "tracking_uri": f"sqlite:///{tmp_path}/mlflow.db", "model": {"widths": [8, 16]},
           "train": {"epochs": 1, "batch_size": 50}, "async": {"buffer_size": 4}, "grid": {"methods": ["toy", "dgl"], "modes": ["sync", "async"], "K": [2]}}
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(cfg))
    trained = subprocess.run([sys.executable, "-m", "decoupled", "train", "--config", "c.yaml", "--method", "toy", "--mode", "async", "--K", "2",
                              "--seed", "0", "--data", str(fashion_subset), "--out", "run"], capture_output=True, text=True, cwd=tmp_path, env=env, timeout=300)
    assert trained.returncode == 0, trained.stderr[-3000:]
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert metrics["method"] == "toy" and metrics["mode"] == "async" and metrics["epochs"][0]["test_acc"] > 0.3
    assert "max_reuse" in json.loads((tmp_path / "run" / "config.json").read_text())["async"]  # a replay-buffer setting: it reads one

    def planned(*args):
        result = subprocess.run([sys.executable, "-m", "snakemake", "-s", str(REPO / "Snakefile"), "-n", "--cores", "1", "--configfile", "c.yaml", *args],
                                capture_output=True, text=True, cwd=tmp_path, env=env, timeout=300)
        assert result.returncode == 0, result.stderr[-3000:]
        return {(m["method"], m["mode"]) for m in (dict(w.split("=") for w in line.split(": ", 1)[1].split(", "))
                                                  for line in result.stdout.splitlines() if line.strip().startswith("wildcards: method="))}

    assert planned() == {("toy", "sync"), ("toy", "async"), ("dgl", "sync"), ("dgl", "async")}

    def code_hashes():  # the param that re-runs a training job when its code changes
        script = "from decoupled.code_version import training_code_hash as h; print(h('toy')); print(h('dgl'))"
        return subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, check=True).stdout.splitlines()

    before = code_hashes()
    (tmp_path / "mine" / "toy.py").write_text(TOY_METHOD + "\n# an edit\n")
    after = code_hashes()
    assert after[0] != before[0] and after[1] == before[1] and after[0].startswith(before[0].split(", ")[0])  # same shared code


def test_a_trait_that_does_not_exist_is_refused_naming_the_file(tmp_path):
    from decoupled.declared import declared
    from decoupled.errors import UserError

    (tmp_path / "m.py").write_text('TRAITS = {"sync_only": True, "sinc_only": True}\n')
    with pytest.raises(UserError, match=r"m\.py: unknown TRAITS fields sinc_only \(known: sync_only, "):
        declared(tmp_path / "m.py", "TRAITS", methods.Traits)
    (tmp_path / "m.py").write_text('TRAITS = {"sync_only": True}\n')
    assert declared(tmp_path / "m.py", "TRAITS", methods.Traits) == {"sync_only": True}
    assert declared(tmp_path / "m.py", "SPEC", methods.Traits) is None
