"""Asynchronous SGD simulator: OrMo's order invariance (our reconstruction) against a numpy replay,
zero-delay equivalence with SSGDm against an independent loop, event order against a plain
Python priority-queue simulation, and the baselines' update rules against numpy."""

from __future__ import annotations

import heapq

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jbyz.algorithms.async_sgd import (
    AsyncConfig,
    AsyncSimulation,
    ServerRule,
    server_init,
    server_update,
)
from jbyz.data import load_dataset
from jbyz.protocols import LATENCIES, latency_table
from jbyz.registry import ConfigError

DS = load_dataset("synthetic_classification", n_samples=256, n_test=64, dim=6, classes=3)


# --------------------------------------------------------------------------------------------
# Order invariance of OrMo's server rule (pure server_update, fixed gradient vectors)


def _jit_update(rule, K):
    return jax.jit(lambda st, g, tag, tau, lr, beta: server_update(rule, st, g, tag, tau, lr, beta, K))


def _random_schedule(rng, K, arrivals, update, d, lr, beta):
    """Random arrival order of K workers; returns the final server state and the arrivals."""
    st = server_init(np.zeros(d, np.float32))
    tags = np.zeros(K, np.int64)
    sent_at = np.zeros(K, np.int64)
    log = []
    count = 0
    for _ in range(arrivals):
        k = int(rng.integers(K))
        g = rng.normal(size=d).astype(np.float32)
        tau = count - sent_at[k]
        log.append((g, int(tags[k]), int(tau), int(st.t)))
        st, _, tag_send, _ = update(st, g, tags[k], tau, lr, beta)
        count += 1
        tags[k] = int(tag_send)
        sent_at[k] = count
    return st, log


def _replay_in_order(log, closes, lr_of, beta, d):
    """Spec §5(b) one-at-a-time SSGDm, group by group in iteration order (numpy float64)."""
    w = np.zeros(d)
    u = np.zeros(d)
    for j in range(closes + 1):
        for g, tag, tau, t in log:
            if tag == j:
                eta = lr_of(tag, tau, t)
                u = u + eta * g
                w = w - eta * g
        if j < closes:
            w = w - beta * u
            u = beta * u
    return w, u


@pytest.mark.parametrize(
    "method,advance,unit",
    [("ormo", "fresh_gradient", None), ("ormo", "every_K", None),
     ("ormo_da", "fresh_gradient", "arrivals"), ("ormo_da", "fresh_gradient", "groups")],
)
def test_ormo_equals_in_order_replay(method, advance, unit):
    rng = np.random.default_rng(0)
    lr, beta, d = 0.1, 0.9, 4
    for K in (2, 3, 5, 8):
        rule = ServerRule(method=method, advance_rule=advance, da_delay_unit=unit or "arrivals")
        update = _jit_update(rule, K)
        for _ in range(6):
            arrivals = int(rng.integers(5, 40))
            st, log = _random_schedule(rng, K, arrivals, update, d, lr, beta)

            def lr_of(tag, tau, t):
                if method == "ormo":
                    return lr
                delay = tau if unit == "arrivals" else t - tag
                return lr if delay <= K else lr * K / delay

            w, u = _replay_in_order(log, int(st.t), lr_of, beta, d)
            np.testing.assert_allclose(np.asarray(st.w), w, rtol=1e-4, atol=1e-5)
            np.testing.assert_allclose(np.asarray(st.u), u, rtol=1e-4, atol=1e-5)
            assert int(st.count) == arrivals


def test_vanilla_parameter_step_breaks_the_invariance():
    rng = np.random.default_rng(1)
    K, d = 4, 3
    update = _jit_update(ServerRule(method="ormo", param_step="vanilla"), K)
    st, log = _random_schedule(rng, K, 30, update, d, 0.1, 0.9)
    w, u = _replay_in_order(log, int(st.t), lambda *a: 0.1, 0.9, d)
    np.testing.assert_allclose(np.asarray(st.u), u, rtol=1e-4, atol=1e-5)  # momentum unchanged
    assert not np.allclose(np.asarray(st.w), w, rtol=1e-3)


