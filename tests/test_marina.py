"""Byz-VR-MARINA-PP against an independent numpy loop fed with the same random draws."""

import argparse
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jbyz.aggregators import AGGREGATORS
from jbyz.algorithms import marina as M
from jbyz.attacks import ATTACKS
from jbyz.compression import randk
from jbyz.registry import ConfigError

N, MS, D, B, BBIG = 6, 5, 3, 2, 3  # clients, samples per client, dimension, b, b'


def _problem():
    rng = np.random.default_rng(0)
    a = rng.normal(size=(N * MS, D)).astype(np.float32)
    y = (a @ np.array([1.0, -2.0, 0.5]) + rng.normal(size=N * MS) * 0.3).astype(np.float32)
    y += np.repeat(np.arange(N), MS).astype(np.float32) * 0.2  # heterogeneous clients
    idx = np.arange(N * MS, dtype=np.int32).reshape(N, MS)
    return a, y, idx


def _loss(w, xb, yb):
    return 0.5 * jnp.mean(jnp.square(xb @ w - yb))


def _np_grad(w, a, y):
    return a.T @ (a @ w - y) / len(y)


def _reference(cfg, params, key, a, y, idx, k_randk=None, mult=2.0):
    """Algorithm 1 of Malinovsky et al. in numpy (float64), with the draws of ``round_keys``.

    ``mult``: the shift-back multiplier, a number or ``"lr"`` (the a9a script: ``mult = lr``).
    ``cfg.full_round_every``: the a9a script's full round at every epoch start.
    """
    a = a.astype(np.float64)
    y = y.astype(np.float64)
    lr, p, alpha, f_real = params.lr, params.p, params.alpha, params.f_real
    c, ch = cfg.sizes
    mult = lr if mult == "lr" else mult

    def local(i, w, pos=None):
        rows = idx[i] if pos is None else idx[i][pos]
        return _np_grad(w, a[rows], y[rows])

    def draw(k, i, size):
        return np.asarray(jax.random.randint(jax.random.fold_in(k, i), (size,), 0, MS))

    def full_msgs(w, clients, kgrad):
        if cfg.full_gradients:
            return np.stack([local(i, w) for i in clients])
        return np.stack([local(i, w, draw(kgrad, i, BBIG)) for i in clients])

    def attack(msgs, clients, w, x0, ref):
        byz = clients < f_real
        if not byz.any():
            return msgs
        if byz.sum() > (~byz).sum():
            mal = mult / lr * (w - x0) - ref
        else:
            mal = msgs[~byz].mean(0)
        out = msgs.copy()
        out[byz] = mal
        return out

    def agg(v):
        return np.median(v, axis=0) if cfg.aggregator.name == "median" else v.mean(0)

    x0 = np.zeros(D)
    rk = M.round_keys(key, M.INIT_ROUND)
    allc = np.arange(N)
    g = agg(attack(full_msgs(x0, allc, rk.grad), allc, x0, x0, 0.0))
    x = x0
    xs, gs, fulls, majs = [], [], [], []
    for k in range(cfg.num_steps):
        rk = M.round_keys(key, k)
        if cfg.full_round_every is not None:
            full = (k + 1) % cfg.full_round_every == 0
        else:
            full = bool(jax.random.bernoulli(rk.coin, p)) and not cfg.force_p_zero
        x_new = x - lr * g
        lam = alpha * (np.linalg.norm(x_new - x) if cfg.threshold == "step" else np.linalg.norm(g))
        perm = np.argsort(np.asarray(jax.random.uniform(rk.sample, (N,))), kind="stable")
        if full:
            clients = perm[:ch]
            msgs = attack(full_msgs(x_new, clients, rk.grad), clients, x_new, x0, 0.0)
            g_new = agg(msgs)
        else:
            clients = perm[:c]
            delta = np.stack([
                local(i, x_new, draw(rk.grad, i, B)) - local(i, x, draw(rk.grad, i, B))
                for i in clients
            ])
            if k_randk is not None:
                for s in range(len(clients)):
                    u = np.asarray(jax.random.uniform(jax.random.fold_in(rk.compress, s), (D,)))
                    keep = np.zeros(D, bool)
                    keep[np.argsort(-u, kind="stable")[:k_randk]] = True
                    delta[s] = np.where(keep, delta[s] * D / k_randk, 0.0)
            msgs = attack(delta, clients, x_new, x0, g)
            if cfg.clips:
                norms = np.linalg.norm(msgs, axis=1)
                msgs = msgs * np.minimum(1.0, lam / np.where(norms > 0, norms, 1.0))[:, None]
            g_new = g + (msgs.mean(0) if cfg.variant == "pp_plus" else agg(msgs))
        majs.append(2 * (clients < f_real).sum() > len(clients))
        fulls.append(full)
        x, g = x_new, g_new
        xs.append(x)
        gs.append(g)
    return np.array(xs), np.array(gs), np.array(fulls), np.array(majs)


