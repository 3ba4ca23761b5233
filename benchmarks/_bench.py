"""Shared helpers of the benchmark scripts (not part of jbyz): the workloads, timing, load, JSON.

Every script times its variants *interleaved* (A, B, C, A, B, C, ...) after one warm-up call each
and reports medians, together with ``os.getloadavg()`` sampled around every measurement, because
the 2-core machine they ran on also ran other jobs and absolute timings drift by 2-3x with load.
"""

from __future__ import annotations

import datetime
import gzip
import glob
import json
import os
import platform
import statistics
import time
from pathlib import Path
from typing import Callable

RESULTS = Path(__file__).resolve().parent / "results"

# Fashion-MNIST MLP 784-100-10: flops of one sample's forward + backward (no input gradient).
# forward 2*(784*100 + 100*10) = 158,800; backward dW2 2,000 + dh 2,000 + dW1 156,800 = 160,800.
MLP_FLOP_PER_SAMPLE = 2 * (784 * 100 + 100 * 10) + 2 * (100 * 10) * 2 + 2 * 784 * 100


def mlp_flop_per_step(n: int, f: int, batch: int) -> float:
    """Gradient flops of one step (honest workers only: the Byzantine rows compute nothing)."""
    return float((n - f) * batch * MLP_FLOP_PER_SAMPLE)


# The CNN workload (jbyz ``lenet``, VALID on 28x28x1): multiply-accumulates of one sample's forward:
# conv1 24*24*32*(5*5*1) = 460,800; conv2 8*8*64*(5*5*32) = 3,276,800; fc 1024*10 = 10,240;
# 3,747,840 MACs = 7.50 MFLOP forward. Forward + backward ~ 3x forward = 22.5 MFLOP a sample
# (counts conv1's input gradient, which is not computed: an over-count of ~2%).
CNN_MAC_PER_SAMPLE = 24 * 24 * 32 * 5 * 5 * 1 + 8 * 8 * 64 * 5 * 5 * 32 + 4 * 4 * 64 * 10
CNN_FLOP_PER_SAMPLE = 3 * 2 * CNN_MAC_PER_SAMPLE


def cnn_flop_per_step(n: int, f: int, batch: int) -> float:
    """Gradient flops of one CNN step (honest workers only), forward + backward ~ 3x forward."""
    return float((n - f) * batch * CNN_FLOP_PER_SAMPLE)


# The CIFAR CNN of the distributed-momentum grid (jbyz ``dm_cnn``, CIFAR-10 32x32x3, SAME 3x3
# convolutions 64-64-pool-128-128-pool, fc 8192-128-10): multiply-accumulates of one sample's
# forward: 32*32*64*27 + 32*32*64*576 + 16*16*128*576 + 16*16*128*1152 + 8192*128 + 128*10
# = 97.19 M; forward + backward ~ 3x forward = 583 MFLOP a sample (BatchNorm, ReLU, pooling and
# dropout not counted; conv0's input gradient, not computed, counted: ~1% over).
DM_CNN_MAC_PER_SAMPLE = (32 * 32 * 64 * 27 + 32 * 32 * 64 * 576 + 16 * 16 * 128 * 576
                         + 16 * 16 * 128 * 1152 + 8 * 8 * 128 * 128 + 128 * 10)
DM_CNN_FLOP_PER_SAMPLE = 3 * 2 * DM_CNN_MAC_PER_SAMPLE


def dm_cnn_flop_per_step(n: int, f: int, batch: int) -> float:
    """Gradient flops of one ``dm_cnn`` (CIFAR-10) step (honest workers only), fwd + bwd ~ 3x fwd."""
    return float((n - f) * batch * DM_CNN_FLOP_PER_SAMPLE)


def dataset_or_stand_in(name: str, *, stand_in: str = "auto", **kwargs):
    """``(jbyz Dataset, note)``: the real dataset, or (``stand_in="auto"`` when its files are
    missing, or ``"always"``) random data of its exact shapes and sizes, which costs the same
    to train on (speed and memory figures only; no accuracy means anything on it). ``note`` is
    ``""`` for the real data, else a sentence saying it is a stand-in."""
    from jbyz import data
    from jbyz.registry import ConfigError

    if stand_in != "always":
        try:
            return data.load_dataset(name, **kwargs), ""
        except ConfigError:
            if stand_in == "never":
                raise
    ds = data.stand_in(name)
    return ds, f" [{name} files not found: random stand-in of its shapes]"


