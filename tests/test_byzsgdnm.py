"""ByzSGDnm / ByzSGDm chains, the theory's optimal batch size, lr selection, fixed-compute configs."""

import math
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pandas as pd
import pytest

from jbyz.algorithms.byzsgdnm import (
    byzsgdm,
    byzsgdm_bound,
    byzsgdnm,
    epoch_cosine_schedule,
    optimal_batch_size,
    optimal_batch_size_nm,
    select_lr,
)
from jbyz.config import load_experiment

ROOT = Path(__file__).resolve().parents[1]
N, F, BETA = 6, 2, 0.9


# ----------------------------------------------------------------------------- numpy reference


def _np_nnm(x, f):
    d2 = ((x[:, None, :] - x[None, :, :]) ** 2).sum(-1)
    k = x.shape[0] - f
    out = np.empty_like(x)
    for i in range(x.shape[0]):
        near = np.argsort(d2[i], kind="stable")[:k]
        out[i] = x[near].mean(0)
    return out


def _np_reference(grads, w0, lrs, *, normalize, nnm=False, flip_scale=None, f_real=0):
    """The update of Yang et al.'s Algorithm 1, step by step, in float64."""
    w = w0.astype(np.float64).copy()
    u = None
    out = []
    for t, g in enumerate(grads):
        g = g.astype(np.float64)
        u = g.copy() if t == 0 else BETA * u + (1 - BETA) * g  # u_0 = g_0, then EMA
        sent = u.copy()
        if flip_scale is not None:
            sent[:f_real] = flip_scale * sent[:f_real]
        if nnm:
            sent = _np_nnm(sent, F)
        agg = np.median(sent, axis=0)
        step = agg / max(np.linalg.norm(agg), 1e-12) if normalize else agg
        w = w - lrs[t] * step
        out.append(w.copy())
    return out


def _grads(steps, d, seed=0):
    rng = np.random.default_rng(seed)
    # workers share a drift so the momenta matter, plus per-worker noise
    base = rng.normal(size=(steps, 1, d))
    return (base + 0.7 * rng.normal(size=(steps, N, d))).astype(np.float32)


@pytest.mark.parametrize("normalize", [True, False])
@pytest.mark.parametrize("variant", ["plain", "nnm", "attacked"])
def test_chain_equals_numpy_reference(normalize, variant):
    d, steps = 7, 5
    grads = _grads(steps, d, seed=1 + normalize)
    # a pytree of two leaves, split 3 + 4, checks that the norm is global, not per leaf
    split = lambda v: {"a": v[..., :3], "b": v[..., 3:].reshape(v.shape[:-1] + (2, 2))}  # noqa: E731
    join = lambda p: np.concatenate([np.asarray(p["a"]), np.asarray(p["b"]).reshape(-1)])  # noqa: E731
    w0 = np.linspace(-1.0, 1.0, d).astype(np.float32)
    sched = epoch_cosine_schedule(0.5, epochs=3, steps_per_epoch=2)
    lrs = [float(sched(t)) for t in range(steps)]
    assert lrs[0] == pytest.approx(0.5) and lrs[2] == pytest.approx(0.25 * (1 + math.cos(math.pi / 3)))
    kw = dict(num_workers=N, aggregator="median", f=F)
    ref_kw = {}
    if variant == "nnm":
        kw["preaggregators"] = ["nnm"]
        ref_kw["nnm"] = True
    if variant == "attacked":
        kw.update(attack={"name": "sign_flip", "scale": -10.0}, f_real=1)
        ref_kw.update(flip_scale=-10.0, f_real=1)
    tx = (byzsgdnm if normalize else byzsgdm)(sched, **kw)
    params = split(jnp.asarray(w0))
    state = tx.init(params)
    ref = _np_reference(grads, w0, lrs, normalize=normalize, **ref_kw)

    @jax.jit
    def step(params, state, g):
        upd, state = tx.update(split(g), state, params)
        return optax.apply_updates(params, upd), state

    for t in range(steps):
        params, state = step(params, state, jnp.asarray(grads[t]))
        np.testing.assert_allclose(join(params), ref[t], rtol=2e-5, atol=2e-5, err_msg=f"step {t}")
    if normalize:  # each step moves the parameters by exactly lr_t
        w_prev = ref[-2]
        assert np.linalg.norm(ref[-1] - w_prev) == pytest.approx(lrs[-1], rel=1e-9)


def test_zero_initialised_momentum_differs():
    """u_0 = g_0 matters: the reference with u_{-1} = 0 gives other iterates (so the test above
    would catch a chain built with first="zero")."""
    grads = _grads(4, 5, seed=3)
    w0 = np.zeros(5, np.float32)
    ref = _np_reference(grads, w0, [0.1] * 4, normalize=False)
    u = (1 - BETA) * grads[0].astype(np.float64)
    w_zero = w0 - 0.1 * np.median(u, axis=0)
    assert not np.allclose(ref[0], w_zero)