CASES = {
    "pp_median_randk": dict(cfg=dict(clients_per_round=2, clients_full_round=4), agg="median",
                            k_randk=2, p=0.3, alpha=1.0),
    "pp_plus_mean_big_batch": dict(cfg=dict(clients_per_round=3, clients_full_round=5,
                                            variant="pp_plus", full_gradients=False),
                                   agg="mean", k_randk=None, p=0.3, alpha=0.5),
    "quirks_noclip_median": dict(cfg=dict(clients_per_round=2, threshold="aggregate",
                                          force_p_zero=True, clip=True),
                                 agg="median", k_randk=None, p=0.5, alpha=0.05),
    "marina_mean": dict(cfg=dict(variant="marina"), agg="mean", k_randk=None, p=0.2, alpha=1.0),
    # the a9a script: full rounds at epoch starts only (p = 0.9 unused), radius alpha ||g^k||,
    # shift-back with multiplier 'lr'
    "a9a_script_median": dict(cfg=dict(clients_per_round=2, threshold="aggregate",
                                       full_round_every=4),
                              agg="median", k_randk=None, p=0.9, alpha=0.5, mult="lr"),
}


@pytest.mark.parametrize(
    "case",
    [c if c in ("pp_median_randk", "quirks_noclip_median", "a9a_script_median")
     else pytest.param(c, marks=pytest.mark.slow)
     for c in CASES],
)
def test_matches_numpy_reference(case):
    spec = CASES[case]
    a, y, idx = _problem()
    oracle = M.finite_sum_oracle(_loss, a, y, idx, B, big_batch_size=BBIG, num_classes=1)
    comp = randk(k=spec["k_randk"]) if spec["k_randk"] else M.identity()
    mult = spec.get("mult", 2.0)
    cfg = M.MarinaConfig(num_clients=N, num_steps=25, aggregator=AGGREGATORS.build(spec["agg"]),
                         attack=M.shift_back(mult), compressor=comp, **spec["cfg"])
    params = M.MarinaParams(lr=0.1, p=spec["p"], alpha=spec["alpha"], f_real=2, f=0)
    key = jax.random.key(3)
    run = jax.jit(M.build_run(cfg, oracle, lambda x: {"x": x}))
    state, tr = run(jnp.zeros(D), params, key)
    xs, gs, fulls, majs = _reference(cfg, params, key, a, y, idx, spec["k_randk"], mult)
    np.testing.assert_array_equal(np.asarray(tr["full"]), fulls)
    np.testing.assert_array_equal(np.asarray(tr["byz_majority"]), majs)
    scale = 1.0 + np.abs(xs).max()
    np.testing.assert_allclose(np.asarray(tr["x"]), xs, rtol=1e-4, atol=1e-4 * scale)
    np.testing.assert_allclose(np.asarray(state.g), gs[-1], rtol=1e-4,
                               atol=1e-4 * (1 + np.abs(gs).max()))
    if cfg.full_round_every is not None:
        np.testing.assert_array_equal(fulls, (np.arange(25) + 1) % cfg.full_round_every == 0)
    elif cfg.force_p_zero:
        assert not fulls.any()
    elif cfg.variant != "marina":
        assert fulls.any() and not fulls.all()


def test_sampling_byzantine_majority_rounds():
    """C of n clients without replacement: hypergeometric Byzantine counts, majority rounds occur."""
    n, f, c, reps = 20, 5, 4, 20000
    keys = jax.random.split(jax.random.key(0), reps)
    s = np.asarray(jax.vmap(lambda k: M.sample_clients(k, n, c))(keys))
    assert all(len(set(r)) == c for r in s[:500])
    incl = np.bincount(s.ravel(), minlength=n) / reps
    assert np.all(np.abs(incl - c / n) < 5 * np.sqrt(c / n * (1 - c / n) / reps))
    nb = (s < f).sum(1)
    pmf = [math.comb(f, j) * math.comb(n - f, c - j) / math.comb(n, c) for j in range(c + 1)]
    for j in range(c + 1):
        assert abs((nb == j).mean() - pmf[j]) < 5 * np.sqrt(pmf[j] * (1 - pmf[j]) / reps) + 1e-4
    p_major = pmf[3] + pmf[4]  # 155 / 4845
    assert abs((2 * nb > c).mean() - p_major) < 5 * np.sqrt(p_major / reps)


