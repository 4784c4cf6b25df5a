"""What crosses module boundary k (module k -> k+1): the activations, or their quantized codes.

Every engine hands activations on through these functions, so that quantization
(``model.quantize``, ``decoupled.quantize``) works the same for every method and engine, and
counts bytes the same way: the distributed engine sends ``payload`` and rebuilds with
``received``; the single-process engines call ``cross`` (both sides at once) and count the
bytes the distributed engine would send (``message_bytes``).
"""

from __future__ import annotations

import math

import torch

from decoupled.model import SplitNet
from decoupled.quantize import pack, packed_bytes, unpack

HEADER_BYTES = 16  # channels.Outbox's [kind, step] header, two int64


def payload(net: SplitNet, k: int, outputs: torch.Tensor, learn: bool = True) -> list[torch.Tensor]:
    """The tensors module k sends for ``outputs``: the tensor itself, or its packed codes and the
    codebook (which learns from ``outputs`` when ``learn``)."""
    q = net.quantizer(k)
    if q is None:
        return [outputs]
    was = q.training
    q.train(learn)
    codes, codebook = q.encode(outputs)
    q.train(was)
    return [pack(codes, q.bits), codebook]


def received(net: SplitNet, k: int, tensors: list[torch.Tensor], shape: torch.Size) -> torch.Tensor:
    """``payload``'s inverse on module k+1's side: the activations of ``shape`` it trains on."""
    q = net.quantizer(k)
    if q is None:
        return tensors[0]
    codes_shape = (shape[0], shape[1] * shape[2] * shape[3] // q.dim)
    return q.decode(unpack(tensors[0], q.bits, codes_shape), tensors[1], shape)


def payload_specs(net: SplitNet, k: int, shape: tuple[int, ...], dtype: torch.dtype) -> list[tuple[tuple[int, ...], torch.dtype]]:
    """Shapes and dtypes of ``payload``'s tensors for activations of ``shape``."""
    q = net.quantizer(k)
    if q is None:
        return [(tuple(shape), dtype)]
    n_codes = shape[0] * shape[1] * shape[2] * shape[3] // q.dim
    return [((packed_bytes(n_codes, q.bits),), torch.uint8), ((2**q.bits, q.dim), dtype)]


def cross(net: SplitNet, k: int, outputs: torch.Tensor, learn: bool = True) -> torch.Tensor:
    """What module k+1 receives of ``outputs`` in a single process (a quantizer learns when
    ``learn``); a gradient for it passes straight through to ``outputs``."""
    q = net.quantizer(k)
    if q is None:
        return outputs
    was = q.training
    q.train(learn)
    received_ = q(outputs)
    q.train(was)
    return received_


def message_bytes(net: SplitNet, k: int, shape: tuple[int, ...], dtype: torch.dtype, labels: torch.Tensor) -> int:
    """Bytes of one forward message across boundary k: header, payload, labels (as channels sends them)."""
    data = sum(math.prod(s) * torch.empty((), dtype=d).element_size() for s, d in payload_specs(net, k, shape, dtype))
    return HEADER_BYTES + data + labels.numel() * labels.element_size()


def gradient_bytes(grad: torch.Tensor) -> int:
    """Bytes of one gradient message sent back across a boundary."""
    return HEADER_BYTES + grad.numel() * grad.element_size()


class Traffic:
    """The bytes a single-process engine's modules would send (forward and back), per module,
    counted as the distributed engine sends them; per epoch, with the quantizers' numbers."""

    def __init__(self, net: SplitNet):
        self.net = net
        self.bytes_sent = [0] * net.K

    def forward(self, k: int, outputs: torch.Tensor, labels: torch.Tensor) -> None:
        self.bytes_sent[k] += message_bytes(self.net, k, tuple(outputs.shape), outputs.dtype, labels)

    def backward(self, k: int, grad: torch.Tensor) -> None:
        self.bytes_sent[k] += gradient_bytes(grad)

    def epoch_stats(self, images: int) -> dict:
        """This epoch's ``bytes_sent_per_module``, ``bytes_per_image`` (per image module 0 read) and
        quantizer numbers; then counting starts again."""
        quantizers = [self.net.quantizer(k) for k in range(self.net.K - 1)]
        stats = epoch_stats(self.bytes_sent, images, [q.take_stats() if q is not None else None for q in quantizers])
        self.bytes_sent = [0] * self.net.K
        return stats

    def state_dict(self) -> dict:
        return {"bytes_sent": list(self.bytes_sent)}

    def load_state_dict(self, state: dict) -> None:
        self.bytes_sent = list(state["bytes_sent"])


def epoch_stats(bytes_sent: list[int], images: int, quantizer_stats: list[dict | None]) -> dict:
    """An epoch's traffic numbers: bytes per sending module and per image read; each quantized
    boundary's reconstruction error and code perplexity (``Quantizer.take_stats``; None where floats)."""
    stats = {"bytes_sent_per_module": list(bytes_sent), "bytes_per_image": sum(bytes_sent) / images if images else None}
    if any(s is not None for s in quantizer_stats):
        stats["vq_recon_error_per_boundary"] = [s["recon_error"] if s else None for s in quantizer_stats]
        stats["vq_perplexity_per_boundary"] = [s["perplexity"] if s else None for s in quantizer_stats]
    return stats
