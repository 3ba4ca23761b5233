"""Attack hyper-parameters passed as traced arguments give what compiling them in gives.

``jbyz.chain.traced_attack_kwargs`` makes a grid's runs that differ only in an attack's float
hyper-parameters (ALIE's z, FoE's eps, ...) share one compiled program. That is only sound when
every such hyper-parameter of every attack computes the same vector traced as compiled in; this
file checks each of them on a small stack, through the same optax stage the simulator uses.
"""

from __future__ import annotations

import inspect

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jbyz import attacks, chain, transforms
from jbyz.config import RunConfig
from jbyz.simulate import Program, static_key

N, F, D = 9, 3, 12


def _float_params():
    reg = attacks.ATTACKS
    reg._load(list(reg._lazy))
    out = []
    for name in reg.names():
        params = inspect.signature(reg.entry(name).factory).parameters
        for k in sorted(chain.traceable_attack_params(name)):
            default = params[k].default if isinstance(params[k].default, float) else 1.0
            out.append((name, k, default))
    return out


FLOAT_PARAMS = _float_params()


def test_every_attack_float_is_covered():
    names = {(a, k) for a, k, _ in FLOAT_PARAMS}
    # the ones a researcher sweeps most; the list comes from the factories' signatures
    assert {("alie", "z"), ("foe", "eps"), ("gaussian", "std"), ("sign_flip", "scale"),
            ("optimal_alie", "ratio")} <= names


def _update(attack, x, key):
    rule = {}
    if attack.uses_rule:
        rule = dict(aggregator="median", f=F)
    tx = transforms.byzantine(attack, F, N, labels_flipped=attack.flips_labels, **rule)
    params = jnp.zeros(D)
    state = tx.init(params)
    out, _ = tx.update(x, state, params, valid=jnp.ones(N, bool), key=key)
    return out


@pytest.mark.parametrize("name,kw,default", FLOAT_PARAMS, ids=[f"{a}.{k}" for a, k, _ in FLOAT_PARAMS])
def test_traced_equals_compiled_in(name, kw, default):
    value = 0.7 * default if default else 0.3
    x = jax.random.normal(jax.random.key(3), (N, D)) + 0.5
    key = jax.random.key(11)
    static = attacks.ATTACKS.build(name, **{kw: value})
    want = jax.jit(lambda x: _update(static, x, key))(x)
    got = jax.jit(lambda x, v: _update(attacks.ATTACKS.build(name, **{kw: v}), x, key))(
        x, jnp.float32(value))
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=2e-5, atol=2e-6)
    assert not np.allclose(np.asarray(want)[:F], np.asarray(x)[:F]) or name in {"bit_flip"}


def _cfg(**kw):
    base = dict(dataset="synthetic_classification", model="logreg", n_workers=N, f_real=F,
                dataset_kwargs={"n_samples": 360, "n_test": 60, "dim": 6, "classes": 3},
                steps=6, batch_size=4, aggregator="median", attack="alie", eval_every=3, lr=0.3)
    base.update(kw)
    return RunConfig(**base)


def test_runs_differing_in_z_share_a_program_and_keep_their_z():
    a, b = _cfg(attack_kwargs={"z": 0.5}), _cfg(attack_kwargs={"z": 2})
    assert chain.traced_attack_kwargs(a) == {"z": 0.5}
    assert chain.traced_attack_kwargs(b) == {"z": 2.0}  # an integer for a float is a float
    assert static_key(a) == static_key(b)
    # a string value ('auto': Baruch's formula) and the static options stay in the key
    assert static_key(_cfg(attack_kwargs={"z": "auto"})) != static_key(a)
    assert static_key(_cfg(attack_kwargs={"z": 0.5, "sign": "plus"})) != static_key(a)
    # integer hyper-parameters (iteration counts) stay static
    assert chain.traced_attack_kwargs(_cfg(attack="min_max", attack_kwargs={"iters": 5})) == {}
    prog = Program(a)
    ia, ib = prog.inputs(a), prog.inputs(b)
    assert float(ia.dyn.attack_kwargs["z"]) == 0.5 and float(ib.dyn.attack_kwargs["z"]) == 2.0


def test_a_grid_over_z_compiles_once_and_each_run_gets_its_z(tmp_path):
    from jbyz.grid import plan, run_grid
    from jbyz.simulate import Simulation

    cfgs = [_cfg(attack_kwargs={"z": z}) for z in (0.0, 1.0, 3.0)]
    assert len(plan(cfgs).groups) == 1
    df = run_grid(cfgs, tmp_path, progress=False, log=lambda *a: None)
    last = df[df.step == df.step.max()].set_index("run_id").train_loss
    for c in cfgs:
        alone = Simulation(c).run(progress=False)
        assert last[c.config_hash()] == pytest.approx(alone.history[-1]["train_loss"], rel=1e-5)
    assert last.nunique() == 3  # a different z gave a different run