def test_shift_back_attack():
    att = M.shift_back(2.0)
    x = jnp.array([[1.0, 1.0], [3.0, 3.0], [5.0, 5.0]])
    ctx = {"params": jnp.array([2.0, 0.0]), "x0": jnp.array([1.0, 1.0]), "lr": 0.5,
           "reference": jnp.array([1.0, 0.0])}
    byz = jnp.array([True, True, False])
    out, _ = att(x, ~byz, byz, jax.random.key(0), ctx=ctx)  # majority: 4 (x - x0) - ref
    np.testing.assert_allclose(out, [[3.0, -4.0], [3.0, -4.0], [5.0, 5.0]])
    byz = jnp.array([True, False, False])
    out, _ = att(x, ~byz, byz, jax.random.key(0), ctx=ctx)  # minority: mean of honest rows
    np.testing.assert_allclose(out, [[4.0, 4.0], [3.0, 3.0], [5.0, 5.0]])
    with pytest.raises(ConfigError):
        att(x, ~byz, byz, jax.random.key(0), ctx={})


def test_shift_back_forms_by_hand():
    """Each script's multiplier on x = (2, 0), x0 = (1, 1), r = (1, 0): the vector sent and the
    point ``x - gamma (r + v)`` the server lands on."""
    x = jnp.array([[1.0, 1.0], [3.0, 3.0], [5.0, 5.0]])
    byz = jnp.array([True, True, False])
    xk, x0, ref = np.array([2.0, 0.0]), np.array([1.0, 1.0]), np.array([1.0, 0.0])

    def sent(mult, lr):
        ctx = {"params": jnp.asarray(xk), "x0": jnp.asarray(x0), "lr": lr,
               "reference": jnp.asarray(ref)}
        out, _ = M.shift_back(mult)(x, ~byz, byz, jax.random.key(0), ctx=ctx)
        np.testing.assert_allclose(out[2], [5.0, 5.0])  # the honest row is untouched
        np.testing.assert_allclose(out[0], out[1])
        return np.asarray(out[0])

    # a9a script (multiplier='lr'): v = (x - x0) - r = (0, -1) at any stepsize; the server lands
    # on x + gamma (x0 - x)
    for lr in (0.5, 0.1):
        v = sent("lr", lr)
        np.testing.assert_allclose(v, [0.0, -1.0])
        np.testing.assert_allclose(xk - lr * (ref + v), xk + lr * (x0 - xk), atol=1e-6)
    np.testing.assert_allclose(xk - 0.5 * (ref + sent("lr", 0.5)), [1.5, 0.5])
    # MNIST script (multiplier=2.): v = (2 / 0.5)(x - x0) - r = (3, -4): reflection 2 x0 - x
    v = sent(2.0, 0.5)
    np.testing.assert_allclose(v, [3.0, -4.0])
    np.testing.assert_allclose(xk - 0.5 * (ref + v), [0.0, 2.0])
    # multiplier 1: v = (1, -2), back on x0 exactly
    v = sent(1.0, 0.5)
    np.testing.assert_allclose(v, [1.0, -2.0])
    np.testing.assert_allclose(xk - 0.5 * (ref + v), x0)
    with pytest.raises(ConfigError, match="mult must be a number or 'lr'"):
        M.shift_back("gamma")
    with pytest.raises(ConfigError, match="otherwise must be 'mean' or 'own'"):
        M.shift_back("lr", otherwise="median")


