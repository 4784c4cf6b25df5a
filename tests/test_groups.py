"""GN-DGL: modules split width-wise into neuron groups, each with its own loss and optimizer."""

import copy
import itertools
import math

import pytest
import torch
import torch.nn.functional as F

from decoupled import config, grid, methods, model
from decoupled.data.batches import BatchStream, TensorTestSet
from decoupled.engines.simulated import SimulatedEngine
from decoupled.errors import UserError
from decoupled.methods.gn_dgl import diversity

MODEL = {"widths": [8, 16, 16], "aux_pool": 2, "aux_hidden": 16}


def make(method, G=1, K=3, detach=True, seed=0, **train):
    cfg = config.validate({"experiment": "g", "model": {**MODEL, "groups": G, "group_detach": detach}, "train": train, "grid": {"methods": [method]}})
    torch.manual_seed(seed)
    net = model.build(cfg["model"] if method == "gn_dgl" else {**cfg["model"], "groups": 1}, K, 1, 10)
    return net, methods.get(method)(net, cfg["train"], total_steps=20)


def data(n=16 * 12, seed=0):
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, 2, (n,), generator=g)
    return torch.randn(n, 1, 28, 28, generator=g) + (y[:, None, None, None] - 0.5), y


def train(net, method, epochs=1):
    x, y = data()
    engine = SimulatedEngine(method, BatchStream(x, y, 16, 0))
    for _ in range(epochs):
        stats = engine.run_epoch()
    return engine, stats


def test_with_one_group_gn_dgl_is_dgl():
    a, dgl = make("dgl")
    b, gn = make("gn_dgl", G=1)
    train(a, dgl)
    train(b, gn)
    assert a.state_dict().keys() == b.state_dict().keys()
    for (name, p), q in zip(a.state_dict().items(), b.state_dict().values()):
        torch.testing.assert_close(p, q, rtol=0, atol=1e-6, msg=lambda m: f"{name}: {m}")


def test_a_groups_weights_move_only_its_own_channels_and_the_next_module_sees_all():
    """K = 2: module 1 has two conv layers, the second one grouped."""
    net, _ = make("gn_dgl", G=2, K=2)
    x, _ = data(8)
    moved = moved_channels(net, x, k=1, g=1)
    assert not moved[0].any()
    assert moved[1].tolist() == [False] * 8 + [True] * 8  # group 1's channels of module 1, only
    net, _ = make("gn_dgl", G=2, K=2)
    moved = moved_channels(net, x, k=0, g=0)
    assert moved[0].tolist() == [True] * 4 + [False] * 4
    assert moved[1].all()  # module 1's first conv sees every group


def moved_channels(net, x, k: int, g: int) -> list[torch.Tensor]:
    """Per module (eval mode), which of its output channels change when the weights of module k's
    group g are perturbed."""
    net.eval()
    before = [h.detach() for h in outputs_per_module(net, x)]
    with torch.no_grad():
        for p in net.blocks[k].branches[g].parameters():
            p.add_(0.5 * torch.randn_like(p))
    return [(a - b).abs().amax((0, 2, 3)) > 0 for a, b in zip(outputs_per_module(net, x), before)]


def outputs_per_module(net, x):
    outs = []
    for block in net.blocks:
        x = block(x)
        outs.append(x)
    return outs


@pytest.mark.parametrize("detach", [True, False])
def test_a_groups_loss_reaches_only_its_own_weights(detach):
    net, _ = make("gn_dgl", G=2, detach=detach)
    x, y = data(8)
    h = net.blocks[0](x)
    heads = net.heads[0]
    assert heads.group_heads[0][2].in_features == (8 if detach else 4) * 2 * 2  # the whole width, or its own channels
    logits = heads.group_logits(h)
    F.cross_entropy(logits[0], y).backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in net.blocks[0].branches[0].parameters() if p.requires_grad)
    assert all(p.grad is None or p.grad.abs().sum() == 0 for p in net.blocks[0].branches[1].parameters())
    assert all(p.grad is None for p in heads.group_heads[1].parameters())