def test_epoch_cosine_schedule_is_a_staircase():
    s = epoch_cosine_schedule(2.0, epochs=4, steps_per_epoch=2.5)
    vals = [float(s(t)) for t in range(12)]
    want = [1.0 + math.cos(math.pi * min(math.floor(t / 2.5), 3) / 4) for t in range(12)]
    np.testing.assert_allclose(vals, want, rtol=1e-6)
    assert vals[-1] > 0  # the last epoch keeps a positive rate (i = E - 1)


# ----------------------------------------------------------------------------- theory


def test_optimal_batch_size_hand_values():
    # delta = 3/8, m = 8, c = 1: c d (1 + c d m) / (m (1 - d)) = 0.375 * 4 / 5 = 0.3;
    # 3 / (16 L^2 F0^2 m) = 3/128; B*^3 = 3/128 * 0.3 * sigma^4 * C
    b = optimal_batch_size(3 / 8, 8, sigma=1.0, L=1.0, F0=1.0, C=1e6, c=1.0)
    assert b**3 == pytest.approx(3 / 128 * 0.3 * 1e6, rel=1e-12)  # 7031.25 -> B* = 19.157...
    assert b == pytest.approx(19.1574, abs=1e-3)
    # sigma^(4/3), C^(1/3), (L F0)^(-2/3) scalings
    assert optimal_batch_size(3 / 8, 8, 2.0, 1.0, 1.0, 1e6, 1.0) == pytest.approx(b * 2 ** (4 / 3))
    assert optimal_batch_size(3 / 8, 8, 1.0, 1.0, 1.0, 8e6, 1.0) == pytest.approx(2 * b)
    assert optimal_batch_size(3 / 8, 8, 1.0, 2.0, 4.0, 1e6, 1.0) == pytest.approx(b / 4)
    # delta = 1/8, m = 8, c = 2, sigma = 3, L = 0.5, F0 = 2, C = 5e5:
    # c d (1 + c d m) / (m (1 - d)) = 0.25 * 3 / 7; 3 / (16 * 0.25 * 4 * 8) = 3 / 128
    b2 = optimal_batch_size(1 / 8, 8, sigma=3.0, L=0.5, F0=2.0, C=5e5, c=2.0)
    assert b2**3 == pytest.approx(3 / 128 * (0.75 / 7) * 3.0**4 * 5e5, rel=1e-12)


def test_optimal_batch_size_minimises_the_bound():
    args = dict(m=8, sigma=1.5, L=1.0, F0=2.0, C=1e7, c=1.0)
    for delta in (1 / 8, 3 / 8):
        b = optimal_batch_size(delta, **args)
        grid = np.linspace(0.2 * b, 5 * b, 20001)
        vals = [byzsgdm_bound(x, delta, **args) for x in grid]
        assert grid[int(np.argmin(vals))] == pytest.approx(b, rel=1e-3)
        k = optimal_batch_size(delta, **args, integer=True)
        assert isinstance(k, int) and k in (math.floor(b), math.floor(b) + 1)
        ints = range(max(1, k - 3), k + 4)
        assert k == min(ints, key=lambda x: byzsgdm_bound(x, delta, **args))


def test_optimal_batch_size_grows_with_delta():
    args = dict(m=8, sigma=1.0, L=1.0, F0=1.0, C=1e6, c=1.0)
    deltas = [0.0, 0.01, 1 / 8, 0.25, 3 / 8, 0.45]
    bs = [optimal_batch_size(d, **args) for d in deltas]
    assert bs[0] == 0.0 and optimal_batch_size(0.0, **args, integer=True) == 1
    assert all(a < b for a, b in zip(bs, bs[1:]))
    nm = [optimal_batch_size_nm(d, 8, 1.0, 1.0, 1.0, 1.0) for d in deltas]
    assert all(a < b for a, b in zip(nm, nm[1:]))
    assert nm[0] == pytest.approx(9 / 640)  # 9 * 1 / (80 * 8)
    with pytest.raises(ValueError):
        optimal_batch_size(1.0, **args)


# ----------------------------------------------------------------------------- lr selection


def _hand_table():
    # one cell per method at B = 64; lr in {0.1, 1.0}; attacks none / alie / foe; 2 seeds
    acc = {  # (normalize, attack, lr) -> accuracies of seeds 0, 1
        (True, "none", 0.1): (0.90, 0.92), (True, "none", 1.0): (0.94, 0.94),
        (True, "alie", 0.1): (0.70, 0.72), (True, "alie", 1.0): (0.80, 0.60),
        (True, "foe", 0.1): (0.85, 0.85), (True, "foe", 1.0): (0.88, 0.86),
        (False, "none", 0.1): (0.91, 0.91), (False, "none", 1.0): (0.20, 0.30),
        (False, "alie", 0.1): (0.50, 0.50), (False, "alie", 1.0): (0.60, 0.62),
        (False, "foe", 0.1): (0.80, 0.80), (False, "foe", 1.0): (0.10, 0.10),
    }
    rows = []
    for (nm, atk, lr), seeds in acc.items():
        for seed, a in enumerate(seeds):
            run = f"{nm}-{atk}-{lr}-{seed}"
            # two evaluations; the final one is the second, the best may be the first
            rows.append(dict(run_id=run, step=0, test_accuracy=a + 0.05, normalize=nm, attack=atk,
                             lr=lr, seed=seed, batch_size=64))
            rows.append(dict(run_id=run, step=10, test_accuracy=a, normalize=nm, attack=atk,
                             lr=lr, seed=seed, batch_size=64))
    return pd.DataFrame(rows)