def test_full_round_every_epoch_start_by_hand():
    """E = 3, 7 rounds: full rounds at k = 2, 5 (the script's rounds 3 and 6, epoch starts),
    whatever p; g^{k+1} is then the mean of all clients' full gradients at x^{k+1}; the epoch
    count adds 1 per full round and C * 2b / (n m) per compressed one."""
    a, y, idx = _problem()
    oracle = M.finite_sum_oracle(_loss, a, y, idx, B, num_classes=1)
    cfg = M.MarinaConfig(num_clients=N, num_steps=7, aggregator=AGGREGATORS.build("mean"),
                         clients_per_round=2, full_round_every=3)
    run = jax.jit(M.build_run(cfg, oracle, lambda x: {"x": x}))
    want = np.array([False, False, True, False, False, True, False])
    traces = []
    for p in (0.0, 1.0):
        _, tr = run(jnp.zeros(D), M.MarinaParams(lr=0.1, p=p, alpha=1.0), jax.random.key(1))
        np.testing.assert_array_equal(np.asarray(tr["full"]), want)
        traces.append(tr)
    np.testing.assert_allclose(traces[0]["x"], traces[1]["x"])  # p is not used
    comp = 2 * 2 * B / (N * MS)  # C = 2 clients, 2 minibatches of b = 2, over n m = 30
    epochs = 1.0 + np.cumsum(np.where(want, 1.0, comp))
    np.testing.assert_allclose(np.asarray(traces[0]["epochs"]), epochs, rtol=1e-6)
    # in a full round every client sends its full local gradient at x^{k+1}; mean aggregator
    cfg1 = M.MarinaConfig(num_clients=N, num_steps=3, aggregator=AGGREGATORS.build("mean"),
                          clients_per_round=2, full_round_every=3)
    state, tr = jax.jit(M.build_run(cfg1, oracle, lambda x: {"x": x}))(
        jnp.zeros(D), M.MarinaParams(lr=0.1, p=0.0, alpha=1.0), jax.random.key(1))
    x3 = np.asarray(tr["x"][-1], np.float64)
    g_full = np.mean([_np_grad(x3, a[idx[i]].astype(np.float64), y[idx[i]]) for i in range(N)],
                     axis=0)
    np.testing.assert_allclose(np.asarray(state.g), g_full, rtol=1e-5, atol=1e-6)


def _logreg_setup(steps):
    rng = np.random.default_rng(1)
    a = rng.normal(size=(40, 4)).astype(np.float32)
    y = (a @ np.array([1.0, -1.0, 2.0, 0.0]) + 0.5 * rng.normal(size=40) > 0).astype(np.int32)
    idx = np.tile(np.arange(40, dtype=np.int32), (10, 1))  # every client holds the full data

    def loss(w, xb, yb):
        s = 2.0 * yb - 1.0
        return jnp.mean(jnp.logaddexp(0.0, -s * (xb @ w))) + 0.05 * jnp.sum(w * w)

    oracle = M.finite_sum_oracle(loss, a, y, idx, 8)
    aj, yj = jnp.asarray(a), jnp.asarray(y)
    return oracle, (lambda w: {"loss": loss(w, aj, yj)}), steps


@pytest.mark.slow
def test_clipping_survives_shift_back_and_no_clipping_does_not():
    """10 clients (3 Byzantine), 3 sampled per round: the paper's §5 claim on a small problem."""
    oracle, metric, steps = _logreg_setup(300)
    runs = {}
    for clip in (True, False):
        cfg = M.MarinaConfig(num_clients=10, num_steps=steps, aggregator=AGGREGATORS.build("median"),
                             attack=M.shift_back(), clients_per_round=3, clip=clip)
        runs[clip] = jax.jit(M.build_run(cfg, oracle, metric))
    key = jax.random.key(0)
    _, ref = runs[True](jnp.zeros(4), M.MarinaParams(0.5, 0.2, 1.0, 0, 0), key)  # no Byzantines
    _, tr = runs[True](jnp.zeros(4), M.MarinaParams(0.5, 0.2, 1.0, 3, 0), key)
    _, bad = runs[False](jnp.zeros(4), M.MarinaParams(0.5, 0.2, 1.0, 3, 0), key)
    best, init = float(ref["loss"][-1]), float(ref["init"]["loss"])
    assert not np.asarray(ref["byz_majority"]).any()
    assert np.asarray(tr["byz_majority"]).sum() >= 3  # attack rounds happened
    assert float(tr["loss"][-1]) - best < 1e-3 * (init - best)
    tail = np.asarray(bad["loss"][-50:])
    assert not np.all(np.isfinite(tail)) or np.median(tail) - best > 0.3 * (init - best)


