"""The optax drop-in through the public API: what the runner rejects is rejected here too (same
text), any optax transform runs per worker, and optax's habits (inject_hyperparams, keys,
MultiSteps, components by name) carry over. ALIE's default and its run ids."""

import hashlib
import json
import warnings

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import jbyz
from jbyz import aggregators, attacks, preaggregators
from jbyz.config import RunConfig
from jbyz.validation import validate

N = 10
PARAMS = {"w": jnp.zeros((3, 2)), "b": jnp.zeros(4)}


def grads(seed, n=N, params=PARAMS):
    """Per-worker gradients ``[n, ...]`` (distinct rows)."""
    keys = jax.random.split(jax.random.key(seed), len(jax.tree.leaves(params)))
    leaves, tdef = jax.tree.flatten(params)
    return jax.tree.unflatten(
        tdef, [jax.random.normal(k, (n,) + p.shape) for k, p in zip(keys, leaves)])


# ----------------------------------------------------------------------- requirement checks


@pytest.mark.parametrize("name,n,f,pre,text", [
    ("trimmed_mean", 8, 5, (), "trimmed_mean needs n >= 2f + 1 valid inputs; got n=8, f=5"),
    ("krum", 8, 3, (), "krum needs n >= 2f + 3 valid inputs; got n=8, f=3"),
    ("bulyan", 10, 2, (), "bulyan needs n >= 4f + 3 valid inputs; got n=10, f=2"),
    # after bucketing (s = 2) only 5 rows reach the rule: 5 < 2 * 3 + 1
    ("trimmed_mean", 10, 3, ({"name": "bucketing", "s": 2},),
     "trimmed_mean needs n >= 2f + 1 valid inputs; got n=5, f=3"),
])
def test_build_time_requirement_is_the_runners(name, n, f, pre, text):
    with pytest.raises(jbyz.ConfigError) as e:
        jbyz.robust_aggregate(name, f=f, num_workers=n, preaggregators=pre)
    assert text in str(e.value)
    # the same text `jbyz run` reports for the same setting
    runner = validate(RunConfig(n_workers=n, f_real=f, aggregator=name, preaggregators=pre))
    assert any(text in r for r in runner), runner
    assert [line for line in str(e.value).splitlines()[1:]] == [f"  - {r}" for r in runner]
    # a valid f builds
    jbyz.robust_aggregate(name, f=0, num_workers=n, preaggregators=pre)


def test_declared_f_must_leave_an_honest_worker():
    with pytest.raises(jbyz.ConfigError, match="declared f=10 must be < n_workers=10"):
        jbyz.robust_aggregate("median", f=10, num_workers=10)
    with pytest.raises(jbyz.ConfigError, match="f_real=10 Byzantine workers leaves no honest"):
        jbyz.byzantine("sign_flip", f_real=10, num_workers=10)


def test_worker_stage_arguments_checked_like_the_runner():
    for bad, field, stage in [(1.0, "momentum", lambda v: jbyz.worker_momentum(v, N)),
                              (-0.1, "momentum", lambda v: jbyz.worker_momentum(v, N)),
                              (0.0, "clip_per_worker", lambda v: jbyz.clip_per_worker(v, N))]:
        with pytest.raises(jbyz.ConfigError) as e:
            stage(bad)
        runner = validate(RunConfig(**{field: bad}))
        assert str(e.value) in runner, (str(e.value), runner)


def test_traced_f_is_nan_when_the_rule_cannot_take_it():
    """f arriving traced (extra-arg under jit, inject_hyperparams) cannot be checked on the host:
    the update is NaN for an f the rule rejects at num_workers rows, exact otherwise."""
    tx = jbyz.robust_aggregate(aggregators.trimmed_mean(), f=1, num_workers=8)
    g = grads(1, n=8)
    st = tx.init(PARAMS)
    step = jax.jit(lambda g, st, f: tx.update(g, st, PARAMS, f=f))
    bad, _ = step(g, st, 5)  # 8 < 2 * 5 + 1
    assert all(bool(jnp.all(jnp.isnan(v))) for v in jax.tree.leaves(bad))
    good, _ = step(g, st, 3)
    want, _ = jbyz.robust_aggregate(aggregators.trimmed_mean(), f=3, num_workers=8).update(
        g, st, PARAMS)
    chex.assert_trees_all_close(good, want, rtol=1e-6)
    # through optax.inject_hyperparams, f in the state, under jit
    inj = optax.inject_hyperparams(jbyz.robust_aggregate)(aggregators.trimmed_mean(), f=1,
                                                          num_workers=8)
    ist = inj.init(PARAMS)
    ist.hyperparams["f"] = jnp.asarray(5)
    out, _ = jax.jit(inj.update)(g, ist, PARAMS)
    assert bool(jnp.all(jnp.isnan(out["b"])))
    # and at init, where f is concrete, the runner's error
    with pytest.raises(jbyz.ConfigError, match="trimmed_mean needs n >= 2f \\+ 1"):
        optax.inject_hyperparams(jbyz.robust_aggregate)(
            aggregators.trimmed_mean(), f=5, num_workers=8).init(PARAMS)


