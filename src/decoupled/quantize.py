"""Online vector quantization of what one module sends to the next (the DGL paper's bandwidth cut).

A boundary's activations (B, C, H, W) are cut into vectors of ``dim`` consecutive channels at
each position; each vector is replaced by its nearest codeword in a codebook of 2^bits
entries, learned online by EMA k-means (``decay``; k-means on the first batch; a code used
by fewer than 2 vectors on the EMA's average is re-seeded from the batch). The library is
vector-quantize-pytorch's ``VectorQuantize``, with its codebook kept to this process
(``sync_codebook=False``: under torch.distributed it would otherwise average the codebooks of
all workers, which each quantize a different boundary).

What crosses the boundary is ``encode``'s codes, packed at ``bits`` bits each, and the codebook
they index (``pack``): the next module trains on ``decode``'s tensor, the same on either side.
A gradient sent back for it crosses straight through (``forward``). The codebook's updates draw
from a random stream of the quantizer's own (part of its state), so that they do not depend on
what other modules of the same process draw in between.
"""

from __future__ import annotations

import contextlib
import math

import torch
from torch import nn

DEAD_CODE_USES = 2  # a code whose EMA use per batch falls below this is re-seeded


class Quantizer(nn.Module):
    def __init__(self, channels: int, bits: int, dim: int, decay: float, seed: int):
        super().__init__()
        from vector_quantize_pytorch import VectorQuantize  # imported only when a boundary quantizes

        if channels % dim:
            raise ValueError(f"quantize.dim {dim} does not divide the boundary's {channels} channels")
        self.bits, self.dim, self.channels = bits, dim, channels
        self.vq = VectorQuantize(dim=dim, codebook_size=2**bits, decay=decay, kmeans_init=True, kmeans_iters=10,
                                 threshold_ema_dead_code=DEAD_CODE_USES, rotation_trick=False, commitment_weight=0.0, sync_codebook=False)
        self.register_buffer("rng_state", torch.Generator().manual_seed(seed).get_state())
        self.reset_stats()

    # --- the two sides of a boundary -----------------------------------------------------------

    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The codes of ``x`` (B, vectors) and the codebook they index; in training mode the
        codebook then learns from ``x`` (the returned one is the one the codes were drawn from)."""
        vectors = self._vectors(x.detach())
        with self._own_random_stream(), torch.no_grad():
            if not bool(self.vq._codebook.initted):  # k-means on the first batch, before any update
                was = self.vq.training
                self.vq.eval()
                self.vq(vectors)
                self.vq.train(was)
            codebook = self.vq.codebook.detach().clone()
            _, codes, _ = self.vq(vectors)
        if self.training:
            self._tally(vectors, codebook[codes], codes)
        return codes, codebook

    def decode(self, codes: torch.Tensor, codebook: torch.Tensor, shape: torch.Size) -> torch.Tensor:
        """The tensor of ``shape`` that ``codes`` stand for."""
        B, C, H, W = shape
        vectors = codebook[codes]  # (B, H*W*C/dim, dim)
        return vectors.view(B, H, W, C // self.dim, self.dim).permute(0, 3, 4, 1, 2).reshape(shape)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x`` quantized, as the next module receives it; gradients pass straight through."""
        codes, codebook = self.encode(x)
        return self.decode(codes, codebook, x.shape) + (x - x.detach())

    def _vectors(self, x: torch.Tensor) -> torch.Tensor:
        B, C, H, W = x.shape
        return x.view(B, C // self.dim, self.dim, H, W).permute(0, 3, 4, 1, 2).reshape(B, -1, self.dim)

    @contextlib.contextmanager
    def _own_random_stream(self):
        with torch.random.fork_rng(devices=[]):
            torch.set_rng_state(self.rng_state.cpu())
            yield
            self.rng_state.copy_(torch.get_rng_state())

    # --- what it logs per epoch ------------------------------------------------------------------

    # (buffers, so that a checkpoint taken inside an epoch keeps the epoch's tally)
    def reset_stats(self) -> None:
        self.register_buffer("tally_squared_error", torch.zeros((), dtype=torch.float64))
        self.register_buffer("tally_squared_norm", torch.zeros((), dtype=torch.float64))
        self.register_buffer("tally_code_counts", torch.zeros(2**self.bits, dtype=torch.long))

    def _tally(self, vectors: torch.Tensor, quantized: torch.Tensor, codes: torch.Tensor) -> None:
        self.tally_squared_error += (vectors - quantized).double().pow(2).sum()
        self.tally_squared_norm += vectors.double().pow(2).sum()
        self.tally_code_counts += torch.bincount(codes.flatten(), minlength=2**self.bits)

    def take_stats(self) -> dict:
        """Since the last call: relative reconstruction error (squared, of the training
        activations) and the perplexity of the codes used (2^bits if all are used equally)."""
        counts = self.tally_code_counts.double()
        total = float(counts.sum())
        p = counts[counts > 0] / max(total, 1.0)
        norm = float(self.tally_squared_norm)
        stats = {"recon_error": float(self.tally_squared_error) / norm if norm else None,
                 "perplexity": float((-(p * p.log()).sum()).exp()) if total else None}
        self.tally_squared_error.zero_()
        self.tally_squared_norm.zero_()
        self.tally_code_counts.zero_()
        return stats


def pack(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Codes (each < 2^bits) as a flat uint8 tensor of ceil(n bits / 8) bytes."""
    flat = codes.flatten()
    shifts = torch.arange(bits, device=flat.device)
    bitstream = ((flat[:, None] >> shifts) & 1).flatten().to(torch.uint8)
    bitstream = torch.cat([bitstream, bitstream.new_zeros(-len(bitstream) % 8)])
    weights = (2 ** torch.arange(8, device=flat.device)).to(torch.uint8)
    return (bitstream.view(-1, 8) * weights).sum(1, dtype=torch.uint8) if len(bitstream) else bitstream


def unpack(packed: torch.Tensor, bits: int, shape: tuple[int, ...]) -> torch.Tensor:
    """``pack``'s inverse: the codes of ``shape`` (int64)."""
    n = math.prod(shape)
    bitstream = ((packed[:, None].long() >> torch.arange(8, device=packed.device)) & 1).flatten()[: n * bits]
    weights = 2 ** torch.arange(bits, device=packed.device)
    return (bitstream.view(n, bits) * weights).sum(1).view(shape)


def packed_bytes(n_codes: int, bits: int) -> int:
    return math.ceil(n_codes * bits / 8)