def test_select_lr_on_hand_made_table():
    res = select_lr(_hand_table(), cell=["normalize", "batch_size"], attack="attack")
    pa = res.per_attack.set_index(["normalize", "attack"])
    # final accuracy, mean over seeds; best lr per attack (the paper's way)
    assert pa.loc[(True, "none"), "best_lr"] == 1.0 and pa.loc[(True, "none"), "value"] == pytest.approx(0.94)
    assert pa.loc[(True, "alie"), "best_lr"] == 0.1 and pa.loc[(True, "alie"), "value"] == pytest.approx(0.71)
    assert pa.loc[(True, "foe"), "best_lr"] == 1.0 and pa.loc[(True, "foe"), "value"] == pytest.approx(0.87)
    assert pa.loc[(False, "none"), "best_lr"] == 0.1
    assert pa.loc[(False, "alie"), "best_lr"] == 1.0 and pa.loc[(False, "alie"), "value"] == pytest.approx(0.61)
    assert (pa["n_lr"] == 2).all()
    rb = res.robust.set_index("normalize")
    # normalize: worst over attacks is 0.71 (lr 0.1) vs 0.70 (lr 1.0) -> 0.1
    assert rb.loc[True, "robust_lr"] == 0.1 and rb.loc[True, "worst"] == pytest.approx(0.71)
    assert rb.loc[True, "worst_attack"] == "alie"
    assert rb.loc[True, "paper_worst"] == pytest.approx(0.71)
    # baseline: lr 0.1 -> min(0.91, 0.5, 0.8) = 0.5; lr 1.0 -> min(0.25, 0.61, 0.1) = 0.1
    assert rb.loc[False, "robust_lr"] == 0.1 and rb.loc[False, "worst"] == pytest.approx(0.5)
    assert rb.loc[False, "at_foe"] == pytest.approx(0.8)
    assert rb.loc[False, "paper_worst"] == pytest.approx(0.61)  # each attack its own lr
    # stat="best": the highest observed accuracy (here the first evaluation, +0.05)
    best = select_lr(_hand_table(), cell=["normalize", "batch_size"], attack="attack", stat="best")
    v = best.per_attack.set_index(["normalize", "attack"]).loc[(True, "alie"), "value"]
    assert v == pytest.approx(0.76)
    # default cell: the varying config columns other than lr / seed / attack
    auto = select_lr(_hand_table(), attack="attack")
    assert list(auto.robust["robust_lr"]) == list(res.robust.sort_values("normalize")["robust_lr"])


# ----------------------------------------------------------------------------- fixed-compute configs


def _steps_by(exp):
    return {(c.batch_size, c.f_real): (c.steps, c.compute_budget) for c in exp.runs()}


def test_scaled_config_steps_follow_the_budget():
    exp = load_experiment(ROOT / "experiments" / "byzsgdnm" / "scaled.toml")
    runs = exp.runs()
    got = _steps_by(exp)
    assert {b for b, _ in got} == {8, 32, 128} and {f for _, f in got} == {0, 1, 3}
    for (b, f), (steps, c) in got.items():
        assert c == 131072 * (8 - f) // 8  # C = C0 (1 - delta)
        assert steps == math.ceil(c / (b * (8 - f))) == 131072 // (8 * b)  # T = C / (B m (1 - delta))
    for cfg in runs:  # evaluations divide the run (one compiled chunk length per group)
        assert cfg.steps % cfg.eval_every == 0
        assert cfg.n_workers == 8 and cfg.momentum_at == "worker" and cfg.momentum_form == "ema"
        assert cfg.lr_schedule == "cosine"
    assert {c.normalize for c in runs} == {True, False}


def test_paper_config_steps_follow_the_budget():
    exp = load_experiment(ROOT / "experiments" / "byzsgdnm" / "paper.toml")
    got = _steps_by(exp)
    assert {b for b, _ in got} == {32, 64, 128, 256, 512, 1024}
    for (b, f), (steps, c) in got.items():
        assert c == 160 * 50000 * (8 - f) // 8  # 160 epochs of CIFAR-10 x (1 - delta)
        assert steps == math.ceil(160 * 6250 / b)  # 160 epochs of a worker's 6,250 samples
    assert got[(32, 3)][0] == 31250 and got[(1024, 3)][0] == 977
