"""How many runs fit in one grid call: the compiled programs' memory, by width, and a linear fit.

Compilation only (no training step runs): for each workload, jbyz's real grid chunk
(``jbyz.grid.BatchRunner.chunk_fn``: ``Program.chunk`` over a runs axis, one ``eval_every``-long
``lax.scan``) is lowered with abstract arguments (``jax.ShapeDtypeStruct``: nothing of size R is
allocated on the host or the device) and compiled for a few batch sizes R, and XLA's buffer
assignment is read back (``compiled.memory_analysis()``):

* ``arguments``: the carry (parameters, worker momenta, rule / attack state) and the per-run
  inputs (index tables of the worker splits), stacked over R runs, plus the training and test
  sets (once, whatever R);
* ``outputs``: the new carry and the chunk's metrics; ``alias``: outputs written into donated
  arguments (the carry is donated, ``donate_argnums=(0,)``);
* ``temp``: XLA's temporaries (the scan body's working set).

The device needs about ``arguments + outputs - alias + temp`` at once (``total`` below); jbyz's
runner budgets only ``temp + outputs`` (``jbyz.grid._temp_bytes``). Each quantity is fitted as
``a + b R`` (least squares over the widths), and the largest R whose ``total`` stays under the
budget (24 GiB by default) is ``floor((budget - a) / b)``; it is then compiled at that R to check
the fit (the check compiles at once, whatever R: the arguments are abstract).

Two ways of laying out a batch of R runs (``GridOptions.vmap_width``):

* ``vmap``: all R runs vectorised together (``vmap_width = R``): what jbyz does by default on a
  GPU when it fits the budget; temporaries grow with R.
* ``map``: ``lax.map`` one run at a time (``vmap_width = 1``): jbyz's default on CPU; only the
  carry and the inputs grow with R.

Beside it, what the runner picks by itself, by calling its own functions: ``runs_per_call`` from
``jbyz.grid.plan`` (the group's size, capped at 64 per device) for the workload's real grid, and,
for a 24 GiB GPU, the ``vmap_width`` of ``BatchRunner.chunk_fn``'s loop (start at the whole batch,
halve until ``_temp_bytes(compiled) <= budget``, budget = ``0.6 x bytes_limit`` from
``jbyz.grid._memory_budget``; ``bytes_limit`` taken as XLA's default 75% of the card = 18 GiB, so
10.8 GiB). The loop is reproduced here with the runner's ``_temp_bytes`` because on this CPU
``chunk_fn`` takes its CPU branch (width 1) without looking at memory.

Caveat: the figures come from XLA:CPU's buffer assignment. XLA:GPU fuses differently (and keeps
cuDNN / cuBLAS workspaces outside of these numbers); treat them as an estimate for a GPU.

Workloads:

* ``mlp``: ``_bench.workload("mlp")`` (Fashion-MNIST, MLP 784-100-10, n = 10, f = 3, batch 32,
  median, ALIE, worker momentum), chunk of 50 steps.
* ``dm``: the Fashion-MNIST group of the distributed-momentum grid
  (``experiments/distributed_momentum/grid.toml``: MLP, n = 51, batch 83, ``split = "shared"``,
  epoch stream, flips, diagnostics on, ``eval_every = 5``), by default f = 12 (39 gradient rows),
  momentum at the workers, ALIE, Bulyan (the heaviest rule of that grid): ``--dm-aggregator``,
  ``--dm-f``, ``--dm-momentum-at`` pick another group.
* ``cifar``: (only when named) the CIFAR-10 group of the same grid (``dm_cnn``, n = 25, f = 5,
  batch 50, eval_every 100; a stand-in dataset of CIFAR-10's shapes when the files are absent).

    python benchmarks/memory.py --quick
    python benchmarks/memory.py                          # mlp and dm, widths 1 2 4 8 16
    python benchmarks/memory.py --workloads dm --widths 1 4 16 --modes vmap

Writes ``benchmarks/results/memory.json`` (``--quick``: ``memory_quick.json``).
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))

from _bench import RESULTS, dataset_or_stand_in, load, meta, workload, write_json  # noqa: E402

GiB = 2**30
DM_TOML = HERE.parent / "experiments" / "distributed_momentum" / "grid.toml"
FIELDS = ("argument", "output", "alias", "temp", "total", "runner_estimate")
SHORT = dict(argument="args", output="outputs", alias="alias", temp="temp", total="total",
             runner_estimate="runner est.")


def dm_configs(dataset: str, f: int, aggregator: str, momentum_at: str, attack: str = "alie"):
    """The grid.toml runs of one compiled group (every seed, lr and Nesterov of it)."""
    from jbyz import grid
    from jbyz.config import GridOptions, load_experiment

    exp = load_experiment(DM_TOML)
    runs = [c for c in exp.runs() if c.dataset == dataset and c.f_real == f
            and c.aggregator == aggregator and c.momentum_at == momentum_at and c.attack == attack]
    if not runs:
        sys.exit(f"no run of {DM_TOML} has dataset={dataset} f_real={f} aggregator={aggregator} "
                 f"momentum_at={momentum_at} attack={attack}")
    opts = GridOptions.from_dict(exp.execution)
    pl = grid.plan(runs, opts, n_devices=1)
    g = max(pl.groups, key=lambda g: len(g.configs))
    return g.configs, pl, opts


def workload_group(name: str, args):
    """``(configs of one compiled group, the runner's plan of the workload's grid, dataset, label)``."""
    from jbyz import grid
    from jbyz.config import GridOptions

    if name == "mlp":
        # The race's grid: 64 seeds or more of one configuration (plan caps a batch at 64).
        cfgs = [workload("mlp", seed=s, steps=300, eval_every=50) for s in range(128)]
        pl = grid.plan(cfgs, GridOptions(), n_devices=1)
        ds, note = dataset_or_stand_in("fashion_mnist")
        return cfgs, pl, ds, "mlp: Fashion-MNIST MLP, n=10 f=3 b=32, median/ALIE, worker momentum" + note
    if name == "dm":
        cfgs, pl, _ = dm_configs("fashion_mnist", args.dm_f, args.dm_aggregator, args.dm_momentum_at)
        ds, note = dataset_or_stand_in("fashion_mnist", normalize=False)
        c = cfgs[0]
        return cfgs, pl, ds, (f"dm: grid.toml Fashion-MNIST group, {c.model} n={c.n_workers} "
                              f"f={c.f_real} b={c.batch_size}, {c.aggregator}/{c.attack}, momentum at "
                              f"{c.momentum_at}, {len(cfgs)} runs in the group" + note)
    if name == "cifar":
        cfgs, pl, _ = dm_configs("cifar10", 5, args.dm_aggregator, args.dm_momentum_at)
        ds, note = dataset_or_stand_in("cifar10")
        c = cfgs[0]
        return cfgs, pl, ds, (f"cifar: grid.toml CIFAR-10 group, {c.model} n={c.n_workers} "
                              f"f={c.f_real} b={c.batch_size}, {c.aggregator}/{c.attack}, momentum "
                              f"at {c.momentum_at}" + note)
    raise ValueError(name)


class Compiler:
    """Compiles a workload's grid chunk for any number of runs, from abstract arguments."""

    def __init__(self, cfgs, pl, ds):
        import jax
        import jax.numpy as jnp

        from jbyz.simulate import get_program

        g = pl.groups[0]
        self.cfg = cfg = g.configs[0]
        self.prog = prog = get_program(cfg, g.n_max, g.grad_rows, dataset=ds)
        w = max(prog.split_width(c) for c in g.configs)
        one = prog.inputs(cfg, w)  # one run's inputs, numpy
        self._one = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), one)
        self.train = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), prog.train)
        self.length = min(cfg.eval_every, cfg.steps)
        self.t0 = jax.ShapeDtypeStruct((), jnp.int32)

    def args(self, R: int, runner):
        import jax

        inp = jax.tree.map(lambda s: jax.ShapeDtypeStruct((R, *s.shape), s.dtype), self._one)
        carry = jax.eval_shape(runner.init_fn(), inp)
        return (carry, self.t0, inp, self.train)

    def compile(self, R: int, width: int, budget_gb: float | None = None):
        """BatchRunner.chunk_fn for R runs at ``width``; returns (compiled, seconds)."""
        from jbyz.grid import BatchRunner, GridOptions

        runner = BatchRunner(self.prog, R, GridOptions(vmap_width=width, memory_budget_gb=budget_gb), 1)
        t = time.perf_counter()
        comp = runner.chunk_fn(self.length, self.args(R, runner))
        return comp, time.perf_counter() - t


