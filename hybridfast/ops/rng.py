"""Counter-based random stream shared by all implementations of ``sample_logprobs``.

The noise for (seed, row, col) is a pure function of those three integers, so the PyTorch
reference, the C++ kernel and the Triton kernel draw identical Gumbel variates and sample
identical tokens (up to one-ulp differences of ``log`` at exact near-ties).

    mix(x)  = lowbias32 (x ^= x>>16; x *= 0x7feb352d; x ^= x>>15; x *= 0x846ca68b; x ^= x>>16)
    k1      = mix(seed ^ mix(row))
    k2      = mix(k1 + 0x9e3779b9)
    bits    = mix(mix(col ^ k1) ^ k2)
    u       = ((bits >> 9) + 0.5) / 2**23             in (0, 1): exact in float32, max 1 - 2**-24
    gumbel  = -log(-log(u))
All arithmetic is modulo 2**32. Here it is emulated in int64 with 16-bit split products.
"""
from __future__ import annotations

import torch

M32 = 0xFFFFFFFF
C1 = 0x7FEB352D
C2 = 0x846CA68B
GOLDEN = 0x9E3779B9


def _mul32(x: torch.Tensor, c: int) -> torch.Tensor:
    lo, hi = c & 0xFFFF, c >> 16
    return (x * lo + (((x * hi) & 0xFFFF) << 16)) & M32


def mix32(x: torch.Tensor) -> torch.Tensor:
    x = x & M32
    x = x ^ (x >> 16)
    x = _mul32(x, C1)
    x = x ^ (x >> 15)
    x = _mul32(x, C2)
    x = x ^ (x >> 16)
    return x


def row_keys(seed: torch.Tensor, B: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    rows = torch.arange(B, device=device, dtype=torch.int64)
    s = seed.to(device=device, dtype=torch.int64).reshape(-1)[:1] & M32
    k1 = mix32(s ^ mix32(rows))
    k2 = mix32((k1 + GOLDEN) & M32)
    return k1, k2


def uniform_bits(seed: torch.Tensor, B: int, V: int, device) -> torch.Tensor:
    k1, k2 = row_keys(seed, B, device)
    cols = torch.arange(V, device=device, dtype=torch.int64)
    return mix32(mix32(cols[None, :] ^ k1[:, None]) ^ k2[:, None])


def gumbel_noise(seed: torch.Tensor, B: int, V: int, device) -> torch.Tensor:
    """[B, V] float32 Gumbel(0, 1) noise for the given seed tensor."""
    return noise_from_bits(uniform_bits(seed, B, V, device))


GUMBEL_MAX = 17.5  #: strict upper bound of the noise (C++ prunes tokens that cannot win with it)


def noise_from_bits(bits: torch.Tensor) -> torch.Tensor:
    """Map 32 random bits to Gumbel noise; finite for every input (max 16.64 at bits >> 9 = 2^23-1)."""
    u = ((bits >> 9).to(torch.float32) + 0.5) * (1.0 / 8388608.0)
    return -torch.log(-torch.log(u))


def uniform_from_bits(bits: torch.Tensor) -> torch.Tensor:
    """Map 32 random bits to a float32 uniform in (0, 1) (23 bits, never 0 or 1)."""
    return ((bits >> 9).to(torch.float32) + 0.5) * (1.0 / 8388608.0)


class RandomStream:
    """All the randomness of one sampling call, derived from one draw of the user's generator.

    The generator is read exactly once, on its own device (a CPU ``torch.Generator`` drives a
    CUDA model), and the 31-bit key it gives is copied to ``device`` once. Every later draw is
    a counter-based function of (key, counter) computed on ``device`` with the counter kept in
    a device tensor and advanced in place: no host synchronisation, no host-to-device copy per
    token, and the same ops on every step (CUDA-graph and ``torch.compile`` friendly).

    This is the only place a user generator is consumed by the samplers.
    """

    def __init__(self, generator: "torch.Generator | None", device):
        gdev = "cpu" if generator is None else generator.device
        key = torch.randint(0, 2**31 - 1, (1,), generator=generator, device=gdev, dtype=torch.int64)
        self.device = torch.device(device)
        self.key = key.to(self.device)
        self.counter = torch.zeros(1, dtype=torch.int64, device=self.device)

    def next_seed(self) -> torch.Tensor:
        """A fresh int64 seed tensor [1] on ``device`` (for ``sample_logprobs(seed=...)``)."""
        self.counter.add_(1)
        return mix32(self.key ^ mix32(self.counter * GOLDEN))

    def uniform(self, n: int) -> torch.Tensor:
        """``n`` float32 uniforms in (0, 1) on ``device``."""
        return uniform_from_bits(uniform_bits(self.next_seed(), 1, n, self.device)[0])

    def categorical(self, probs: torch.Tensor, n: int) -> torch.Tensor:
        """``n`` independent draws per row of ``probs [G, N]`` (rows need not be normalised):
        inverse-CDF sampling with this stream's uniforms; returns int64 ``[G, n]``."""
        G = probs.shape[0]
        cdf = torch.cumsum(probs.double(), 1)
        u = self.uniform(G * n).view(G, n).double() * cdf[:, -1:]
        return torch.searchsorted(cdf, u, right=True).clamp_max(probs.shape[1] - 1)