def workload(name: str, *, seed: int = 0, steps: int = 300, aggregator: str = "median", **over):
    """The race workloads as jbyz :class:`RunConfig` (ByzFL's conventions where they matter).

    ``mlp``: Fashion-MNIST, MLP 784-100-10, n = 10, f = 3, batch 32, ALIE (ByzFL's sign and
    tau = 1.5: ``mean + 1.5 std``), worker momentum 0.9 (EMA), lr 0.1, iid shards.
    ``dm``: the distributed-momentum setting (El Mhamdi et al., ICLR 2021): the same model and
    data, n = 51, f = 24, batch 83, otherwise as ``mlp``.
    ``cnn``: as ``mlp`` (n = 10, f = 3, batch 32) with the small CNN ``lenet``: conv5x5-32 (VALID),
    ReLU, maxpool 2, conv5x5-64 (VALID), ReLU, maxpool 2, fc 1024-10 (default channels (32, 64),
    padding "auto" = VALID at 28x28).
    ``cifar_cnn``: the CIFAR-10 CNN of the distributed-momentum grid (``dm_cnn``, 583 MFLOP a
    sample) at that grid's n = 25, f = 11, batch 50, otherwise as ``mlp`` (median, ALIE, worker
    momentum 0.9, lr 0.1, iid).
    """
    from jbyz.config import RunConfig

    base = dict(dataset="fashion_mnist", model="mlp", batch_size=32, steps=steps, lr=0.1,
                momentum=0.9, momentum_at="worker", momentum_form="ema", aggregator=aggregator,
                attack="alie", attack_kwargs={"z": 1.5, "sign": "plus"}, split="iid",
                eval_every=steps, diagnostics=False, seed=seed)
    if name == "mlp":
        base.update(n_workers=10, f_real=3)
    elif name == "cnn":
        base.update(n_workers=10, f_real=3, model="lenet")
    elif name == "dm":
        base.update(n_workers=51, f_real=24, batch_size=83)
    elif name == "cifar_cnn":
        base.update(dataset="cifar10", model="dm_cnn", n_workers=25, f_real=11, batch_size=50)
    else:
        raise ValueError(name)
    base.update(over)
    return RunConfig(**base)


def load() -> float:
    return round(os.getloadavg()[0], 2)


def interleaved(fns: dict[str, Callable[[], object]], repeats: int, *, warm: bool = True,
                log=print) -> dict[str, dict]:
    """Times every function ``repeats`` times, interleaved; returns medians, all times and loads.

    Besides wall time it records the process's CPU time per call (all threads): on a machine
    that also runs other jobs wall time measures the share the scheduler gave us as much as the work, while CPU
    seconds per unit of work are far steadier (they over-count only spin-waiting threads).
    Note that short calls can look faster than long ones under a CPU quota: a process that was
    idle gets a burst. Compare variants whose calls last about as long.
    """
    out = {k: {"times_s": [], "cpu_s": [], "load": []} for k in fns}
    if warm:
        for k, f in fns.items():
            t = time.perf_counter()
            f()
            out[k]["first_call_s"] = time.perf_counter() - t
    for r in range(repeats):
        for k, f in fns.items():
            l0 = load()
            c = time.process_time()
            t = time.perf_counter()
            f()
            dt = time.perf_counter() - t
            out[k]["cpu_s"].append(time.process_time() - c)
            out[k]["times_s"].append(dt)
            out[k]["load"].append(max(l0, load()))
    for k, v in out.items():
        v["median_s"] = statistics.median(v["times_s"])
        v["median_cpu_s"] = statistics.median(v["cpu_s"])
        v["load_median"] = statistics.median(v["load"])
    return out


def meta() -> dict:
    import jax

    return dict(date=datetime.datetime.now().isoformat(timespec="seconds"), jax=jax.__version__,
                device=str(jax.devices()[0]), n_devices=jax.device_count(),
                machine=platform.processor() or platform.machine(), cpus=os.cpu_count(),
                xla_flags=os.environ.get("XLA_FLAGS", ""), load_at_write=load())