def mem_row(comp) -> dict:
    from jbyz.grid import _temp_bytes

    m = comp.memory_analysis()
    r = dict(argument=m.argument_size_in_bytes, output=m.output_size_in_bytes,
             alias=m.alias_size_in_bytes, temp=m.temp_size_in_bytes)
    r["total"] = r["argument"] + r["output"] - r["alias"] + r["temp"]
    r["runner_estimate"] = _temp_bytes(comp)  # what jbyz's runner compares with its budget
    return r


def fit(rows, key):
    """Least-squares ``a + b R`` of ``key`` over rows; returns (a, b)."""
    xs = [r["R"] for r in rows]
    ys = [float(r[key]) for r in rows]
    if len(set(xs)) < 2:
        return ys[0], 0.0
    mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
    b = sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sum((x - mx) ** 2 for x in xs)
    return my - b * mx, b


def runner_vmap_width(compiler: Compiler, R: int, budget_bytes: float, cache: dict) -> dict:
    """``BatchRunner.chunk_fn``'s choice off CPU: the whole batch, halved until the runner's
    estimate (``_temp_bytes``: temp + outputs) fits ``budget_bytes`` (one device)."""
    from jbyz.grid import _temp_bytes

    width, tried = R, []
    while True:
        key = ("pick", R, width)
        if key not in cache:
            comp, _ = compiler.compile(R, width)
            cache[key] = _temp_bytes(comp)
        est = cache[key]
        tried.append(dict(width=width, runner_estimate=est))
        if width <= 1 or est is None or est <= budget_bytes:
            return dict(R=R, width=width, tried=tried)
        width = max(1, width // 2)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--workloads", nargs="*", default=["mlp", "dm"], choices=["mlp", "dm", "cifar"])
    ap.add_argument("--widths", type=int, nargs="*", default=[1, 2, 4, 8, 16],
                    help="batch sizes R compiled for the fit")
    ap.add_argument("--map-widths", type=int, nargs="*", default=[1, 4, 16],
                    help="batch sizes R compiled for the fit of the lax.map layout")
    ap.add_argument("--modes", nargs="*", default=["vmap", "map"], choices=["vmap", "map"])
    ap.add_argument("--refine", type=int, default=2,
                    help="secant steps after the check at the fitted maximum")
    ap.add_argument("--budget-gib", type=float, default=24.0, help="device memory to fit (GiB)")
    ap.add_argument("--gpu-limit-fraction", type=float, default=0.75,
                    help="bytes_limit of the emulated GPU as a fraction of --budget-gib (XLA's "
                         "default preallocation) for the runner's own pick")
    ap.add_argument("--no-check", action="store_true", help="skip compiling at the fitted maximum")
    ap.add_argument("--no-runner-pick", action="store_true")
    ap.add_argument("--dm-aggregator", default="bulyan")
    ap.add_argument("--dm-f", type=int, default=12)
    ap.add_argument("--dm-momentum-at", default="worker")
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    if args.quick:
        args.workloads, args.widths, args.modes = ["mlp"], [1, 2], ["vmap"]
        args.no_runner_pick = True
    out = Path(args.out or RESULTS / ("memory_quick.json" if args.quick else "memory.json"))

    from jbyz.grid import _memory_budget
    from jbyz.config import GridOptions

    budget = args.budget_gib * GiB
    # jbyz.grid._memory_budget on a GPU: 0.6 x bytes_limit (memory_stats); emulated here
    runner_budget = _memory_budget(GridOptions(
        memory_budget_gb=0.6 * args.gpu_limit_fraction * args.budget_gib))
    report = dict(meta=meta(), args=vars(args), budget_bytes=budget,
                  runner_budget_bytes=runner_budget, workloads={})
    for wl in args.workloads:
        cfgs, pl, ds, label = workload_group(wl, args)
        comp = Compiler(cfgs, pl, ds)
        group_batches = [len(b.configs) for b in pl.batches]
        print(f"\n== {label}\n   d = {comp.prog.d}, grad rows {comp.prog.grad_rows}, chunk "
              f"{comp.length} steps; runner: runs_per_call {max(group_batches)} "
              f"(jbyz.grid.plan: batches {group_batches[:6]}{'...' if len(group_batches) > 6 else ''})",
              flush=True)
        entry = dict(label=label, d=comp.prog.d, n=comp.prog.n, grad_rows=comp.prog.grad_rows,
                     chunk_steps=comp.length, plan_batches=group_batches,
                     runner_runs_per_call=max(group_batches), modes={})
        cache = {}
        for mode in args.modes:
            rows = []
            print(f"  {mode:<5}{'R':>6}" + "".join(f"{SHORT[k] + ' MiB':>17}" for k in FIELDS)
                  + f"{'compile s':>11}", flush=True)
            for R in (args.widths if mode == "vmap" else args.map_widths):
                c, secs = comp.compile(R, R if mode == "vmap" else 1)
                r = dict(R=R, width=R if mode == "vmap" else 1, compile_s=round(secs, 1),
                         load=load(), **mem_row(c))
                if mode == "vmap":
                    cache[("pick", R, R)] = r["runner_estimate"]
                rows.append(r)
                print(f"  {'':<5}{R:>6}" + "".join(f"{r[k] / 2**20:>17.1f}" for k in FIELDS)
                      + f"{secs:>11.1f}", flush=True)
            fits = {k: fit(rows, k) for k in FIELDS}
            a, b = fits["total"]
            r_max = int(math.floor((budget - a) / b)) if b > 0 else None
            res = dict(rows=rows, fit={k: dict(intercept_bytes=v[0], per_run_bytes=v[1])
                                      for k, v in fits.items()}, max_runs=r_max)
            print("  fit (MiB): " + ", ".join(f"{k} {v[0] / 2**20:.1f} + {v[1] / 2**20:.2f} R"
                                               for k, v in fits.items()), flush=True)
            print(f"  largest R with total <= {args.budget_gib:g} GiB: {r_max}", flush=True)
            ra, rb = fits["runner_estimate"]
            if rb > 0:
                res["max_runs_runner_estimate"] = int(math.floor((runner_budget - ra) / rb))
            if r_max and not args.no_check:
                # compile at the fitted maximum; where the growth is not quite linear, move R by
                # the secant through the last two compiled points (at most --refine times more)
                pts = [(rows[-1]["R"], rows[-1]["total"])]
                checks, R = [], r_max
                for _ in range(1 + args.refine):
                    c, secs = comp.compile(R, R if mode == "vmap" else 1)
                    chk = dict(R=R, compile_s=round(secs, 1), fit_total=a + b * R, **mem_row(c))
                    checks.append(chk)
                    print(f"  compiled at R={R}: total {chk['total'] / GiB:.2f} GiB "
                          f"(linear fit {chk['fit_total'] / GiB:.2f}), temp {chk['temp'] / GiB:.2f}, "
                          f"args {chk['argument'] / GiB:.2f}, outputs {chk['output'] / GiB:.2f}, "
                          f"runner est. {chk['runner_estimate'] / GiB:.2f} GiB", flush=True)
                    pts.append((R, chk["total"]))
                    (r0, y0), (r1, y1) = pts[-2], pts[-1]
                    if y1 <= budget and budget - y1 < 0.01 * budget or y1 == y0:
                        break
                    nxt = int(math.floor(r1 + (budget - y1) * (r1 - r0) / (y1 - y0)))
                    if nxt == R or nxt < 1:
                        break
                    R = nxt
                res["checks"] = checks
                ok = [ch["R"] for ch in checks if ch["total"] <= budget]
                res["max_runs_compiled"] = max(ok) if ok else None
                print(f"  largest compiled R with total <= {args.budget_gib:g} GiB: "
                      f"{res['max_runs_compiled']}", flush=True)
            entry["modes"][mode] = res
            report["workloads"][wl] = entry
            write_json(out, report)
        if not args.no_runner_pick:
            R = entry["runner_runs_per_call"]
            pick = runner_vmap_width(comp, R, runner_budget, cache)
            entry["runner_pick_gpu"] = pick
            print(f"  runner on a {args.budget_gib:g} GiB GPU (budget {runner_budget / GiB:.1f} GiB of "
                  f"temp + outputs): runs_per_call {R}, vmap_width {pick['width']} "
                  f"(tried {[(t['width'], round((t['runner_estimate'] or 0) / 2**20)) for t in pick['tried']]}"
                  f" MiB); on CPU vmap_width 1", flush=True)
        report["workloads"][wl] = entry
        write_json(out, report)
    print(f"\nwrote {out}")


if __name__ == "__main__":
    main()