# ----------------------------------------------------------------------- shapes and num_workers


def test_gradients_without_vmap_are_refused():
    tx = jbyz.robust_aggregate("median", f=3, num_workers=N)
    with pytest.raises(ValueError, match=r"shape of the parameter itself.*jax\.vmap\(jax\.grad"):
        tx.update(PARAMS, tx.init(PARAMS), PARAMS)
    # the silent case: a first dimension that happens to equal num_workers
    params = {"w": jnp.ones((N, 3))}
    tx = jbyz.robust_aggregate("median", f=3, num_workers=N)
    with pytest.raises(ValueError, match=r"Use jax\.vmap\(jax\.grad\(\.\.\.\)\), not jax\.grad"):
        tx.update(params, tx.init(params), params)
    for stage in (jbyz.worker_momentum(0.9, N), jbyz.clip_per_worker(1.0, N),
                  jbyz.byzantine("alie", 3, N), jbyz.per_worker(optax.trace(0.9), N)):
        with pytest.raises(ValueError, match=r"jax\.vmap\(jax\.grad"):
            stage.update(PARAMS, stage.init(PARAMS), PARAMS)


@pytest.mark.parametrize("stage", ["momentum", "clip", "attack", "aggregate"])
def test_one_num_workers_message(stage):
    """A stage whose num_workers differs from the gradients' worker axis: one check, one text."""
    m = {s: N for s in ("momentum", "clip", "attack", "aggregate")}
    m[stage] = 8
    tx = optax.chain(jbyz.clip_per_worker(1.0, m["clip"]),
                     jbyz.worker_momentum(0.9, m["momentum"]),
                     jbyz.byzantine("sign_flip", 2, m["attack"]),
                     jbyz.robust_aggregate("median", 2, m["aggregate"]))
    g = grads(2)
    with pytest.raises(ValueError) as e:
        tx.update(g, tx.init(PARAMS), PARAMS)
    msg = str(e.value)
    assert "has shape (10, 4); expected (8, 4) (num_workers=8 rows" in msg
    assert "Every stage before robust_aggregate must be given the same num_workers" in msg


def test_label_flip_is_refused_as_a_dropin_attack():
    with pytest.raises(jbyz.ConfigError) as e:
        jbyz.byzantine(attacks.label_flip(), f_real=3, num_workers=N)
    msg = str(e.value)
    assert "'label_flip' is a data-level attack" in msg
    assert "jbyz.data.flip_labels(ys, num_classes)" in msg and "before jax.vmap(jax.grad" in msg
    with pytest.raises(jbyz.ConfigError, match="data-level"):
        jbyz.byzantine("label_flip", f_real=3, num_workers=N)


# ----------------------------------------------------------------------- plots and the backend


def test_plots_leave_the_matplotlib_backend_alone():
    import importlib

    import matplotlib
    import pandas as pd

    before = matplotlib.get_backend()
    matplotlib.use("svg")  # a non-Agg backend, as a Jupyter session has its inline one
    try:
        import jbyz.plots as plots

        importlib.reload(plots)
        df = pd.DataFrame({"step": [0, 1, 0, 1], "test_accuracy": [0.1, 0.5, 0.1, 0.3],
                           "aggregator": ["mean"] * 4, "attack": ["alie"] * 2 + ["foe"] * 2,
                           "attack.z": [1.5, 1.5, None, None]})
        fig = plots.accuracy_curves(df)
        assert matplotlib.get_backend() == "svg"
        titles = [ax.get_title() for ax in fig.axes]
        assert titles == ["attack = alie (z = 1.5)", "attack = foe"]
        import matplotlib.pyplot as plt

        plt.close(fig)
    finally:
        matplotlib.use(before)


