"""Online vector quantization at module boundaries (``model.quantize``, DGL's bandwidth cut)."""

import pytest
import torch

from decoupled import config, grid, methods, model
from decoupled.data.batches import BatchStream, TensorTestSet
from decoupled.engines import boundary
from decoupled.engines.simulated import SimulatedEngine
from decoupled.errors import UserError
from decoupled.quantize import Quantizer, pack, unpack

MODEL = {"widths": [8, 16], "aux_pool": 2, "aux_hidden": 16}


def fmap(vectors: torch.Tensor, B: int, C: int, H: int, W: int, dim: int) -> torch.Tensor:
    """Activations (B, C, H, W) whose vectors (dim channels at a position) are ``vectors``' rows."""
    return vectors.view(B, H, W, C // dim, dim).permute(0, 3, 4, 1, 2).reshape(B, C, H, W)


def test_a_codebook_as_large_as_the_distinct_vectors_reconstructs_them_exactly():
    """k-means on the first batch may merge two of them; the online updates (a dead code
    re-seeded on a merged vector, the EMA moving each codeword to its vectors) then split them."""
    for seed in range(3):
        torch.manual_seed(seed)
        distinct = torch.randn(12, 4) * 3
        x = fmap(distinct[torch.randint(0, 12, (4 * 5 * 5 * 4,))], 4, 16, 5, 5, 4)
        q = Quantizer(16, bits=4, dim=4, decay=0.5, seed=0)  # 16 codewords >= 12 distinct vectors
        for _ in range(20):
            q(x)
        q.eval()
        torch.testing.assert_close(q(x), x, rtol=0, atol=1e-4)
        codes, _ = q.encode(x)
        assert len(codes.unique()) == 12


def test_fewer_bits_give_a_larger_reconstruction_error():
    torch.manual_seed(0)
    x = torch.randn(8, 16, 7, 7)
    errors = {}
    for bits in (1, 3, 6):
        q = Quantizer(16, bits=bits, dim=4, decay=0.99, seed=0)
        for _ in range(3):
            q(x)
        q.take_stats()
        q(x)
        errors[bits] = q.take_stats()["recon_error"]
    assert errors[1] > 1.3 * errors[3] > 1.3 * 1.3 * errors[6] > 0


def test_the_perplexity_counts_the_codes_used():
    q = Quantizer(4, bits=3, dim=4, decay=0.99, seed=0)
    distinct = torch.eye(4)[:2] * 5  # two vectors, equally often
    q(fmap(distinct.repeat(50, 1), 4, 4, 5, 5, 4))
    assert q.take_stats()["perplexity"] == pytest.approx(2.0, rel=1e-6)


@pytest.mark.parametrize("bits", [1, 3, 4, 7, 8, 12])
def test_codes_pack_to_bits_each_and_back(bits):
    codes = torch.randint(0, 2**bits, (6, 35))
    packed = pack(codes, bits)
    assert packed.dtype == torch.uint8 and packed.numel() == -(-6 * 35 * bits // 8)
    assert torch.equal(unpack(packed, bits, codes.shape), codes)


def test_what_crosses_a_boundary_is_rebuilt_from_codes_and_codebook_alone():
    """The receiver's tensor (from the packed codes and the codebook sent) is bit for bit the
    one the single-process engines hand on, and the codebook learns only when asked."""
    torch.manual_seed(0)
    net = model.build({**MODEL, "quantize": {"bits": 4, "dim": 4, "decay": 0.9}}, 2, 1, 10)
    twin = model.build({**MODEL, "quantize": {"bits": 4, "dim": 4, "decay": 0.9}}, 2, 1, 10)
    twin.load_state_dict(net.state_dict())
    h = torch.randn(6, 8, 14, 14)
    sent = boundary.payload(net, 0, h)
    assert [t.dtype for t in sent] == [torch.uint8, torch.float32] and sent[0].numel() == 6 * 8 * 14 * 14 // 4 // 2
    assert torch.equal(boundary.received(net, 0, sent, h.shape), boundary.cross(twin, 0, h))
    codebook = net.quantizer(0).vq.codebook.clone()
    boundary.payload(net, 0, h, learn=False)
    assert torch.equal(net.quantizer(0).vq.codebook, codebook)
    boundary.payload(net, 0, h)
    assert not torch.equal(net.quantizer(0).vq.codebook, codebook)


def test_gradients_cross_a_quantized_boundary_straight_through():
    net = model.build({**MODEL, "quantize": {"bits": 2, "dim": 4, "decay": 0.99}}, 2, 1, 10)
    h = torch.randn(4, 8, 14, 14, requires_grad=True)
    out = boundary.cross(net, 0, h)
    assert not torch.allclose(out, h)  # 4 codewords cannot hold these activations
    grad = torch.randn_like(out)
    out.backward(grad)
    assert torch.equal(h.grad, grad)


def quantized_job(method="dgl", bits=4, dim=4, K=2):
    cfg = config.validate({"experiment": "q", "model": {**MODEL, "quantize": {"bits": bits, "dim": dim}},
                           "train": {"epochs": 1, "batch_size": 16}, "grid": {"methods": [method], "K": [K]}})
    (key,) = grid.runs(cfg)
    return grid.job_config(cfg, key)


@pytest.mark.parametrize("method", ["dgl", "dni", "ddg", "backprop"])
def test_the_next_module_trains_on_the_quantized_tensor(method):
    """What module 1 is given holds at most 2^bits distinct vectors, and every method learns through it."""
    job = quantized_job(method, bits=2)
    torch.manual_seed(0)
    net = model.build(job["model"], 2, 1, 10)
    m = methods.get(method)(net, job["train"], total_steps=60)
    seen = []
    step = m.module_step

    def recording(k, inputs, labels):
        if k == 1:
            seen.append(inputs.detach().clone())
        return step(k, inputs, labels)

    m.module_step = recording
    g = torch.Generator().manual_seed(0)
    y = torch.randint(0, 2, (16 * 30,), generator=g)
    x = torch.randn(16 * 30, 1, 28, 28, generator=g) + (y[:, None, None, None] - 0.5)  # brighter or darker
    engine = SimulatedEngine(m, BatchStream(x, y, 16, 0))
    engine.run_epoch()
    stats = engine.run_epoch()
    vectors = torch.cat([boundary_vectors(s) for s in seen])
    assert len(vectors.unique(dim=0)) <= 4 * len(seen)  # a codebook of 4 per step (it learns between steps)
    assert all(len(boundary_vectors(s).unique(dim=0)) <= 4 for s in seen)
    assert engine.evaluate(net, TensorTestSet(x, y), 480)["test_acc"] > 0.75  # learns (chance: 0.5) through the quantized boundary
    assert stats["vq_recon_error_per_boundary"][0] > 0 and 1 <= stats["vq_perplexity_per_boundary"][0] <= 4


def boundary_vectors(h, dim=4):
    B, C, H, W = h.shape
    return h.view(B, C // dim, dim, H, W).permute(0, 3, 4, 1, 2).reshape(-1, dim)


def test_the_simulator_counts_the_bytes_the_codes_take():
    job = quantized_job("dgl", bits=4, dim=4)
    torch.manual_seed(0)
    net = model.build(job["model"], 2, 1, 10)
    m = methods.get("dgl")(net, job["train"], total_steps=4)
    engine = SimulatedEngine(m, BatchStream(torch.randn(64, 1, 28, 28), torch.randint(0, 10, (64,)), 16, 0))
    stats = engine.run_epoch()
    codes = 8 * 14 * 14 // 4 * 4 / 8  # bytes per image: 4 bits per 4 channels
    per_batch = 16 + 16 * 4 * 4 + 16 * 8  # header, codebook, labels
    assert stats["bytes_per_image"] == pytest.approx(codes + per_batch / 16)
    assert stats["bytes_sent_per_module"] == [4 * (16 * codes + per_batch), 0]


def test_quantize_settings_are_checked_and_name_the_variant():
    with pytest.raises(UserError, match=r"model.quantize': dim 3 does not divide the 8 channels at boundary 0"):
        quantized_job(dim=3)
    cfg = {"experiment": "q", "model": {**MODEL, "quantize": [{"bits": 4}, None]}, "grid": {"methods": ["dgl"], "K": [2]}}
    with pytest.raises(UserError, match=r"model.quantize': 2 entries, but K=2 modules have 1 boundaries"):
        grid.runs(cfg)
    cfg = {"experiment": "q", "model": MODEL, "grid": {"methods": ["dgl", "backprop"], "K": [2], "quantize": [None, {"bits": 2}, {"bits": 8, "decay": 0.9}]}}
    assert sorted({k.variant for k in grid.runs(cfg)}) == ["default", "q2d4", "q8d4r0.9"]
    job = grid.job_config(config.validate(cfg), grid.RunKey("dgl", "sync", 2, 0, "q2d4"))
    assert job["model"]["quantize"] == {"bits": 2, "dim": 4, "decay": 0.99} and job["run"]["varied"] == ["quantize"]
