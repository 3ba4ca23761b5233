"""Would rules under ``lax.switch`` (one program for several rules) be cheaper than one program each?

A stand-alone step shaped like the mlp workload (Fashion-MNIST-sized random data, MLP 784-100-10,
n = 10 workers of which f = 3 send ALIE, z = 1.5, a 20-step ``lax.scan``) with the rule applied
either alone (one program per rule) or as ``lax.switch(i, rules)`` on a traced index (one
program). Prints the compile time of each single-rule program and their sum against the switch
program's, and the run time of 20 steps in each program, per branch.

    python benchmarks/switch_sharing.py median,trimmed_mean,krum,geometric_median

Writes ``benchmarks/results/switch_sharing.json`` (merged by the rule list).
"""
import json, sys, time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.flatten_util import ravel_pytree
from jbyz.aggregators import AGGREGATORS
from jbyz.attacks import ATTACKS
rules = sys.argv[1].split(",")
n, f, B, d_in, h = 10, 3, 32, 784, 100
key = jax.random.key(0)
params = dict(w1=jax.random.normal(key, (d_in, h)) * 0.03, b1=jnp.zeros(h), w2=jax.random.normal(key, (h, 10)) * 0.1, b2=jnp.zeros(10))
flat0, unravel = ravel_pytree(params)
X = jax.random.normal(key, (n, B, d_in)); Y = jax.random.randint(key, (n, B), 0, 10)
valid = jnp.ones(n, bool); byz = jnp.arange(n) < f
alie = ATTACKS.build("alie", z=1.5)
aggs = [AGGREGATORS.build(r) for r in rules]
def loss(flat, x, y):
    p = unravel(flat); hdd = jax.nn.relu(x @ p["w1"] + p["b1"]); lo = hdd @ p["w2"] + p["b2"]
    return -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(lo), y[:, None], 1))
def make(branches):
    def chunk(flat, i):
        def body(flat, t):
            g = jax.vmap(jax.grad(loss), (None, 0, 0))(flat, X, Y)
            g, _ = alie.apply(g, ~byz, byz, key, (), {})
            agg = lax.switch(i, branches, g) if len(branches) > 1 else branches[0](g)
            return flat - 0.1 * agg, ()
        return lax.scan(body, flat, jnp.arange(20))[0]
    return jax.jit(chunk)
br = [lambda g, a=a: a.apply(g, valid, f, key, a.init(n, g.shape[1]) if hasattr(a, "init") else ())[0] for a in aggs]
def ctime(fn):
    t = time.perf_counter(); c = fn.lower(flat0, jnp.int32(0)).compile(); return time.perf_counter() - t, c
single = [ctime(make([b])) for b in br]
sw_t, sw_c = ctime(make(br))
def rtime(c, i, reps=5):
    jax.block_until_ready(c(flat0, jnp.int32(i))); ts = []
    for _ in range(reps):
        t = time.perf_counter(); jax.block_until_ready(c(flat0, jnp.int32(i))); ts.append(time.perf_counter() - t)
    return float(np.median(ts))
run_single = [rtime(c, 0) for _, c in single]
run_switch = [rtime(sw_c, i) for i in range(len(br))]
sys.path.insert(0, str(Path(__file__).resolve().parent))
from _bench import RESULTS, meta, write_json  # noqa: E402

out = RESULTS / "switch_sharing.json"
old = json.loads(out.read_text()) if out.exists() else {}
old[",".join(rules)] = dict(meta=meta(), compile_single_s=[t for t, _ in single], compile_switch_s=sw_t,
                            run_single_s_per_20_steps=run_single, run_switch_s_per_20_steps=run_switch)
write_json(out, old)
print("compile single:", [round(t, 2) for t, _ in single], "sum", round(sum(t for t, _ in single), 2), "| switch:", round(sw_t, 2))
print("run single ms/20 steps:", [round(1e3 * t, 1) for t in run_single], "| switch by branch:", [round(1e3 * t, 1) for t in run_switch])
