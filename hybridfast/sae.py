"""Top-k sparse autoencoder over sentence activations (DESIGN.md section 1.1).

Architecture (the paper's): ``z = W_enc (x - b_dec) + b_enc`` on *raw* pre-activations (no ReLU);
keep the top ``k`` (k = 3); reconstruction ``sum(topk_vals * W_dec[idx]) + b_dec``; K latents =
K categories. Init: encoder = default ``nn.Linear``, ``b_enc = 0``, ``W_dec`` = encoder rows
normalised, ``b_dec = 0``. Loss: fraction of variance unexplained. Adam with
``lr = 2e-4 / sqrt(K / 2**14)``, batch 512, up to 300 epochs, early stopping (patience 10) on a
held-out split, best weights restored, decoder rows renormalised after every step.
The category of a sentence is the argmax of the full pre-activation.
"""
from __future__ import annotations

import copy
import math
from dataclasses import dataclass, field

import torch
from torch import nn

from .artifacts import SAEParams

__all__ = ["TopKSAE", "train_topk_sae", "SAETrainResult", "taxonomy_metrics", "preprocess"]


class TopKSAE(nn.Module):
    def __init__(self, d_in: int, n_latents: int, k: int = 3):
        super().__init__()
        if not 1 <= k <= n_latents:
            raise ValueError(f"k must be in 1..n_latents={n_latents}, got {k}")
        self.d_in, self.n_latents, self.k = d_in, n_latents, k
        self.encoder = nn.Linear(d_in, n_latents)
        with torch.no_grad():
            self.encoder.bias.zero_()
        self.W_dec = nn.Parameter(self.encoder.weight.detach().clone())
        self.b_dec = nn.Parameter(torch.zeros(d_in))
        self.normalize_decoder_()
        self.x_mean: torch.Tensor | None = None
        self.normalize_inputs = False

    @torch.no_grad()
    def normalize_decoder_(self):
        self.W_dec.div_(self.W_dec.norm(dim=1, keepdim=True).clamp_min(1e-12))

    def pre_acts(self, x):
        return self.encoder(x - self.b_dec)

    def forward(self, x):
        z = self.pre_acts(x)
        vals, idx = z.topk(self.k, dim=-1)
        recon = (vals[..., None] * self.W_dec[idx]).sum(-2) + self.b_dec
        return recon, z

    @torch.no_grad()
    def categorize(self, x):
        """Category = argmax of the full pre-activation (on already preprocessed ``x``)."""
        return self.pre_acts(x).argmax(-1)

    def sae_params(self) -> SAEParams:
        """The router form used by :class:`hybridfast.HybridModel` (includes preprocessing)."""
        return SAEParams(self.encoder.weight.detach().T.contiguous(), self.encoder.bias.detach().clone(),
                         self.b_dec.detach().clone(), None if self.x_mean is None else self.x_mean.clone(),
                         self.normalize_inputs, self.W_dec.detach().clone())


def fvu(x_hat, x):
    return ((x_hat - x) ** 2).sum() / ((x - x.mean(0, keepdim=True)) ** 2).sum().clamp_min(1e-12)


def preprocess(X: torch.Tensor, response_ids=None, mean=None):
    """Centre by the mean of per-response means (or ``mean``), then L2-normalise rows."""
    X = X.float()
    if torch.isnan(X).any():
        raise ValueError(f"NaN in activations (rows {torch.isnan(X).any(1).nonzero().flatten()[:8].tolist()})")
    if mean is None:
        if response_ids is None:
            mean = X.mean(0)
        else:
            r = torch.as_tensor(response_ids)
            means = torch.stack([X[r == u].mean(0) for u in torch.unique(r)])
            mean = means.mean(0)
    U = X - mean
    return U / U.norm(dim=-1, keepdim=True).clamp_min(1e-12), mean


@dataclass
class SAETrainResult:
    sae: TopKSAE
    best_val_fvu: float
    epochs: int
    history: list = field(default_factory=list)


def train_topk_sae(X: torch.Tensor, n_latents: int, k: int = 3, *, epochs: int = 300,
                   batch_size: int = 512, patience: int = 10, val_frac: float = 0.1,
                   lr: float | None = None, seed: int = 0, progress: bool = False) -> SAETrainResult:
    """Train on preprocessed activations ``X [N, d]`` (see :func:`preprocess`)."""
    if X.ndim != 2 or X.shape[0] < 2:
        raise ValueError(f"X must be [N >= 2, d], got {tuple(X.shape)}")
    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed)
    N = X.shape[0]
    perm = torch.randperm(N, generator=g)
    n_val = max(1, int(N * val_frac)) if N >= 10 else 0
    val, tr = X[perm[:n_val]], X[perm[n_val:]]
    sae = TopKSAE(X.shape[1], n_latents, k)
    lr = 2e-4 / math.sqrt(n_latents / 2 ** 14) if lr is None else lr
    opt = torch.optim.Adam(sae.parameters(), lr=lr)
    best, best_state, bad, hist = math.inf, None, 0, []
    it = range(epochs)
    if progress:
        from tqdm.auto import tqdm
        it = tqdm(it, desc=f"SAE K={n_latents}")
    ep = 0
    for ep in it:
        order = torch.randperm(tr.shape[0], generator=g)
        for i in range(0, tr.shape[0], batch_size):
            xb = tr[order[i: i + batch_size]]
            if xb.shape[0] < 2:
                continue
            loss = fvu(sae(xb)[0], xb)
            opt.zero_grad()
            loss.backward()
            opt.step()
            sae.normalize_decoder_()
        with torch.no_grad():
            ref = val if n_val else tr
            v = float(fvu(sae(ref)[0], ref))
        hist.append(v)
        if v < best - 1e-6:
            best, best_state, bad = v, copy.deepcopy(sae.state_dict()), 0
        else:
            bad += 1
            if bad >= patience:
                break
    sae.load_state_dict(best_state)
    return SAETrainResult(sae, best, ep + 1, hist)


@torch.no_grad()
def taxonomy_metrics(sae: TopKSAE, X: torch.Tensor) -> dict:
    """Offline quality metrics: FVU, category balance, centroid cosine orthogonality."""
    recon, z = sae(X)
    cat = z.argmax(-1)
    K = sae.n_latents
    counts = torch.bincount(cat, minlength=K).float()
    p = counts / counts.sum()
    nz = p[p > 0]
    balance = float(-(nz * nz.log()).sum() / math.log(K)) if K > 1 else 1.0
    cents = torch.stack([X[cat == j].mean(0) if counts[j] > 0 else torch.zeros(X.shape[1]) for j in range(K)])
    cn = cents / cents.norm(dim=1, keepdim=True).clamp_min(1e-12)
    used = counts > 0
    cos = cn[used] @ cn[used].T
    m = int(used.sum())
    off = (cos.abs().sum() - cos.diagonal().abs().sum()) / max(1, m * (m - 1))
    return dict(fvu=float(fvu(recon, X)), counts=counts.long().tolist(), balance_entropy=balance,
                centroid_abs_cos=float(off), orthogonality=1.0 - float(off))
