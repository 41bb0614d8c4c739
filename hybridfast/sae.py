"""Top-k sparse autoencoder over sentence activations (DESIGN.md section 1.1).

Architecture (the paper's): ``z = W_enc (x - b_dec) + b_enc`` on *raw* pre-activations (no ReLU);
keep the top ``k`` (k = 3); reconstruction ``sum(topk_vals * W_dec[idx]) + b_dec``; K latents =
K categories. Loss: fraction of variance unexplained. Adam with ``lr = 2e-4 / sqrt(K / 2**14)``,
batch 512, up to 300 epochs, early stopping (patience 10) on a held-out split, best weights
restored, decoder rows renormalised after every step.
The category of a sentence is the argmax of the full pre-activation.

Init (``init=``): ``"kmeans"`` (default) sets encoder and decoder rows to the centroids of a
spherical k-means of the training rows (greedy k-means++ seeding, the best of ``n_init`` runs by
within-category cosine), ``b_enc = b_dec = 0``; ``"random"`` is the paper's: encoder = default
``nn.Linear``, ``b_enc = 0``, ``W_dec`` = encoder rows normalised, ``b_dec = 0``. From a random
init two planted categories often end up sharing one latent while another is split between two,
and FVU cannot tell such a run from a right one; the k-means objective can, so the restarts are
cheap k-means runs rather than SAE trainings (``tests/test_sae_stability.py``).
"""
from __future__ import annotations

import copy
import math
from dataclasses import dataclass, field

import torch
from torch import nn

from .artifacts import SAEParams

__all__ = ["TopKSAE", "train_topk_sae", "SAETrainResult", "taxonomy_metrics", "preprocess", "spherical_kmeans",
           "adjusted_rand_index", "assignment_stability", "INITS"]


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
        """``(reconstruction, pre-activations)``. The top-k code is scattered into a dense
        ``[..., K]`` row and multiplied by ``W_dec``: its gradient is a matmul, the same on every
        run (gathering ``W_dec[idx]`` would accumulate its gradient in thread order on CPU)."""
        z = self.pre_acts(x)
        vals, idx = z.topk(self.k, dim=-1)
        code = torch.zeros_like(z).scatter(-1, idx, vals)
        return code @ self.W_dec + self.b_dec, z

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


def _kmeanspp_seeds(X: torch.Tensor, K: int, g: torch.Generator) -> torch.Tensor:
    """Greedy k-means++: each next seed is the best of ``2 + log K`` D²-sampled candidates."""
    n_cand = 2 + int(math.log(K))
    first = int(torch.randint(X.shape[0], (1,), generator=g))
    seeds, d2 = [first], (X - X[first]).pow(2).sum(1)
    for _ in range(K - 1):
        cand = torch.multinomial(d2 + 1e-12, n_cand, replacement=True, generator=g)
        d2c = torch.minimum(d2, torch.cdist(X[cand], X).pow(2))           # [n_cand, N]
        best = int(d2c.sum(1).argmin())
        seeds.append(int(cand[best]))
        d2 = d2c[best]
    return X[seeds]


def _unit_rows(C: torch.Tensor) -> torch.Tensor:
    return C / C.norm(dim=1, keepdim=True).clamp_min(1e-12)


def _lloyd(X: torch.Tensor, C: torch.Tensor, max_iter: int) -> tuple[torch.Tensor, float]:
    """Spherical Lloyd iterations from ``C`` until no row changes centroid; an emptied centroid
    moves to the worst-fit row. Returns the unit centroids and the summed cosine of each row to
    its nearest centroid."""
    K = C.shape[0]
    C, cat = _unit_rows(C), None
    for _ in range(max_iter):
        cos = X @ C.T
        new_cat = cos.argmax(1)
        if cat is not None and torch.equal(new_cat, cat):
            break
        cat = new_cat
        S = torch.zeros_like(C).index_add_(0, cat, X)
        empty = torch.bincount(cat, minlength=K) == 0
        S[empty] = X[cos.max(1).values.argsort()[: int(empty.sum())]]
        C = _unit_rows(S)
    return C, float((X @ C.T).max(1).values.sum())


def spherical_kmeans(X: torch.Tensor, K: int, *, n_init: int = 10, max_iter: int = 100,
                     generator: torch.Generator | None = None) -> torch.Tensor:
    """Unit centroids ``[K, d]`` of unit rows ``X``: the best of ``n_init`` greedy-k-means++-seeded
    runs by summed cosine of each row to its nearest centroid (higher is better)."""
    if not 1 <= K <= X.shape[0]:
        raise ValueError(f"K={K} must be in 1..number of rows={X.shape[0]}")
    if n_init < 1:
        raise ValueError(f"n_init must be >= 1, got {n_init}")
    g = generator if generator is not None else torch.Generator().manual_seed(0)
    runs = [_lloyd(X, _kmeanspp_seeds(X, K, g), max_iter) for _ in range(n_init)]
    return max(runs, key=lambda r: r[1])[0]


#: the ways :func:`train_topk_sae` can initialise the SAE (see the module doc)
INITS = ("kmeans", "random")


