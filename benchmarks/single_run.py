"""One run vs the bare-gradient floor, side by side in one process.

Workload (benchmarks/README.md): Fashion-MNIST, MLP 784-100-10, n = 10 workers of which f = 3 Byzantine,
batch 32 per worker, worker momentum 0.9, ALIE, 300 steps. The *floor* is a bare JAX scan of the
same per-step work without any robustness: sample the 7 honest workers' batches on device,
``vmap(value_and_grad)``, average, SGD step. jbyz runs the full pipeline (momentum, attack,
aggregation) for each aggregator; we report steps/s and the ratio to the floor, measured
interleaved (floor, rule, floor, rule ...) so machine noise hits both alike.

    python benchmarks/single_run.py                 # Fashion-MNIST MLP, all rules, n in {10, 51}
    python benchmarks/single_run.py --quick         # fewer rules, fewer repeats
    python benchmarks/single_run.py --model lenet   # the small CNN

Writes benchmarks/results/single_run.json (``--quick``: single_run_quick.json).
Uses the simulator's current API: ``get_program(cfg)`` -> ``Program.init`` / ``Program.chunk``.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from _bench import floor_chunk, load  # noqa: E402
from jbyz import data  # noqa: E402
from jbyz.config import RunConfig  # noqa: E402
from jbyz.validation import check, validate
from jbyz.simulate import get_program  # noqa: E402

RULES = ["mean", "median", "trimmed_mean", "krum", "multi_krum", "geometric_median",
         "centered_clip", "meamed", "phocas", "bulyan"]


def workload_f(n: int) -> int:
    """Byzantine workers at ``n`` workers: 3 of 10 (the reference workload); ``(n - 3) // 4``
    otherwise, so that every rule (Bulyan: ``n >= 4f + 3``) is valid (n = 51: f = 12)."""
    return 3 if n == 10 else (n - 3) // 4


def workload_cfg(n: int, rule: str, steps: int, dataset: str = "fashion_mnist",
                 model: str = "mlp") -> RunConfig:
    """The single-run workload: batch 32, ALIE, worker momentum 0.9 (EMA), lr 0.1, ``rule``."""
    return RunConfig(dataset=dataset, model=model, n_workers=n, f_real=workload_f(n), batch_size=32,
                     steps=steps, lr=0.1, momentum=0.9, momentum_form="ema", aggregator=rule,
                     attack="alie", eval_every=steps, diagnostics=False)


def floor_fn(prog, cfg: RunConfig, steps: int):
    """The bare cost: the honest workers' gradients + mean + SGD, as one scan.

    Same parameter representation (one flat vector), batch sampling keys and per-worker gradient
    formulation as the simulator (``_bench.floor_chunk``), so the ratio isolates the robust
    machinery.
    """
    inp = jax.device_put(prog.inputs(cfg))
    run = jax.jit(floor_chunk(prog, steps)).lower(inp.params0, inp, prog.train).compile()
    return lambda: jax.block_until_ready(run(inp.params0, inp, prog.train))


def jbyz_fn(prog, cfg: RunConfig, steps: int):
    """One run of the full pipeline: ``Program.init`` then one ``Program.chunk`` of ``steps``."""
    init, _, _ = prog.compiled_single()
    inp = jax.device_put(prog.inputs(cfg))
    chunk = jax.jit(prog.chunk, static_argnums=(2,), donate_argnums=(0,)).lower(
        init(inp), jnp.int32(0), steps, inp, prog.train).compile()

    def go():
        carry, _ = chunk(init(inp), jnp.int32(0), inp, prog.train)
        return jax.block_until_ready(carry.params)

    return go


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--dataset", default="fashion_mnist")
    ap.add_argument("--model", default="mlp")
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--n", type=int, nargs="*", default=[10, 51])
    ap.add_argument("--rules", nargs="*", default=None)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "single_run.json"))
    args = ap.parse_args(argv)
    rules = args.rules or (["mean", "median", "trimmed_mean", "krum"] if args.quick else RULES)
    repeats = 2 if args.quick else args.repeats
    if args.quick:
        args.steps = min(args.steps, 50)
        args.n = args.n if args.n != [10, 51] else [10]
    ds = data.load_dataset(args.dataset)
    rows = []
    for n in args.n:
        f = workload_f(n)
        print(f"\n== {args.dataset} {args.model}, n={n}, f={f}, batch 32, ALIE, worker momentum 0.9, {args.steps} steps")
        print(f"{'rule':<18}{'steps/s':>10}{'floor steps/s':>15}{'ratio':>8}{'compile s':>11}{'load':>6}")
        for rule in rules:
            cfg = workload_cfg(n, rule, args.steps, args.dataset, args.model)
            if validate(cfg):
                print(f"{rule:<18} skipped: {validate(cfg)[0]}")
                continue
            cfg = check(cfg)
            prog = get_program(cfg, dataset=ds)
            t = time.perf_counter()
            fl = floor_fn(prog, cfg, args.steps)
            t1 = time.perf_counter()
            jb = jbyz_fn(prog, cfg, args.steps)
            jb_c = time.perf_counter() - t1
            fl(), jb()  # warm (allocations)
            fl_t, jb_t, loads = [], [], []
            for _ in range(repeats):  # interleaved
                l0 = load()
                t = time.perf_counter(); fl(); fl_t.append(time.perf_counter() - t)
                t = time.perf_counter(); jb(); jb_t.append(time.perf_counter() - t)
                loads.append(max(l0, load()))
            fl_s, jb_s = float(np.median(fl_t)), float(np.median(jb_t))
            ratio = jb_s / fl_s
            print(f"{rule:<18}{args.steps / jb_s:>10.0f}{args.steps / fl_s:>15.0f}{ratio:>8.2f}{jb_c:>11.1f}"
                  f"{float(np.median(loads)):>6.1f}")
            rows.append(dict(n=n, f=f, rule=rule, jbyz_steps_per_s=args.steps / jb_s,
                             floor_steps_per_s=args.steps / fl_s, ratio_to_floor=ratio,
                             compile_s=jb_c, repeats=repeats, load=loads))
    out = Path(args.out if not args.quick else Path(args.out).with_name("single_run_quick.json"))
    out.parent.mkdir(parents=True, exist_ok=True)
    meta = dict(dataset=args.dataset, model=args.model, steps=args.steps, jax=jax.__version__,
                device=str(jax.devices()[0]), machine=platform.processor() or platform.machine())
    out.write_text(json.dumps(dict(meta=meta, rows=rows), indent=1))
    print(f"\nwrote {out}")


if __name__ == "__main__":
    main()