# ----------------------------------------------------------------------- inject_hyperparams


def test_inject_hyperparams_as_written_in_the_readme():
    g = grads(3)
    tx = optax.inject_hyperparams(jbyz.robust_aggregate)(jbyz.aggregators.median(), f=3,
                                                        num_workers=10)
    st = tx.init(PARAMS)
    out, st = jax.jit(tx.update)(g, st, PARAMS)
    np.testing.assert_allclose(out["b"], np.median(np.asarray(g["b"]), 0), rtol=1e-6)
    # f injectable: trimmed mean with f = 0 is the mean, with f = 2 it drops two per side
    tm = optax.inject_hyperparams(jbyz.robust_aggregate)(aggregators.trimmed_mean(), f=0,
                                                        num_workers=10)
    st = tm.init(PARAMS)
    out0, _ = jax.jit(tm.update)(g, st, PARAMS)
    st.hyperparams["f"] = jnp.asarray(2)
    out2, _ = jax.jit(tm.update)(g, st, PARAMS)
    np.testing.assert_allclose(out0["b"], np.asarray(g["b"]).mean(0), rtol=1e-5)
    np.testing.assert_allclose(out2["b"], np.sort(np.asarray(g["b"]), 0)[2:-2].mean(0), rtol=1e-5)
    # momentum injectable
    wm = optax.inject_hyperparams(jbyz.worker_momentum)(0.9, num_workers=10)
    st = wm.init(PARAMS)
    _, st = jax.jit(wm.update)(g, st, PARAMS)
    st.hyperparams["beta"] = jnp.asarray(0.5)
    got, _ = jax.jit(wm.update)(g, st, PARAMS)
    ref = jbyz.worker_momentum(0.5, 10)
    rst = ref.init(PARAMS)
    _, rst = ref.update(g, rst, PARAMS)
    want, _ = ref.update(g, rst, PARAMS)
    chex.assert_trees_all_close(got, want, rtol=1e-6)
    # byzantine with f_real injectable
    bz = optax.inject_hyperparams(jbyz.byzantine)(attacks.sign_flip(scale=-10.0), f_real=3,
                                                  num_workers=10)
    out, _ = jax.jit(bz.update)(g, bz.init(PARAMS), PARAMS)
    np.testing.assert_allclose(out["b"][:3], -10.0 * np.asarray(g["b"][:3]), rtol=1e-6)
    np.testing.assert_array_equal(out["b"][3:], g["b"][3:])


def test_inject_hyperparams_attack_strength_f_and_momentum_in_one_chain():
    """Attack strength lives in the attack: inject it through a factory of the chain."""
    def make_tx(z, f, momentum):
        return optax.chain(
            jbyz.worker_momentum(momentum, num_workers=N),
            jbyz.byzantine(jbyz.attacks.alie(z=z), f_real=3, num_workers=N),
            jbyz.robust_aggregate(jbyz.aggregators.trimmed_mean(), f=f, num_workers=N),
        )

    tx = optax.inject_hyperparams(make_tx)(z=1.5, f=3, momentum=0.9)
    g = grads(4)
    st = tx.init(PARAMS)
    st.hyperparams.update(z=jnp.asarray(4.0), f=jnp.asarray(2), momentum=jnp.asarray(0.5))
    got, _ = jax.jit(tx.update)(g, st, PARAMS)
    ref = make_tx(4.0, 2, 0.5)
    want, _ = ref.update(g, ref.init(PARAMS), PARAMS)
    chex.assert_trees_all_close(got, want, rtol=1e-5)
    other, _ = make_tx(1.5, 2, 0.5).update(g, ref.init(PARAMS), PARAMS)
    assert not np.allclose(got["b"], other["b"])


# ----------------------------------------------------------------------- per_worker


def _run(tx, steps, valid=None, params=PARAMS):
    st = tx.init(params)
    outs = []
    for t in range(steps):
        v = None if valid is None else valid[t]
        u, st = tx.update(grads(10 + t), st, params, **({} if v is None else {"valid": v}))
        outs.append(u)
    return outs, st


