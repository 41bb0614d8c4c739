"""Taxonomies that do not depend on the seed: planted directions recovered by every seed, the
adjusted Rand index against hand-computed cases, and the stability figure across seeds."""
import json
from pathlib import Path

import pytest
import torch

from hybridfast.sae import adjusted_rand_index, assignment_stability, preprocess, train_topk_sae


def planted(n_dirs: int, n: int = 4000, d: int = 64, noise: float = 0.15, seed: int = 0):
    """``n`` points, each one of ``n_dirs`` random unit directions plus N(0, noise²) per
    coordinate: ``(X, label, directions)``."""
    g = torch.Generator().manual_seed(seed)
    U = torch.nn.functional.normalize(torch.randn(n_dirs, d, generator=g), dim=1)
    y = torch.randint(n_dirs, (n,), generator=g)
    return U[y] + noise * torch.randn(n, d, generator=g), y, U


def purity(cat, y) -> float:
    """Fraction of points whose category's most common label is their own."""
    return sum(int(torch.bincount(y[cat == c]).max()) for c in cat.unique()) / len(y)


def split(n_dirs):
    """Preprocessed training rows (3000) and held-out rows (1000) with their labels."""
    X, y, U = planted(n_dirs)
    assert purity((X[3000:] @ U.T).argmax(1), y[3000:]) == 1.0     # the nearest direction is always right
    Xt, mean = preprocess(X[:3000])
    return Xt, preprocess(X[3000:], mean=mean)[0], y[3000:]


@pytest.mark.parametrize("n_dirs,k", [(8, 3), (8, 1), (12, 3)])
def test_every_seed_recovers_planted_directions(n_dirs, k):
    Xt, Xh, yh = split(n_dirs)
    got = [purity(train_topk_sae(Xt, n_dirs, k, seed=s).sae.categorize(Xh), yh) for s in range(5)]
    assert min(got) >= 0.95, got


def test_random_init_merges_planted_directions():
    """The paper's random init on the same case: some seed shares one latent between two planted
    directions (the failure the k-means init removes)."""
    Xt, Xh, yh = split(8)
    got = [purity(train_topk_sae(Xt, 8, 3, seed=s, init="random").sae.categorize(Xh), yh) for s in (0, 1, 2)]
    assert min(got) < 0.95, got


def test_training_is_deterministic_per_seed():
    X, _, _ = planted(4, n=600)
    Xp, _ = preprocess(X)
    a, b = (train_topk_sae(Xp, 4, 2, seed=7, epochs=5).sae.state_dict() for _ in range(2))
    assert all(torch.equal(a[n], b[n]) for n in a)


def test_training_errors_name_the_bad_value():
    Xp, _ = preprocess(planted(4, n=20)[0])
    with pytest.raises(ValueError, match="n_latents \\(K\\) = 30 exceeds the 18 training rows"):
        train_topk_sae(Xp, 30, 3)
    with pytest.raises(ValueError, match="init must be one of .* got 'pca'"):
        train_topk_sae(Xp, 4, 3, init="pca")
    with pytest.raises(ValueError, match=r"need >= 2 distinct seeds to compare, got \[0\]"):
        assignment_stability(Xp, 4, 3, seeds=(0,))


def test_adjusted_rand_index_hand_computed():
    a = [0, 0, 1, 1, 2, 2]
    assert adjusted_rand_index(a, a) == 1.0
    assert adjusted_rand_index(a, [5, 5, 9, 9, 7, 7]) == 1.0                # label names do not matter
    # [0,0,1,2] vs [0,0,1,1]: pairs together in both 1, in a 1, in b 2, of 6; expected 1*2/6 = 1/3,
    # best (1+2)/2 = 3/2 -> (1 - 1/3) / (3/2 - 1/3) = 4/7
    assert adjusted_rand_index([0, 0, 1, 2], [0, 0, 1, 1]) == pytest.approx(4 / 7)
    # [0,0,1,1] vs [0,1,0,1]: no pair together in both; expected 2*2/6 -> (0 - 2/3) / (2 - 2/3) = -1/2
    assert adjusted_rand_index([0, 0, 1, 1], [0, 1, 0, 1]) == pytest.approx(-0.5)
    g = torch.Generator().manual_seed(0)
    independent = adjusted_rand_index(torch.randint(5, (20000,), generator=g), torch.randint(5, (20000,), generator=g))
    assert abs(independent) < 0.005
    with pytest.raises(ValueError, match="same >= 2 rows, got 3 and 2 labels"):
        adjusted_rand_index([0, 1, 1], [0, 1])


def test_stability_separates_stable_from_unstable_K():
    """8 planted directions: K = 8 gives the same categories whatever the seed; K = 12 splits
    some directions, differently per seed."""
    X, _, _ = planted(8, n=2000)
    Xp, _ = preprocess(X)
    stable, unstable = (assignment_stability(Xp, K, 3, seeds=(0, 1, 2)) for K in (8, 12))
    assert stable["mean_ari"] >= 0.99 and unstable["mean_ari"] < 0.9, (stable, unstable)
    assert [p[:2] for p in stable["pairwise"]] == [[0, 1], [0, 2], [1, 2]]
    assert stable["n_heldout"] == 400 and stable["n_train"] == 1600


def test_stability_holds_out_whole_groups():
    X, _, _ = planted(4, n=400)
    Xp, _ = preprocess(X)
    groups = torch.arange(400) // 10                                      # 40 "traces" of 10 sentences
    st = assignment_stability(Xp, 4, 2, seeds=(3, 4), groups=groups, epochs=5)
    assert st["n_heldout"] == 80 and st["seeds"] == [3, 4] and -1 <= st["min_ari"] <= 1
    with pytest.raises(ValueError, match="cannot hold out 20% of 400 rows as whole groups .*: 1 group"):
        assignment_stability(Xp, 4, 2, groups=torch.zeros(400))


def test_discover_sweep_reports_stability(tmp_path, capsys):
    """`hybridfast discover` puts the stability figure in taxonomy.json and in each sweep row, and
    refuses a seed count that compares nothing."""
    from hybridfast.pipeline_cli import discover_main
    from hybridfast.prompts import thinking_prompt
    from hybridfast.tiny import tiny_tokenizer
    from tests.helpers import refused
    assert "--stability-seeds must be 0 (skip) or >= 2" in refused(["--stability-seeds", "1"], capsys, discover_main)
    data = Path(__file__).resolve().parents[1] / "hybridfast" / "data" / "gsm8k_train_sample.jsonl"
    tok = tiny_tokenizer()
    traces = [dict(question=r["question"], prompt=thinking_prompt(tok, r["question"]), thinking=r["answer"],
                   response=r["answer"]) for r in map(json.loads, data.read_text().splitlines()[:16])]
    (tmp_path / "traces.jsonl").write_text("".join(json.dumps(t) + "\n" for t in traces))
    discover_main(["--traces", str(tmp_path / "traces.jsonl"), "--K", "3", "--stability-seeds", "2",
                   "--out", str(tmp_path / "tx")])
    row = json.loads((tmp_path / "tx" / "sweep.json").read_text())[0]
    st = json.loads((tmp_path / "tx" / "sae-L2-K3" / "taxonomy.json").read_text())["stability"]
    assert st["seeds"] == [0, 1] and row["mean_ari"] == row["min_ari"] == st["pairwise"][0][2]
    assert st["n_heldout"] >= 2 and -1 <= st["mean_ari"] <= 1
