"""Projects the wall time of the CIFAR half of ``grid.toml`` from a short run of the same program.

    python experiments/distributed_momentum/project_cifar.py [--steps 10]

Builds the first CIFAR-10 block of ``grid.toml`` exactly (the paper's CNN at n = 25, f = 11,
batch 50, in the authors' setting). It runs on synthetic data of CIFAR's shape: 50,000 training
and 10,000 test images, 32 x 32 x 3. The cost of a step does not depend on the pixel values.
The script measures, on this machine:

* one chunk of ``--steps`` training steps, after compilation;
* one evaluation on 10,000 images;
* the floating-point operations of both, from XLA's cost analysis of the compiled programs
  (``jbyz.simulate.Program.flops``: the step compiled alone, since the cost analysis counts a
  loop body once whatever its trip count; until 2026-12-04 this script divided a 10-step chunk's
  count by 10, which under-counted a step 10x).

It prints the projected time of the CIFAR half: 1,840 runs x 3,000 steps plus 30 evaluations
each. It also prints the GPU-hours at a few sustained FLOP rates, which are stated as
assumptions: no GPU was measured here.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

import jax

from jbyz import data, simulate
from jbyz.config import load_experiment

HERE = Path(__file__).resolve().parent


def main(steps: int = 10) -> None:
    exp = load_experiment(HERE / "grid.toml")
    cfg = next(c for c in exp.runs() if c.dataset == "cifar10" and c.attack != "none"
               and c.f_real == 11 and c.momentum_at == "worker")
    runs = [c for c in exp.runs() if c.dataset.startswith("cifar")]
    ds = data.stand_in("cifar10")  # random values of CIFAR-10's shapes: the same cost
    cfg = cfg.replace(steps=steps, eval_every=steps)
    prog = simulate.Simulation(cfg, dataset=ds).program
    t = prog.timings(cfg, steps)  # one chunk of `steps` steps and one evaluation, after warming up
    step_s, eval_s, compile_s = t["step"], t["eval"], t["compile"]
    # XLA's cost analysis counts a loop body once (a chunk of `steps` steps reports about one
    # step), so the FLOPs come from the step compiled alone and one 1,000-image evaluation chunk
    cost = prog.flops(cfg)
    step_flop, eval_flop = cost["step"], cost["eval"]
    full = 3000 * step_s + 30 * eval_s
    total_flop = len(runs) * (3000 * step_flop + 30 * eval_flop)
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(f"machine: {jax.devices()[0].device_kind}, {os.cpu_count()} cores, load {load:.2f}")
    print(f"one step (n = 25, 14 honest gradients of batch 50): {step_s * 1e3:.0f} ms, "
          f"{step_flop / 1e9:.1f} GFLOP -> {step_flop / step_s / 1e9:.1f} GFLOP/s; compile {compile_s:.0f} s")
    print(f"one evaluation (10,000 images): {eval_s:.2f} s, {eval_flop / 1e9:.1f} GFLOP")
    print(f"one run (3,000 steps + 30 evaluations): {full / 3600:.2f} h here")
    print(f"the CIFAR half ({len(runs)} runs): {len(runs) * full / 3600 / 24:.0f} days on this CPU; "
          f"{total_flop / 1e15:.1f} PFLOP in all")
    for tflops in (5, 10, 20, 40):
        print(f"  at a sustained {tflops} TFLOP/s (an assumed GPU rate): "
              f"{total_flop / (tflops * 1e12) / 3600:.1f} GPU-hours")


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=10, help="training steps timed (default 10)")
    main(ap.parse_args().steps)