def write_json(path: Path | str, payload: dict) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(payload, indent=1, default=str))
    tmp.replace(path)
    return path


def op_profile(fn: Callable[[], object], calls_per_step: int = 1, steps: int = 1, top: int = 25,
               trace_dir: str = "/tmp/jbyz_bench_trace") -> list[dict]:
    """Per-HLO-op time of one call of ``fn`` from ``jax.profiler`` (XLA:CPU thunk events).

    Needs ``XLA_FLAGS=--xla_cpu_enable_xprof_traceme=true`` in the environment *before* jax is
    imported, else only the executable-level events are recorded. Returns the ``top`` ops by
    total time as ``{"op", "ms_per_step", "count"}`` (divided by ``steps``).
    """
    import collections
    import shutil

    import jax

    shutil.rmtree(trace_dir, ignore_errors=True)
    with jax.profiler.trace(trace_dir, create_perfetto_trace=True):
        fn()
    files = glob.glob(trace_dir + "/**/*.trace.json.gz", recursive=True)
    if not files:
        return []
    ev = json.load(gzip.open(files[0]))
    evs = ev["traceEvents"] if isinstance(ev, dict) else ev
    tot, cnt = collections.Counter(), collections.Counter()
    skip = ("ThunkExecutor", "$", "PjitFunction", "CommonPjRt", "PjRt", "end: ")
    for e in evs:
        if e.get("ph") == "X" and not e["name"].startswith(skip):
            tot[e["name"]] += e["dur"]
            cnt[e["name"]] += 1
    return [{"op": k, "ms_per_step": round(v / 1e3 / steps, 4), "count": cnt[k]}
            for k, v in tot.most_common(top)]


def floor_chunk(prog, length: int):
    """The bare-gradient floor of a jbyz :class:`~jbyz.simulate.Program`, as one run's function.

    ``chunk(params [d], inp: RunInputs, train) -> params``: ``length`` steps of only the
    gradient-computing workers' batch sampling (same keys as the simulator), per-worker
    ``value_and_grad`` (same flat parameter vector, same ``grad_method``), their mean and an SGD
    step: no worker momentum, attack, robust rule or model-state bookkeeping. Map it over runs
    exactly as the grid maps ``Program.chunk`` to get the grid's floor.
    """
    import functools

    import jax
    import jax.numpy as jnp

    from jbyz import data, models

    cfg, n, rows = prog.cfg, prog.n, prog.grad_rows
    first = n - rows
    mstate0 = prog.model.state

    def body(params, t, inp, train):
        x_all, y_all = train
        step_key = jax.random.fold_in(jax.random.key(inp.dyn.seed), t)
        wk = jax.vmap(lambda w: jax.random.fold_in(step_key, w))(jnp.arange(first, n))
        idx = jax.vmap(data.sample_indices, in_axes=(0, 0, 0, None))(
            wk, inp.indices[first:], inp.sizes[first:], cfg.batch_size)
        dk = jax.vmap(lambda k: jax.random.fold_in(k, 1))(wk)
        loss = functools.partial(prog._loss, wd=inp.dyn.weight_decay)
        grad_fn = models.map_workers(lambda *a: jax.value_and_grad(loss, has_aux=True)(*a),
                                     prog.grad_method)
        (ls, _), g = grad_fn(params, mstate0, x_all[idx], y_all[idx], dk)
        g = jnp.tensordot(jnp.full((rows,), 1.0 / rows, g.dtype), g, axes=1)
        return params - inp.dyn.lr * g, jnp.mean(ls)

    def chunk(params, inp, train):
        params, ls = jax.lax.scan(lambda p, t: body(p, t, inp, train), params, jnp.arange(length))
        return params, jnp.mean(ls)

    return chunk


def over_runs(fn, R: int, width: int):
    """``fn`` over a leading runs axis the way ``jbyz.grid.BatchRunner`` does it: ``vmap`` when
    ``width >= R``, else ``lax.map`` with ``batch_size=width``."""
    import jax

    def mapped(*xs):
        if width >= R:
            return jax.vmap(fn)(*xs)
        return jax.lax.map(lambda a: fn(*a), xs, batch_size=width)
    return mapped