@pytest.mark.parametrize("ours,inner", [
    (lambda: jbyz.worker_momentum(0.9, N, first="zero"), lambda: optax.ema(0.9, debias=False)),
    (lambda: jbyz.worker_momentum(0.9, N, form="sum"), lambda: optax.trace(0.9)),
    (lambda: jbyz.worker_momentum(0.9, N, form="sum", nesterov=True),
     lambda: optax.trace(0.9, nesterov=True)),
    (lambda: jbyz.clip_per_worker(1.5, N), lambda: optax.clip_by_global_norm(1.5)),
])
def test_worker_stages_equal_their_per_worker_form(ours, inner):
    valid = [None, jnp.arange(N) % 3 != 0, None]  # a step where some workers sit out
    a, sa = _run(ours(), 3, valid)
    b, sb = _run(jbyz.per_worker(inner(), N), 3, valid)
    for t, (x, y) in enumerate(zip(a, b)):
        rows = np.ones(N, bool) if valid[t] is None else np.asarray(valid[t])
        chex.assert_trees_all_close(jax.tree.map(lambda v: v[rows], x),
                                    jax.tree.map(lambda v: v[rows], y), rtol=1e-5, atol=1e-6)
    if hasattr(sa, "momentum"):  # the workers that sat out kept their state in both
        inner_state = getattr(sb.inner, "trace", None) or getattr(sb.inner, "ema", None)
        chex.assert_trees_all_close(sa.momentum, inner_state, rtol=1e-5, atol=1e-6)


def test_per_worker_adam_is_one_adam_per_worker():
    tx = jbyz.per_worker(optax.adam(1e-2), N)
    outs, st = _run(tx, 3)
    for i in (0, 7):
        one = optax.adam(1e-2)
        s1 = one.init(PARAMS)
        for t in range(3):
            u, s1 = one.update(jax.tree.map(lambda v: v[i], grads(10 + t)), s1, PARAMS)
            chex.assert_trees_all_close(jax.tree.map(lambda v: v[i], outs[t]), u, rtol=1e-5)
    assert st.inner[0].mu["w"].shape == (N, 3, 2)
    # an optax transform *without* per_worker before the aggregator mixes the workers
    mixed, _ = optax.clip_by_global_norm(1.0).update(grads(10), optax.EmptyState())
    per, _ = _run(jbyz.per_worker(optax.clip_by_global_norm(1.0), N), 1)
    assert not np.allclose(mixed["b"], per[0]["b"])


# ----------------------------------------------------------------------- components, keys


def test_components_by_name_dict_or_object():
    g = grads(5)
    by_obj = jbyz.robust_aggregate(aggregators.trimmed_mean(b=2), f=3, num_workers=N,
                                   preaggregators=[preaggregators.nnm()])
    by_spec = jbyz.robust_aggregate({"name": "trimmed_mean", "b": 2}, f=3, num_workers=N,
                                    preaggregators=["nnm"])
    a, _ = by_obj.update(g, by_obj.init(PARAMS), PARAMS)
    b, _ = by_spec.update(g, by_spec.init(PARAMS), PARAMS)
    chex.assert_trees_all_close(a, b)
    m, _ = jbyz.robust_aggregate("median", f=3, num_workers=N).update(
        g, jbyz.robust_aggregate("median", 3, N).init(PARAMS), PARAMS)
    np.testing.assert_allclose(m["b"], np.median(np.asarray(g["b"]), 0), rtol=1e-6)
    x, _ = jbyz.byzantine({"name": "sign_flip", "scale": -2.0}, 2, N).update(
        g, jbyz.byzantine("sign_flip", 2, N).init(PARAMS), PARAMS)
    np.testing.assert_allclose(x["b"][:2], -2.0 * np.asarray(g["b"][:2]), rtol=1e-6)
    with pytest.raises(jbyz.ConfigError, match="unknown aggregator 'medain'. Did you mean 'median'"):
        jbyz.robust_aggregate("medain", f=3, num_workers=N)