def test_label_flip_uses_flipped_labels_for_byzantine_clients():
    a, y, idx = _problem()
    yb = (y > np.median(y)).astype(np.int32)

    def loss(w, xb, ybb):
        return jnp.mean(jnp.square(xb @ w - ybb))

    oracle = M.finite_sum_oracle(loss, a, yb, idx, B, num_classes=2)
    x = jnp.ones(D)
    g_honest = oracle.full_grad(x, jnp.int32(1), jnp.bool_(False))
    g_flip = oracle.full_grad(x, jnp.int32(1), jnp.bool_(True))
    ref = 2 * a[idx[1]].T @ (a[idx[1]] @ np.ones(D) - (1 - yb[idx[1]])) / MS
    np.testing.assert_allclose(g_flip, ref, rtol=1e-5)
    assert not np.allclose(g_honest, g_flip)
    cfg = M.MarinaConfig(num_clients=N, num_steps=3, aggregator=AGGREGATORS.build("mean"),
                         attack=ATTACKS.build("label_flip"), clients_per_round=2)
    state, _ = jax.jit(M.build_run(cfg, oracle))(jnp.zeros(D), M.MarinaParams(0.1, 0.5, 1.0, 2, 0),
                                                 jax.random.key(0))
    assert np.all(np.isfinite(np.asarray(state.x)))


def test_config_validation():
    agg = AGGREGATORS.build("mean")
    with pytest.raises(ConfigError):
        M.MarinaConfig(num_clients=5, num_steps=1, aggregator=agg, variant="nope")
    with pytest.raises(ConfigError):
        M.MarinaConfig(num_clients=5, num_steps=1, aggregator=agg, clients_per_round=6)
    with pytest.raises(ConfigError):
        M.MarinaConfig(num_clients=5, num_steps=1, aggregator=agg, threshold="x")
    cfg = M.MarinaConfig(num_clients=5, num_steps=1, aggregator=agg, variant="marina",
                         clients_per_round=2)
    assert cfg.sizes == (5, 5) and not cfg.clips
    for bad in (0, -2, 2.5, True, "3"):
        with pytest.raises(ConfigError, match="full_round_every must be None or an int >= 1"):
            M.MarinaConfig(num_clients=5, num_steps=1, aggregator=agg, full_round_every=bad)
    with pytest.raises(ConfigError, match="exclude each other"):
        M.MarinaConfig(num_clients=5, num_steps=1, aggregator=agg, full_round_every=3,
                       force_p_zero=True)
    assert M.MarinaConfig(num_clients=5, num_steps=1, aggregator=agg,
                          full_round_every=np.int64(2)).full_round_every == 2


def _run_fmnist_module(monkeypatch):
    import importlib.util
    from pathlib import Path

    here = Path(__file__).resolve().parents[1] / "experiments" / "marina_pp"
    monkeypatch.syspath_prepend(str(here))  # the script imports its sibling config_file.py
    path = here / "run_fmnist.py"
    spec = importlib.util.spec_from_file_location("marina_run_fmnist", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_fmnist_script_shift_back_multiplier_option(capsys, monkeypatch):
    """``run_fmnist.py --shift-back-mult``: 2 (MNIST script) by default, ``lr`` (a9a script and
    the paper) on request; the attack it builds lands where that form says; bad text is refused
    with the valid forms named."""
    mod = _run_fmnist_module(monkeypatch)
    assert mod.parse_mult("lr") == "lr" and mod.parse_mult("2") == 2.0
    with pytest.raises(argparse.ArgumentTypeError, match="must be a number .* or 'lr'"):
        mod.parse_mult("half")
    x = jnp.array([[1.0, 1.0], [3.0, 3.0], [5.0, 5.0]])
    byz = jnp.array([True, True, False])
    ctx = {"params": jnp.array([2.0, 0.0]), "x0": jnp.array([1.0, 1.0]), "lr": 0.1}
    for mult, landing in ((2.0, [0.0, 2.0]), ("lr", [1.9, 0.1])):
        out, _ = mod.make_attack("shift_back", mult)(x, ~byz, byz, jax.random.key(0), ctx=ctx)
        np.testing.assert_allclose(ctx["params"] - ctx["lr"] * out[0], landing, atol=1e-6)
    for argv, shown in ((["--check"], "shift-back multiplier 2.0"),
                        (["--check", "--shift-back-mult", "lr"], "shift-back multiplier lr")):
        monkeypatch.setattr("sys.argv", ["run_fmnist.py", *argv])
        mod.main()
        assert shown in capsys.readouterr().out
    monkeypatch.setattr("sys.argv", ["run_fmnist.py", "--check", "--shift-back-mult", "x"])
    with pytest.raises(SystemExit):
        mod.main()
    assert "must be a number" in capsys.readouterr().err
