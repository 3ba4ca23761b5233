"""How close to the bare-gradient floor can each rule get? An additive estimate, measured.

The target set for jbyz's speed is a single run within 1.5x of the bare-gradient floor
(``single_run.py``). This script asks whether that is reachable at all for a rule, on the machine
at hand, by timing the
pieces side by side in one process (interleaved, median of repeats):

* ``F``: one step of the floor (the honest workers' gradients, their mean, an SGD step);
* ``P``: one step of the full jbyz pipeline with the plain **mean** as the rule: gradients,
  worker momentum, ALIE (statistics and row replacement) and the cheapest possible aggregation.
  Every rule pays this; ``P / F`` is the pipeline's own ratio;
* ``K_rule``: the rule's kernel on a ``[n, d]`` matrix (``d`` = the model's parameter count),
  one jitted call per step, minus the same with the mean: the work the rule adds over the mean;
* ``gram``: the ``[n, d] x [d, n]`` Gram matrix alone (:func:`jbyz._sorting.gram`, by column
  tiles, the fastest formulation found; ``benchmarks/README.md``), timed the same way.

The estimate for a rule is ``(P + K_rule) / F``: what its run would cost if its kernel cost no
more inside the pipeline than alone and overlapped with nothing. Next to it, the measured ratio
of the real run (``R / F``). A rule whose *estimate* exceeds 1.5 cannot meet the target on this
machine without a faster kernel than XLA gives for its core operation.

    python benchmarks/ceiling.py                       # n = 10 and 51, the Gram and sorting rules
    python benchmarks/ceiling.py --n 10 --rules krum   # one
    python benchmarks/ceiling.py --quick               # smoke run

Writes ``benchmarks/results/ceiling.json`` (``--quick``: ``ceiling_quick.json``).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from _bench import interleaved, meta, write_json  # noqa: E402
from jbyz import _sorting, data  # noqa: E402
from jbyz.aggregators import AGGREGATORS  # noqa: E402
from jbyz.validation import check, validate  # noqa: E402
from jbyz.simulate import get_program  # noqa: E402
from single_run import floor_fn, jbyz_fn, workload_cfg, workload_f  # noqa: E402

RULES = ["median", "trimmed_mean", "meamed", "phocas", "centered_clip", "krum", "multi_krum",
         "geometric_median", "bulyan"]
RESULTS = Path(__file__).parent / "results"


def kernel_fn(rule: str | None, n: int, d: int, f: int, length: int):
    """``length`` calls of the jitted rule (``None``: the Gram matrix) on one ``[n, d]`` matrix.

    The calls are dispatched asynchronously and waited for once, so the dispatch overlaps with
    the previous call's work; what is left of it is the same for every rule and cancels in
    ``kernel_rule - kernel_mean``. (A ``lax.scan`` whose carry is the matrix itself was tried
    first and rejected: the carry's in-place update made even the mean cost 7x its standalone
    time.)
    """
    x = jax.random.normal(jax.random.key(0), (n, d), jnp.float32)
    valid = jnp.ones((n,), bool)
    key = jax.random.key(1)
    if rule is None:
        call = jax.jit(_sorting.gram).lower(x).compile()
        args = (x,)
    else:
        agg = AGGREGATORS.build(rule)
        state = agg.init(n, d)
        call = jax.jit(lambda x, st: agg.apply(x, valid, jnp.int32(f), key, st)).lower(
            x, state).compile()
        args = (x, state)

    def go():
        out = None
        for _ in range(length):
            out = call(*args)
        return jax.block_until_ready(out)

    return go


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, nargs="*", default=[10, 51])
    ap.add_argument("--rules", nargs="*", default=RULES)
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--out", default=None, help="default: results/ceiling.json")
    args = ap.parse_args(argv)
    if args.quick:
        args.n, args.rules, args.steps, args.repeats = [10], ["median", "krum"], 50, 2
    ds = data.load_dataset("fashion_mnist")
    rows = []
    for n in args.n:
        f = workload_f(n)
        base = check(workload_cfg(n, "mean", args.steps))
        prog = get_program(base, dataset=ds)
        d = int(prog.inputs(base).params0.shape[0])
        fns = {"floor": floor_fn(prog, base, args.steps), "pipeline_mean": jbyz_fn(prog, base, args.steps),
               "kernel_mean": kernel_fn("mean", n, d, f, args.steps),
               "gram": kernel_fn(None, n, d, f, args.steps)}
        kept = []
        for rule in args.rules:
            cfg = workload_cfg(n, rule, args.steps)
            if validate(cfg):
                print(f"n={n}: {rule} skipped: {validate(cfg)[0]}")
                continue
            cfg = check(cfg)
            fns[f"run_{rule}"] = jbyz_fn(get_program(cfg, dataset=ds), cfg, args.steps)
            fns[f"kernel_{rule}"] = kernel_fn(rule, n, d, f, args.steps)
            kept.append(rule)
        print(f"\n== n={n}, f={f}, d={d}: {len(fns)} programs compiled; timing {args.repeats} rounds")
        res = interleaved(fns, args.repeats, log=print)
        per_step = {k: v["median_s"] / args.steps for k, v in res.items()}
        F, P = per_step["floor"], per_step["pipeline_mean"]
        gram = per_step["gram"]
        print(f"floor {F * 1e3:.3f} ms/step; pipeline with mean {P * 1e3:.3f} ms ({P / F:.2f}x); "
              f"Gram matrix {gram * 1e3:.3f} ms, {gram / F:.2f}x the floor; "
              f"mean kernel {per_step['kernel_mean'] * 1e3:.3f} ms")
        print(f"{'rule':<18}{'kernel - mean ms':>17}{'estimate':>10}{'measured':>10}{'target':>8}")
        for rule in kept:
            extra = max(per_step[f"kernel_{rule}"] - per_step["kernel_mean"], 0.0)
            est, meas = (P + extra) / F, per_step[f"run_{rule}"] / F
            print(f"{rule:<18}{extra * 1e3:>17.3f}{est:>10.2f}{meas:>10.2f}{1.5:>8.1f}")
            rows.append(dict(n=n, f=f, d=d, rule=rule, kernel_extra_ms=extra * 1e3,
                             estimate=est, measured=meas, floor_ms=F * 1e3,
                             pipeline_mean_ratio=P / F, gram_ratio=gram / F))
        rows.append(dict(n=n, f=f, d=d, rule="mean", kernel_extra_ms=0.0, estimate=P / F,
                         measured=P / F, floor_ms=F * 1e3, pipeline_mean_ratio=P / F,
                         gram_ratio=gram / F))
        rows[-1]["timings"] = {k: {kk: v[kk] for kk in ("times_s", "cpu_s", "load")}
                               for k, v in res.items()}
    out = write_json(args.out or RESULTS / ("ceiling_quick.json" if args.quick else "ceiling.json"),
                     dict(meta=meta(), steps=args.steps, repeats=args.repeats, rows=rows))
    print(f"\nwrote {out}")


if __name__ == "__main__":
    main()