@pytest.mark.parametrize("detach", [True, False])
def test_in_module_step_each_group_learns_from_its_own_heads_loss(detach):
    """What group g's branch and head are stepped with: the gradient of its own head's
    cross-entropy plus the module's diversity penalty, nothing of another group's loss."""
    net, method = make("gn_dgl", G=2, K=2, detach=detach, div_weight=0.5)
    x, y = data(16)
    block, heads = (copy.deepcopy(m) for m in (net.blocks[0], net.heads[0]))
    logits = heads.group_logits(block(x))
    penalty = 0.5 * diversity(logits, y, method.div_temp)
    expected = [torch.autograd.grad(F.cross_entropy(logits[g], y) + penalty, [*block.branches[g].parameters(), *heads.group_heads[g].parameters()],
                                    retain_graph=True, allow_unused=True) for g in range(2)]
    seen = {}
    for g, i in enumerate(method.group_optimizers[0]):
        params = method.optimizers[i].param_groups[0]["params"]
        method.optimizers[i].register_step_pre_hook(lambda opt, args, kwargs, g=g, params=params: seen.__setitem__(g, [p.grad for p in params]))
    method.module_step(0, x, y)
    for g in range(2):
        for ours, theirs in zip(seen[g], expected[g], strict=True):
            torch.testing.assert_close(ours, torch.zeros_like(ours) if theirs is None else theirs)


def test_the_diversity_penalty_is_the_mean_cosine_of_the_heads_wrong_class_softmaxes():
    g = torch.Generator().manual_seed(0)
    logits = [torch.randn(5, 4, generator=g) for _ in range(3)]
    labels = torch.tensor([0, 1, 2, 3, 0])
    expected = 0.0
    for i, (k, l) in itertools.product(range(5), itertools.permutations(range(3), 2)):
        p, q = (F.softmax(z[i] / 3.0, 0) for z in (logits[k], logits[l]))
        p, q = (v * (torch.arange(4) != labels[i]) for v in (p, q))
        expected += float(F.cosine_similarity(p, q, dim=0)) / (5 * 3 * 2)
    assert float(diversity(logits, labels, 3.0)) == pytest.approx(expected, rel=1e-5)
    assert float(diversity([logits[0]] * 2, labels, 3.0)) == pytest.approx(1.0, rel=1e-5)  # identical heads
    assert float(diversity(logits[:1], labels, 3.0)) == 0.0


def test_the_diversity_weight_changes_what_groups_learn():
    a, with_penalty = make("gn_dgl", G=2, div_weight=0.5)
    b, without = make("gn_dgl", G=2, div_weight=0.0)
    _, stats_a = train(a, with_penalty)
    _, stats_b = train(b, without)
    assert not torch.equal(a.blocks[0].branches[0][0][0].weight, b.blocks[0].branches[0][0][0].weight)
    assert stats_a["train_loss_per_module"] != stats_b["train_loss_per_module"]


@pytest.mark.parametrize("detach", [True, False])
def test_gn_dgl_learns_with_groups_each_on_its_own_optimizer(detach):
    net, method = make("gn_dgl", G=4, detach=detach, lr=0.05)
    assert len(method.optimizers) == 3 * 4 + 1  # K modules x G groups, and the network's classifier
    engine, _ = train(net, method, epochs=2)
    x, y = data()
    accuracy = engine.evaluate(net, TensorTestSet(x, y), 1000)
    assert accuracy["test_acc"] > 0.75 and min(accuracy["test_acc_per_module"]) > 0.75  # chance: 0.5


def test_groups_are_a_gn_dgl_setting_and_a_grid_axis():
    cfg = {"experiment": "g", "model": MODEL, "grid": {"methods": ["gn_dgl", "dgl"], "groups": [1, 2, 4]}}
    assert sorted(k.variant for k in grid.runs(cfg) if k.method == "gn_dgl") == ["G1", "G2", "G4"]
    assert [k.variant for k in grid.runs(cfg) if k.method == "dgl"] == ["default"]
    job = grid.job_config(config.validate(cfg), grid.RunKey("gn_dgl", "sync", 3, 0, "G4"))
    assert job["model"]["groups"] == 4 and job["run"]["varied"] == ["groups"]
    assert "groups" not in grid.job_config(config.validate(cfg), grid.RunKey("dgl", "sync", 3, 0))["model"]
    with pytest.raises(UserError, match=r"model.groups': 3 groups must divide every layer's width \[8, 16, 16\]"):
        grid.runs({**cfg, "grid": {"methods": ["gn_dgl"], "groups": [3]}})


