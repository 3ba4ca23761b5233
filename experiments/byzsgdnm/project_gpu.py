"""Projects the compute of ``paper.toml`` (ResNet-20, CIFAR-10, 2,304 runs) from its compiled steps.

    python experiments/byzsgdnm/project_gpu.py [--steps 2] [--only FIELD=V ...]

The paper's grid cannot run on a CPU. This script builds its programs exactly as ``jbyz run``
would, on synthetic data of CIFAR-10's shape (50,000 + 10,000 images, 32 x 32 x 3: a step's cost
does not depend on the pixel values), and reads the floating-point operations of a training step
and of an evaluation from XLA's cost analysis of the compiled programs:

* a step at B = 32 and at B = 64 (ALIE, delta = 3/8, median): their difference gives the FLOPs
  of one per-sample gradient, the rest is the part of a step that does not grow with the batch;
* one evaluation on the 10,000 test images.

(``jbyz.simulate.Program.flops``: XLA's cost analysis counts a loop body once, so a chunk of k
steps would report one step's FLOPs; the step is compiled alone.)

A training step computes ``grad_rows`` per-worker gradients of B samples each (the Byzantine
slots of ALIE / FoE skip theirs; bit-flip's attackers flip their own, so they compute it), so the
grid's total is sum over runs of ``steps x B x grad_rows x FLOP per sample`` plus its evaluations.
It also times ``--steps`` steps at B = 32 on this machine. GPU-hours are printed at a few sustained
FLOP rates, which are assumptions unless this script runs on the GPU itself (it then prints the
rate it measured there too).
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

import jax

from jbyz import data, simulate
from jbyz.cli import select
from jbyz.config import load_experiment

HERE = Path(__file__).resolve().parent


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=2, help="training steps timed at B = 32 (default 2)")
    ap.add_argument("--only", action="append", default=[], metavar="FIELD=V1,V2",
                    help="project only these grid points, as `jbyz run --only`")
    a = ap.parse_args(argv)
    exp = load_experiment(HERE / "paper.toml")
    runs = select(exp.runs(), a.only)  # the same filter as `jbyz run --only`
    ds = data.stand_in("cifar10")
    alie = next(c for c in runs if c.attack == "alie" and c.f_real == 3 and c.batch_size == 32
                and c.aggregator == "median") if any(c.attack == "alie" for c in runs) else None
    base = (alie or runs[0]).replace(compute_budget=None, steps=a.steps, eval_every=a.steps)
    prog32 = simulate.Program(base.replace(batch_size=32), dataset=ds)
    prog64 = simulate.Program(base.replace(batch_size=64), dataset=ds)
    tc = time.perf_counter()
    cost32, cost64 = prog32.flops(), prog64.flops()  # one step each, compiled outside the scan
    compile_s = time.perf_counter() - tc
    f32, f64, eval_flop = cost32["step"], cost64["step"], cost32["eval"]
    s32 = prog32.timings(base.replace(batch_size=32), a.steps)["step"]
    per_sample = (f64 - f32) / (32 * prog32.grad_rows)  # the batch-dependent part
    fixed = f32 - 32 * prog32.grad_rows * per_sample     # rule, attack, momentum, update
    train = evals = 0.0
    for c in runs:
        train += c.steps * (c.batch_size * simulate.gradient_rows(c) * per_sample + fixed)
        evals += -(-c.steps // c.eval_every) + 1
    total = train + evals * eval_flop
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    dev = jax.devices()[0]
    print(f"machine: {jax.default_backend()} {dev.device_kind}, {os.cpu_count()} cores, load {load:.2f}")
    print(f"one step at B = 32, {prog32.grad_rows} gradient rows ({base.attack}, f_real = {base.f_real}): "
          f"{f32 / 1e9:.1f} GFLOP, {s32:.2f} s here ({f32 / s32 / 1e9:.1f} GFLOP/s); "
          f"cost analysis of B = 32 and 64 compiled in {compile_s:.0f} s")
    print(f"one per-sample gradient: {per_sample / 1e6:.1f} MFLOP (from B = 64 minus B = 32); "
          f"the rest of a step (rule, attack, momentum, update): {fixed / 1e9:.3f} GFLOP")
    print(f"one evaluation (10,000 images): {eval_flop / 1e9:.1f} GFLOP")
    print(f"the grid: {len(runs)} runs, {sum(c.steps for c in runs):,} steps; "
          f"{total / 1e15:,.1f} PFLOP ({100 * train / total:.1f}% training)")
    print(f"  on this machine at {f32 / s32 / 1e9:.1f} GFLOP/s: {total / (f32 / s32) / 3600 / 24 / 365:,.1f} years")
    for tflops in (10, 20, 40, 80):
        print(f"  at a sustained {tflops} TFLOP/s (an assumed GPU rate): "
              f"{total / (tflops * 1e12) / 3600:,.0f} GPU-hours")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