def test_uncalled_factory_shows_the_right_call():
    with pytest.raises(TypeError) as e:
        jbyz.robust_aggregate(jbyz.aggregators.median, f=3, num_workers=10)
    msg = str(e.value)
    assert "got the aggregator factory jbyz.aggregators.median itself" in msg
    assert "jbyz.robust_aggregate(jbyz.aggregators.median(), f=3, num_workers=10)" in msg
    assert "jbyz.robust_aggregate('median', f=3, num_workers=10)" in msg
    with pytest.raises(TypeError, match=r"jbyz.byzantine\(jbyz.attacks.alie\(\), f_real=3"):
        jbyz.byzantine(jbyz.attacks.alie, f_real=3, num_workers=10)
    with pytest.raises(TypeError, match=r"preaggregators=\[jbyz.preaggregators.nnm\(\)\]"):
        jbyz.robust_aggregate("median", 3, 10, preaggregators=[jbyz.preaggregators.nnm])


def test_key_int_or_key_and_deprecated_seed():
    g = grads(6)
    agg = aggregators.centered_clip(tau=0.1)  # keyless; the key goes to bucketing's shuffle
    pre = [preaggregators.bucketing(s=2)]

    def out(**kw):
        tx = jbyz.robust_aggregate(agg, f=1, num_workers=N, preaggregators=pre, **kw)
        return tx.update(g, tx.init(PARAMS), PARAMS)[0]

    chex.assert_trees_all_close(out(key=3), out(key=jax.random.key(3)))
    chex.assert_trees_all_close(out(key=3), out(key=jax.random.PRNGKey(3)))
    assert not np.allclose(out(key=3)["b"], out(key=4)["b"])
    with pytest.warns(DeprecationWarning, match=r"seed=...\) is deprecated: pass key="):
        old = out(seed=3)
    chex.assert_trees_all_close(old, out(key=3))
    with pytest.raises(TypeError, match="not both key and seed"):
        out(key=1, seed=1)


def test_checkpoint_typed_keys_as_the_docs_say():
    tx = optax.chain(jbyz.byzantine("gaussian", 2, N, key=7),
                     jbyz.robust_aggregate("median", 2, N, key=8))
    st = tx.init(PARAMS)
    _, st = tx.update(grads(7), st, PARAMS)

    def is_key(a):
        return jnp.issubdtype(a.dtype, jax.dtypes.prng_key)

    saved = jax.tree.map(lambda a: np.asarray(jax.random.key_data(a) if is_key(a) else a), st)
    assert all(isinstance(leaf, np.ndarray) for leaf in jax.tree.leaves(saved))  # plain arrays
    template = tx.init(PARAMS)
    restored = jax.tree.map(lambda t, a: jax.random.wrap_key_data(a) if is_key(t) else
                            jnp.asarray(a), template, saved)
    a, _ = tx.update(grads(8), st, PARAMS)
    b, _ = tx.update(grads(8), restored, PARAMS)
    chex.assert_trees_all_close(a, b)


# ----------------------------------------------------------------------- the kernel type


def test_aggregation_rule_is_not_optax_aggregator_and_is_callable_on_a_matrix():
    from optax.experimental import aggregating

    rule = jbyz.aggregators.trimmed_mean()
    assert isinstance(rule, jbyz.AggregationRule)
    assert jbyz.AggregationRule is not aggregating.Aggregator
    assert isinstance(jbyz.robust_aggregate(rule, 3, N), aggregating.Aggregator)
    with pytest.warns(DeprecationWarning, match="now jbyz.types.AggregationRule"):
        from jbyz.types import Aggregator
    assert Aggregator is jbyz.AggregationRule
    x = np.asarray(jax.random.normal(jax.random.key(9), (N, 5)))
    out, _ = rule(x)  # valid: all, f: the largest minority the rule takes (4 at n = 10), key 0
    want, _ = rule(x, jnp.ones(N, bool), 4, jax.random.key(0))
    np.testing.assert_allclose(out, want)
    np.testing.assert_allclose(out, np.sort(x, 0)[4:-4].mean(0), rtol=1e-6)
    k, _ = jbyz.aggregators.krum()(x)  # Krum: n >= 2f + 3, so f = 3
    k3, _ = jbyz.aggregators.krum()(x, f=3)
    np.testing.assert_array_equal(k, k3)
    with pytest.raises(ValueError, match=r"x: \[n, d\]; got shape \(10,\)"):
        rule(x[:, 0])