def test_macs_and_parameters_are_counted_per_module_and_per_worker():
    from decoupled import compute

    cfg = {"widths": [16, 32], "aux_pool": 2, "aux_hidden": 128}
    conv0, head0 = 28 * 28 * 16 * 9, 16 * 4 * 128 + 128 * 10  # 3x3 conv 1 -> 16 at 28x28; pool 2x2, MLP
    plain = compute.count(model.build(cfg, 2, 1, 10), (1, 28, 28), locked=False)
    assert plain["macs_per_module"][0] == conv0 + head0 and plain["workers"] == 2
    assert plain["params_per_module"][0] == 16 * 9 + 2 * 16 + (16 * 4 * 128 + 128) + (128 * 10 + 10)
    locked = compute.count(model.build(cfg, 2, 1, 10), (1, 28, 28), locked=True)
    assert locked["macs_per_worker"] == [sum(plain["macs_per_module"])] and locked["max_worker_macs"] == sum(plain["macs_per_module"])
    grouped = compute.count(model.build({**cfg, "groups": 2}, 2, 1, 10), (1, 28, 28), locked=False)
    assert grouped["workers"] == 4
    assert grouped["macs_per_worker"][:2] == [conv0 // 2 + head0] * 2  # half the channels; a head on the whole width
    conv1 = 14 * 14 * 16 * 16 * 9  # each group: 16 -> 16 of the 32 channels at 14x14 (from all 16 input channels)
    final = 32 * 4 * 128 + 128 * 10
    assert grouped["macs_per_worker"][2] == conv1 + final + final and grouped["macs_per_worker"][3] == conv1 + final  # the classifier on worker (1, 0)
    assert compute.as_params(grouped)["max_worker_macs"] == grouped["macs_per_worker"][2]


def test_the_distributed_engine_runs_groups_as_workers_in_sync_mode_only():
    cfg = {"experiment": "g", "engine": "distributed", "model": {**MODEL, "groups": 2}, "grid": {"methods": ["gn_dgl"], "modes": ["async"]}}
    with pytest.raises(UserError, match=r"engine 'distributed' runs a module's neuron groups \(model.groups\) as workers of their own in sync mode only"):
        grid.runs(cfg)
    cfg["grid"]["modes"], cfg["model"]["quantize"] = ["sync"], {"bits": 4}
    with pytest.raises(UserError, match=r"does not quantize \(model.quantize\) what neuron groups"):
        grid.runs(cfg)
    from decoupled import engines

    del cfg["model"]["quantize"]
    (key,) = grid.runs(cfg)
    assert engines.of(cfg).process_count(grid.job_config(config.validate(cfg), key)) == 3 * 2


RESNET = {"arch": "resnet32", "stem": "own", "shortcut": "B", "aux_head": "1c2f", "aux_pool": 2, "aux_hidden": 16}


def test_a_grouped_resnet_is_the_gn_dgl_codes_grouped_resnet():
    """ResNet-32 K=4 G=2 (GN-DGL's cuts: 4 of the stem + 15 blocks per module). Inside a module
    every conv is 1/G wide on the group's own channels, but a module's first block reads the
    whole input (dense conv1; its identity shortcut is the group's own channels); the
    stage-changing projection is grouped inside a module."""
    torch.manual_seed(0)
    net = model.build({**RESNET, "groups": 2}, 4, 3, 10)
    first, later = net.blocks[1].branches[1][0], net.blocks[1].branches[1][2]  # stage 1 block 3 | stage 2 block 0
    assert (first.conv1.in_channels, first.conv1.out_channels) == (16, 8)
    assert first.shortcut(torch.arange(16.0).view(1, 16, 1, 1)).flatten().tolist() == list(range(8, 16))
    assert (later.conv1.in_channels, later.conv1.out_channels, later.conv1.stride) == (8, 16, (2, 2))
    assert (later.shortcut[0].in_channels, later.shortcut[0].out_channels, later.shortcut[0].stride) == (8, 16, (2, 2))
    stem = net.blocks[0].branches[0][0]
    assert (stem[0].in_channels, stem[0].out_channels) == (3, 8)  # module 0's groups split the stem by channel
    head = net.heads[1].group_heads[0]  # 1c2f on the whole 32 channels (detached others)
    assert [(m.in_channels, m.out_channels, m.stride) for m in head.modules() if isinstance(m, torch.nn.Conv2d)] == [(32, 64, (2, 2))]
    assert [(m.in_features, m.out_features) for m in head.modules() if isinstance(m, torch.nn.Linear)] == [(64, 16), (16, 10)]
    assert isinstance(net.heads[-1].final[0], torch.nn.Conv2d)  # the classifier has the aux heads' form, as the code's head

    moved = moved_channels(net, torch.randn(2, 3, 32, 32), k=1, g=1)
    assert not moved[0].any()
    assert moved[1].tolist() == [False] * 16 + [True] * 16
    assert moved[2].all()  # module 2's first conv sees every group


def test_a_grouped_resnets_group_loss_reaches_only_its_own_weights_and_it_learns():
    cfg = config.validate({"experiment": "g", "model": {**RESNET, "arch": "resnet8", "base_width": 8, "groups": 2}, "train": {"lr": 0.05}, "grid": {"methods": ["gn_dgl"]}})
    torch.manual_seed(0)
    net = model.build(cfg["model"], 2, 1, 10)
    x, y = data(8)
    logits = net.heads[0].group_logits(net.blocks[0](x))
    F.cross_entropy(logits[1], y).backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in net.blocks[0].branches[1].parameters())
    assert all(p.grad is None or p.grad.abs().sum() == 0 for p in net.blocks[0].branches[0].parameters())
    net.zero_grad(set_to_none=True)
    method = methods.get("gn_dgl")(net, cfg["train"], total_steps=48)
    engine, stats = train(net, method, epochs=4)
    assert engine.evaluate(net, TensorTestSet(*data(160, seed=1)), 80)["test_acc"] > 0.7  # two classes