def train_topk_sae(X: torch.Tensor, n_latents: int, k: int = 3, *, epochs: int = 300,
                   batch_size: int = 512, patience: int = 10, val_frac: float = 0.1,
                   lr: float | None = None, seed: int = 0, progress: bool = False,
                   init: str = "kmeans", n_init: int = 10) -> SAETrainResult:
    """Train on preprocessed activations ``X [N, d]`` (see :func:`preprocess`); ``init`` and
    ``n_init`` as in the module doc. The same ``X`` and arguments give the same SAE."""
    if X.ndim != 2 or X.shape[0] < 2:
        raise ValueError(f"X must be [N >= 2, d], got {tuple(X.shape)}")
    if init not in INITS:
        raise ValueError(f"init must be one of {INITS}, got {init!r}")
    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed)
    N = X.shape[0]
    perm = torch.randperm(N, generator=g)
    n_val = max(1, int(N * val_frac)) if N >= 10 else 0
    val, tr = X[perm[:n_val]], X[perm[n_val:]]
    if n_latents > tr.shape[0]:
        raise ValueError(f"n_latents (K) = {n_latents} exceeds the {tr.shape[0]} training rows")
    sae = TopKSAE(X.shape[1], n_latents, k)
    if init == "kmeans":
        C = spherical_kmeans(tr, n_latents, n_init=n_init, generator=g)
        with torch.no_grad():
            sae.encoder.weight.copy_(C)
            sae.W_dec.copy_(C)
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


def adjusted_rand_index(a, b) -> float:
    """Adjusted Rand index of two labelings of the same rows: 1 when they make the same partition
    (whatever the label names), about 0 for independent labelings, negative below chance."""
    a, b = torch.as_tensor(a).flatten(), torch.as_tensor(b).flatten()
    if a.shape != b.shape or a.numel() < 2:
        raise ValueError(f"need two labelings of the same >= 2 rows, got {a.numel()} and {b.numel()} labels")
    a, b = a.unique(return_inverse=True)[1], b.unique(return_inverse=True)[1]
    nb = int(b.max()) + 1
    table = torch.bincount(a * nb + b, minlength=(int(a.max()) + 1) * nb).double().view(-1, nb)

    def pairs(counts):
        return float((counts * (counts - 1) / 2).sum())
    together, in_a, in_b = pairs(table), pairs(table.sum(1)), pairs(table.sum(0))
    expected = in_a * in_b / (a.numel() * (a.numel() - 1) / 2)
    best = (in_a + in_b) / 2
    if best == expected:              # both labelings put every row in one group, or each row alone
        return 1.0
    return (together - expected) / (best - expected)


def _heldout_rows(n: int, groups, frac: float) -> torch.Tensor:
    """A fixed (seed-independent) boolean mask over ``n`` rows: whole groups (``groups``, e.g. the
    trace of each sentence; each row its own group when None), taken in a fixed random order until
    at least ``frac`` of the rows, and at least 2, are held out."""
    if not 0 < frac < 1:
        raise ValueError(f"heldout_frac must be in (0, 1), got {frac}")
    groups = torch.arange(n) if groups is None else torch.as_tensor(groups)
    _, group_of, sizes = groups.unique(return_inverse=True, return_counts=True)
    order = torch.randperm(len(sizes), generator=torch.Generator().manual_seed(0))
    taken = int((sizes[order].cumsum(0) < max(2, frac * n)).sum()) + 1
    if taken >= len(sizes):
        raise ValueError(f"cannot hold out {frac:.0%} of {n} rows as whole groups and train on the rest: "
                         f"{len(sizes)} group(s)")
    return torch.isin(group_of, order[:taken])


def assignment_stability(X: torch.Tensor, n_latents: int, k: int = 3, *, seeds=(0, 1, 2), groups=None,
                         heldout_frac: float = 0.2, **train_kwargs) -> dict:
    """How much the categories depend on the seed: one SAE per seed (:func:`train_topk_sae` with
    ``train_kwargs``) on the same training rows of preprocessed ``X``, each categorising the same
    held-out rows (whole ``groups`` when given, e.g. traces); the adjusted Rand index
    (:func:`adjusted_rand_index`) of every pair of seeds. Returns ``mean_ari``, ``min_ari``,
    ``pairwise`` (``[seed_a, seed_b, ari]`` rows), ``seeds``, ``n_train``, ``n_heldout``."""
    seeds = list(seeds)
    if len(seeds) < 2 or len(set(seeds)) != len(seeds):
        raise ValueError(f"need >= 2 distinct seeds to compare, got {seeds}")
    held = _heldout_rows(X.shape[0], groups, heldout_frac)
    cats = [train_topk_sae(X[~held], n_latents, k, seed=s, **train_kwargs).sae.categorize(X[held]) for s in seeds]
    pairwise = [[seeds[i], seeds[j], adjusted_rand_index(cats[i], cats[j])]
                for i in range(len(seeds)) for j in range(i + 1, len(seeds))]
    aris = [r[2] for r in pairwise]
    return dict(mean_ari=sum(aris) / len(aris), min_ari=min(aris), pairwise=pairwise, seeds=seeds,
                n_train=int((~held).sum()), n_heldout=int(held.sum()))