# ----------------------------------------------------------------------- MultiSteps


def test_multisteps_accumulates_per_worker():
    def chain():
        return optax.chain(jbyz.worker_momentum(0.9, N),
                           jbyz.byzantine("alie", 3, N),
                           jbyz.robust_aggregate("trimmed_mean", 3, N), optax.sgd(0.1))

    ms = jbyz.MultiSteps(chain(), every_k_schedule=2, num_workers=N)
    st = ms.init(PARAMS)
    u1, st = jax.jit(ms.update)(grads(11), st, PARAMS)
    u2, st = jax.jit(ms.update)(grads(12), st, PARAMS)
    assert all(bool(jnp.all(v == 0)) for v in jax.tree.leaves(u1))
    ref = chain()
    mean = jax.tree.map(lambda a, b: (a + b) / 2, grads(11), grads(12))
    want, _ = ref.update(mean, ref.init(PARAMS), PARAMS)
    chex.assert_trees_all_close(u2, want, rtol=1e-5, atol=1e-7)
    with pytest.raises(ValueError, match="use jbyz.MultiSteps"):
        plain = optax.MultiSteps(chain(), every_k_schedule=2)
        plain.update(grads(11), plain.init(PARAMS), PARAMS)


# ----------------------------------------------------------------------- ALIE's default


def test_alie_default_is_an_attack_and_the_formula_warns():
    x = np.asarray(jax.random.normal(jax.random.key(10), (N, 4)))
    byz = jnp.arange(N) < 3
    out, _ = attacks.alie()(x, ~byz, byz)
    mu, sd = x[3:].mean(0), x[3:].std(0, ddof=1)
    np.testing.assert_allclose(out[0], mu - 1.5 * sd, rtol=1e-5)
    assert attacks.ALIE_DEFAULT_Z == 1.5 and attacks.alie().resolved(N, 3) == {"z": 1.5}
    with pytest.warns(UserWarning, match=r"z = 0.180 at n=10, f_real=3 \(\|z\| < 0.5\)"):
        jbyz.byzantine(attacks.alie(z="baruch"), f_real=3, num_workers=10)
    with pytest.warns(UserWarning, match=r"z = -0.000 at n=8, f_real=2|z = 0.000 at n=8"):
        assert attacks.alie(z="baruch").resolved(8, 2)["z"] <= 1e-9
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert attacks.alie(z="baruch").resolved(51, 24)["z"] == pytest.approx(1.4461, abs=1e-4)
    with pytest.warns(DeprecationWarning, match="z='baruch'"):
        attacks.alie(z=None)


def test_alie_run_ids_and_results_record_the_z_used():
    from jbyz import config as config_mod
    from jbyz.simulate import RunResult

    assert config_mod._ALIE_DEFAULT_Z == attacks.ALIE_DEFAULT_Z
    unset = RunConfig(attack="alie")
    explicit = RunConfig(attack="alie", attack_kwargs={"z": 1.5})
    formula = RunConfig(attack="alie", attack_kwargs={"z": "baruch"})

    def old_recipe(cfg):  # the id before the default changed: the dict as it is
        d = cfg.to_dict()
        for k, default in config_mod._HASH_OMIT_AT_DEFAULT.items():
            if d.get(k) == default:
                del d[k]
        return hashlib.sha256(json.dumps(d, sort_keys=True, default=str).encode()).hexdigest()[:16]

    assert unset.config_hash() == explicit.config_hash()  # same computation, same id
    assert unset.config_hash() != old_recipe(unset)  # never the former default's stored results
    assert explicit.config_hash() == old_recipe(explicit)  # explicit z: ids kept
    # asking for the formula finds the results computed when it was the default
    assert formula.config_hash() == old_recipe(unset)
    other = RunConfig(attack="foe")
    assert other.config_hash() == old_recipe(other)
    hist = [{"step": 0, "test_accuracy": 0.1}]
    df = RunResult(unset, hist, None, 0.0, 0.0).to_frame()
    assert df["attack.z"].tolist() == [1.5]
    with pytest.warns(UserWarning, match="z = 0.180"):
        df = RunResult(formula, hist, None, 0.0, 0.0).to_frame()
    assert df["attack.z"].iloc[0] == pytest.approx(0.18, abs=1e-3)