def test_groups_need_a_cnn_or_a_resnet_with_projections():
    for arch, shortcut, message in (("vgg11", "A", "built for model.arch cnn and resnet only, not vgg11"), ("resnet20", "A", "set model.shortcut B")):
        cfg = config.validate({"experiment": "e", "model": {"arch": arch, "shortcut": shortcut, "groups": 2}, "grid": {"methods": ["gn_dgl"], "K": [2]}})
        with pytest.raises(UserError, match=f"config key 'model.groups': .*{message}"):
            grid.job_config(cfg, grid.runs(cfg)[0])


def _rig(head: torch.nn.Module, scores: list[float]) -> None:
    """Make a head (its last layer a Linear) output ``scores`` whatever it reads."""
    last = [m for m in head.modules() if isinstance(m, torch.nn.Linear)][-1]
    torch.nn.init.zeros_(last.weight)
    with torch.no_grad():
        last.bias.copy_(torch.tensor(scores))


def test_the_layerwise_ensemble_weighs_later_entries_double():
    """K=2, G=2: the entries are module 0's group softmax mean, module 1's, then the classifier's,
    weighted 1/7, 2/7, 4/7 (the GN-DGL code's --ensemble-type layerwise)."""
    torch.manual_seed(0)
    net = model.build({**RESNET, "arch": "resnet8", "base_width": 8, "groups": 2, "eval_ensemble": "layerwise"}, 2, 1, 10).eval()
    sure = lambda c: [30.0 if i == c else 0.0 for i in range(10)]  # noqa: E731
    for k in (0, 1):
        for head in net.heads[k].group_heads:
            _rig(head, sure(0))
    _rig(net.heads[1].final, sure(1))
    x, _ = data(6)
    # class 1 (4/7) beats class 0 (1/7 + 2/7): equal or reversed weights would pick class 0
    assert net.layerwise_ensemble(x).argmax(1).tolist() == [1] * 6
    # a hesitant classifier (class 1 at 23 %) is outvoted by the confident group heads
    _rig(net.heads[1].final, [1.0 if i == 1 else 0.0 for i in range(10)])
    assert net.layerwise_ensemble(x).argmax(1).tolist() == [0] * 6
    from decoupled.evaluate import evaluate

    result = evaluate(net, TensorTestSet(x, torch.zeros(6, dtype=torch.long)).batches(4))
    assert result["test_acc"] == 1.0 and result["test_acc_classifier"] == 0.0 == result["test_acc_per_module"][-1]
    net.ensemble = "none"
    assert evaluate(net, TensorTestSet(x, torch.zeros(6, dtype=torch.long)).batches(4))["test_acc"] == 0.0


def test_a_grouped_resnets_he_init_is_drawn_for_the_whole_layer_as_the_codes_grouped_convs():
    """The GN-DGL code's grouped conv is one layer of C output channels: N(0, 2 / (9 C)). Ours are G
    convs of C/G channels each, drawn with the same variance; its 1c2f heads' convs He-drawn too."""
    torch.manual_seed(0)
    net = model.build({**RESNET, "base_width": 32, "init": "he_fan_out", "groups": 4}, 2, 3, 10)
    stage3 = [branch[-1].conv2.weight for branch in net.blocks[1].branches]  # the last block: 128 channels, 32 a group
    assert stage3[0].shape[0] == 32
    assert torch.cat(stage3).std().item() == pytest.approx(math.sqrt(2 / (9 * 128)), rel=0.02)
    head_conv = net.heads[0].group_heads[0][0]  # 1c2f on module 0's 64 channels: 128 out
    assert head_conv.weight.std().item() == pytest.approx(math.sqrt(2 / (9 * 128)), rel=0.05)