def test_baseline_rules_against_numpy():
    rng = np.random.default_rng(2)
    K, d, lr, beta, n = 3, 4, 0.05, 0.8, 11
    gs = rng.normal(size=(n, d)).astype(np.float32)
    outs = {}
    for method in ("asgd", "asgdm", "ssgdm", "smega2"):
        for est in ("advanced", "naive"):
            update = _jit_update(ServerRule(method=method, smega2_estimate=est), K)
            st = server_init(np.zeros(d, np.float32))
            sent = []
            for g in gs:
                st, w_send, _, _ = update(st, g, 0, 0, lr, beta)
                sent.append(np.asarray(w_send))
            outs[method, est] = (np.asarray(st.w), np.asarray(sent))
    # ASGD
    np.testing.assert_allclose(outs["asgd", "advanced"][0], -lr * gs.sum(0), rtol=1e-5)
    # naive ASGDm
    w, u = np.zeros(d), np.zeros(d)
    for g in gs:
        u = beta * u + lr * g
        w = w - u
    np.testing.assert_allclose(outs["asgdm", "advanced"][0], w, rtol=1e-5)
    # SSGDm: groups of K consecutive gradients, the open group not yet applied
    w, u = np.zeros(d), np.zeros(d)
    for i in range(n // K):
        u = beta * u + lr * gs[i * K:(i + 1) * K].sum(0)
        w = w - u
    np.testing.assert_allclose(outs["ssgdm", "advanced"][0], w, rtol=1e-5, atol=1e-7)
    # SMEGA2 (from its code, Cohen et al. 2022)
    for est in ("advanced", "naive"):
        w, m, b, c = np.zeros(d), np.zeros(d), np.zeros(d), 0
        sent = []
        for g in gs:
            c = (c + 1) % K
            b = b + g
            step = g + beta * m
            if c == 0:
                m = beta * m + b / K
                b = np.zeros(d)
            w = w - lr * step
            if est == "advanced":
                sent.append(w - lr * beta * ((K + c * (beta - 1)) * m + (c / K) * b))
            else:
                sent.append(w - lr * beta * K * m)
        np.testing.assert_allclose(outs["smega2", est][0], w, rtol=1e-5)
        np.testing.assert_allclose(outs["smega2", est][1], np.array(sent), rtol=1e-5, atol=1e-6)


# --------------------------------------------------------------------------------------------
# Full simulator: zero delays reproduce SSGDm, against an independent loop


def _cfg(**kw):
    base = dict(dataset="synthetic_classification", model="logreg", batch_size=8,
                lr=0.05, momentum=0.9, latency="constant", eval_every=12, arrivals=24)
    base.update(kw)
    return AsyncConfig(**base)


def _reference_ssgdm(sim: AsyncSimulation, K, iterations, lr, beta, seed=0):
    """SSGDm, u = βu + η Σ_k g_k(w_t), w = w - u; batch of arrival c drawn as the simulator
    documents: randint(fold_in(fold_in(key(seed), c), 0), B, 0, N)."""
    model, unravel = sim.model, sim.unravel
    x, y = np.asarray(DS.x_train), np.asarray(DS.y_train)
    B = sim.cfg.batch_size

    def loss(flat, xb, yb):
        out, _ = model.apply(unravel(flat), model.state, xb, train=True)
        return optax.softmax_cross_entropy_with_integer_labels(out, yb).mean()

    grad = jax.jit(jax.grad(loss))
    run_key = jax.random.key(seed)
    w = np.asarray(sim.flat0, np.float64)
    u = np.zeros_like(w)
    c = 0
    for _ in range(iterations):
        s = np.zeros_like(w)
        for _ in range(K):
            idx = np.asarray(jax.random.randint(
                jax.random.fold_in(jax.random.fold_in(run_key, c), 0), (B,), 0, len(y)))
            s += np.asarray(grad(jnp.asarray(w, jnp.float32), x[idx], y[idx]), np.float64)
            c += 1
        u = beta * u + lr * s
        w = w - u
    return w, u


def test_zero_delay_ormo_reproduces_ssgdm():
    lr, beta = 0.05, 0.9
    # K = 1: no other worker, so no delay at all (asynchronous dispatch).
    sim1 = AsyncSimulation(_cfg(method="ormo", n_workers=1), DS)
    ref1, u1 = _reference_ssgdm(sim1, 1, 24, lr, beta)
    # OrMo's server has already applied the next iteration's -βu step after its last close.
    r = AsyncSimulation(_cfg(method="ormo", n_workers=1), DS).run()[0]
    np.testing.assert_allclose(r.params, ref1 - beta * u1, rtol=2e-4, atol=2e-5)
    # K = 4 with a barrier: every gradient of iteration t is computed at w_t (zero group delay).
    K = 4
    ref, u = _reference_ssgdm(sim1, K, 6, lr, beta)
    r_ormo = AsyncSimulation(_cfg(method="ormo", n_workers=K, dispatch="barrier",
                                  advance_rule="every_K"), DS).run()[0]
    np.testing.assert_allclose(r_ormo.params, ref - beta * u, rtol=2e-4, atol=2e-5)
    assert r_ormo.history[-1]["iteration"] == 6


@pytest.mark.slow
def test_ssgdm_simulation_against_independent_loop():
    K, lr, beta = 4, 0.05, 0.9
    sim = AsyncSimulation(_cfg(method="ssgdm", n_workers=K, latency="gamma"), DS)
    ref, _ = _reference_ssgdm(sim, K, 6, lr, beta)
    r = sim.run()[0]
    np.testing.assert_allclose(r.params, ref, rtol=2e-4, atol=2e-5)
    assert r.history[-1]["iteration"] == 6


# --------------------------------------------------------------------------------------------
# Event order against a heapq simulation of the same latency table


def _heapq_events(table, K, arrivals, barrier=False):
    """Plain priority-queue simulation; times in float32 like the simulator's clock."""
    heap = [(np.float32(table[0, i]), i) for i in range(K)]
    heapq.heapify(heap)
    jobs = [0] * K
    out = []
    wave = 0
    while len(out) < arrivals:
        t, i = heapq.heappop(heap)
        out.append((i, t))
        if not barrier:
            jobs[i] += 1
            heapq.heappush(heap, (np.float32(t + np.float32(table[jobs[i], i])), i))
        else:
            wave += 1
            if wave == K:
                wave = 0
                for k in range(K):
                    jobs[k] += 1
                    heapq.heappush(heap, (np.float32(t + np.float32(table[jobs[k], k])), k))
    return out


@pytest.mark.parametrize(
    "latency,kwargs,dispatch",
    [("heterogeneous", {"base": "shifted_exponential"}, "async"),
     ("slow_subset", {"base": "constant", "slow_fraction": 0.4}, "async"),  # many ties
     pytest.param("shifted_exponential", {}, "barrier", marks=pytest.mark.slow)],
)
def test_event_order_matches_priority_queue(latency, kwargs, dispatch):
    K, arrivals, seed = 5, 48, 3
    cfg = _cfg(method="asgd", n_workers=K, latency=latency, latency_kwargs=kwargs,
               dispatch=dispatch, arrivals=arrivals, eval_every=arrivals, record_events=True,
               seed=seed)
    sim = AsyncSimulation(cfg, DS)
    res = sim.run()[0]
    lat = LATENCIES.build(latency, **kwargs)
    lat_key = sim._latency_key(jax.random.key(seed))
    state = sim.init(seed).latency_state
    table = np.asarray(latency_table(lat, lat_key, state, K, arrivals + 2))
    ref = _heapq_events(table, K, arrivals, barrier=dispatch == "barrier")
    np.testing.assert_array_equal(res.events["worker"], [i for i, _ in ref])
    # Times agree to float32 rounding (XLA may fuse factor * base + clock into one FMA).
    np.testing.assert_allclose(res.events["time"], np.array([t for _, t in ref]), rtol=1e-6)
    assert res.history[-1]["wall_clock"] == pytest.approx(float(ref[-1][1]))


# --------------------------------------------------------------------------------------------
# Grids and configuration


@pytest.mark.slow
def test_vmapped_points_equal_single_runs():
    cfg = _cfg(method="ormo", n_workers=3, latency="gamma")
    sim = AsyncSimulation(cfg, DS)
    pts = [{"seed": 0, "lr": 0.05}, {"seed": 1, "lr": 0.1, "momentum": 0.5}]
    together = sim.run(pts)
    for p, r in zip(pts, together):
        alone = sim.run([p], vmap=False)[0]
        np.testing.assert_allclose(r.params, alone.params, rtol=1e-4, atol=1e-6)
        assert r.history[-1]["wall_clock"] == pytest.approx(alone.history[-1]["wall_clock"])


def test_config_errors():
    with pytest.raises(ConfigError, match="method"):
        AsyncSimulation(_cfg(method="ormo2"), DS)
    with pytest.raises(ConfigError, match="advance_rule"):
        AsyncSimulation(_cfg(advance_rule="sometimes"), DS)
    with pytest.raises(ConfigError, match="latency"):
        AsyncSimulation(_cfg(latency="gama"), DS)


def test_async_runs_shard_over_eight_devices_like_one():
    """The vmapped runs axis sharded over 8 (fake CPU) devices gives the single-device results."""
    import os
    import subprocess
    import sys

    script = (
        "import json, jax\n"
        "from jbyz.algorithms.async_sgd import AsyncConfig, AsyncSimulation\n"
        "cfg = AsyncConfig(method='ormo', n_workers=4, dataset='digits', model='mlp', batch_size=16,"
        " epochs=0.2, eval_every=20, lr=0.02)\n"
        "res = AsyncSimulation(cfg).run([{'seed': s} for s in range(3)], devices=DEV)\n"
        "print(json.dumps([[h['test_accuracy'], h['train_loss']] for r in res for h in r.history[1:]]))\n"
    )
    outs = []
    for dev, env in ((1, {}), (8, {"JAX_NUM_CPU_DEVICES": "8"})):
        p = subprocess.run([sys.executable, "-c", script.replace("DEV", str(dev))], capture_output=True,
                           text=True, env={**os.environ, **env}, timeout=300)
        assert p.returncode == 0, p.stderr[-2000:]
        outs.append(np.array(__import__("json").loads(p.stdout.strip().splitlines()[-1])))
    np.testing.assert_allclose(outs[0], outs[1], rtol=1e-5, atol=1e-6)
