"""Experiment (1): Byz-VR-MARINA-PP on l2-regularised logistic regression under shift-back.

Breast-cancer Wisconsin (scikit-learn's bundled copy, 569 samples, 30 features, standardised, plus
an intercept column), f(x) = mean log(1 + exp(-s_j a_j^T x)) + 0.01/2 ||x||^2, 15 honest + 5
Byzantine clients that each hold the full data, coordinate-wise median with bucketing (s = 2),
shift-back attack, minibatch b = 32, p = b/m, 20% participation (C = 4, C_hat = n).
The reference optimum f* comes from float64 L-BFGS followed by Newton steps.

Defaults (the stored results/logreg.parquet): stepsizes {0.5, 0.1}, shift-back multiplier 2 (the
authors' MNIST script's form, a reflection through x^0), full rounds with probability p = b/m.
Options (also as keys of a TOML file, --config experiments/marina_pp/configs/*.toml):
  --lrs 0.1,0.01,0.001           the paper's stepsize grid (run_scripts/a9a-pp.sh)
  --shift-back-mult lr           the a9a script's shift-back (multiplier='lr': the Byzantine
                                 aggregate is x - x^0, the server moves by gamma (x^0 - x))
  --schedule a9a [--epoch-rounds E]
                                 the a9a script's full round at the start of every epoch of E
                                 rounds (default E = ceil(m/b) = 18) instead of Bernoulli(p)
  --p P                          the full-round probability of the coin schedule (default b/m)
  --blocks a,b,...               which configurations to run (see BLOCKS)
  --check                        build and validate everything, print the plan, run nothing

Resumable: every (configuration, stepsize) is stored as soon as it finishes, as one Parquet part
in ``<out>.parts/`` (``results/logreg_paper.parts/`` for ``results/logreg_paper.parquet``); a
rerun of the same command skips the stored parts, so a killed run continues where it stopped.
A part written with other settings (rounds, seeds, attack, schedule) is an error, not reused.
The table ``<out>`` is written from all parts at the end.

Every static configuration is one compiled program, vmapped over seeds and over the numeric
hyper-parameters it sweeps (stepsize, clipping multiplier, number of Byzantine clients).

Run (from the repository root):
    nice -n 10 python experiments/marina_pp/run_logreg.py
Writes experiments/marina_pp/results/logreg.parquet and figures/logreg_*.png.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import jax

jax.config.update("jax_enable_x64", True)

import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import scipy.optimize  # noqa: E402
from sklearn.datasets import load_breast_cancer  # noqa: E402

from jbyz.aggregators import AGGREGATORS  # noqa: E402
from jbyz.algorithms import marina as M  # noqa: E402
from jbyz.compression import randk  # noqa: E402
from jbyz.preaggregators import bucketing  # noqa: E402
from jbyz.results import load_results, read_metadata, run_metadata, write_table  # noqa: E402

from config_file import parse_args, parse_mult  # noqa: E402  (experiments/marina_pp/config_file.py)

HERE = Path(__file__).resolve().parent
REG = 0.01
N_CLIENTS, F_REAL, BATCH = 20, 5, 32


def load_problem():
    a, y = load_breast_cancer(return_X_y=True)
    a = (a - a.mean(0)) / a.std(0)
    a = np.hstack([a, np.ones((len(a), 1))])
    return a.astype(np.float64), y.astype(np.int32)


def loss(w, xb, yb):
    s = 2.0 * yb.astype(w.dtype) - 1.0
    return jnp.mean(jnp.logaddexp(0.0, -s * (xb @ w))) + 0.5 * REG * jnp.sum(w * w)


def reference_optimum(a, y):
    """f* in float64: L-BFGS to gtol 1e-12, then Newton steps until the gradient is ~1e-15."""
    s = 2.0 * y - 1.0
    m = len(y)

    def fun(w):
        z = s * (a @ w)
        f = np.mean(np.logaddexp(0.0, -z)) + 0.5 * REG * w @ w
        sig = 1.0 / (1.0 + np.exp(z))
        g = -(a.T @ (s * sig)) / m + REG * w
        return f, g

    res = scipy.optimize.minimize(fun, np.zeros(a.shape[1]), jac=True, method="L-BFGS-B",
                                  options={"gtol": 1e-12, "ftol": 0, "maxiter": 100000})
    w = res.x
    for _ in range(20):
        z = s * (a @ w)
        p = 1.0 / (1.0 + np.exp(-z))
        h = (a.T * (p * (1 - p))) @ a / m + REG * np.eye(a.shape[1])
        w = w - np.linalg.solve(h, fun(w)[1])
    f, g = fun(w)
    return f, w, float(np.linalg.norm(g))


DEFAULT_LRS = (0.5, 0.1)
PAPER_LRS = (0.1, 0.01, 0.001)  # run_scripts/a9a-pp.sh of the authors' repository
# Block key -> configuration name (the name is the results' `config` column: keep it stable).
BLOCKS = {
    "pp_clip": "PP, clipping",
    "pp_noclip": "PP, no clipping",
    "marina": "Byz-VR-MARINA (full participation)",
    "pp_plus": "PP+, clipping",
    "mnist_schedule": "PP, clipping, code quirks (p=0, threshold alpha*|g|)",
    "randk": "PP, clipping, RandK K=8",
    "code_threshold": "PP, clipping, threshold alpha*|g| (a9a-pp.sh clip-mult grid)",
}
BLOCK_OF = {name: key for key, name in BLOCKS.items()}
DEFAULT_BLOCKS = ("pp_clip", "pp_noclip", "marina", "pp_plus", "mnist_schedule", "randk")


def configs(lrs=DEFAULT_LRS, shift_back_mult=2.0, full_round_every=None, blocks=DEFAULT_BLOCKS):
    """(name, MarinaConfig kwargs, list of param dicts) for the selected blocks.

    ``mnist_schedule`` is the MNIST script's schedule (no full round after g^0) with the code's
    radius alpha ||g^k||; it cannot be combined with ``full_round_every`` (the a9a script's).
    """
    unknown = [b for b in blocks if b not in BLOCKS]
    if unknown:
        raise ValueError(f"unknown blocks {unknown}; known: {', '.join(BLOCKS)}")
    cm = AGGREGATORS.build("median")
    base = dict(num_clients=N_CLIENTS, aggregator=cm, preaggregators=(bucketing(2),),
                attack=M.shift_back(shift_back_mult))
    if full_round_every is not None:
        base["full_round_every"] = int(full_round_every)
    lrs = tuple(lrs)
    pp = dict(base, clients_per_round=4, clients_full_round=N_CLIENTS)
    out = [
        ("PP, clipping", dict(pp, clip=True),
         [dict(lr=lr, alpha=al, f_real=fr) for lr in lrs for al in (0.1, 1.0, 10.0)
          for fr in (F_REAL, 0)]),
        ("PP, no clipping", dict(pp, clip=False),
         [dict(lr=lr, alpha=1.0, f_real=fr) for lr in lrs for fr in (F_REAL, 0)]),
        ("Byz-VR-MARINA (full participation)", dict(base, variant="marina"),
         [dict(lr=lr, alpha=1.0, f_real=F_REAL) for lr in lrs]),
        ("PP+, clipping", dict(pp, variant="pp_plus", clip=True),
         [dict(lr=lr, alpha=1.0, f_real=F_REAL) for lr in lrs]),
        ("PP, clipping, code quirks (p=0, threshold alpha*|g|)",
         dict(pp, clip=True, force_p_zero=True, threshold="aggregate"),
         [dict(lr=lr, alpha=lr, f_real=F_REAL) for lr in lrs]),
        ("PP, clipping, RandK K=8", dict(pp, clip=True, compressor=randk(k=8)),
         [dict(lr=lr, alpha=al, f_real=F_REAL) for lr in lrs for al in (1.0, 4.0)]),
        # run_a9a.py's clipping: radius clip_mult * ||g^k|| (code/simulator.py line 99) with
        # a9a-pp.sh's clip-mult values; under --schedule a9a this is the script's whole method.
        (BLOCKS["code_threshold"], dict(pp, clip=True, threshold="aggregate"),
         [dict(lr=lr, alpha=al, f_real=fr) for lr in lrs for al in (0.1, 1.0, 10.0, 100.0)
          for fr in (F_REAL, 0)]),
    ]
    names = {BLOCKS[b] for b in blocks}
    return [c for c in out if c[0] in names]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=2000)
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--record-every", type=int, default=5)
    ap.add_argument("--lrs", default=",".join(str(v) for v in DEFAULT_LRS),
                    help=f"stepsizes, comma-separated (the paper's: {PAPER_LRS})")
    ap.add_argument("--shift-back-mult", default="2", type=parse_mult,
                    help="'lr' (a9a script) or a number (2: MNIST script, the default)")
    ap.add_argument("--schedule", default="coin", choices=("coin", "a9a"),
                    help="full rounds: Bernoulli(p) (Alg. 1) or the a9a script's epoch starts")
    ap.add_argument("--epoch-rounds", type=int, default=0,
                    help="rounds per epoch for --schedule a9a (0: ceil(m/b))")
    ap.add_argument("--p", type=float, default=0.0, help="full-round probability (0: b/m)")
    ap.add_argument("--blocks", default=",".join(DEFAULT_BLOCKS),
                    help=f"configurations to run, from {', '.join(BLOCKS)}")
    ap.add_argument("--out", default=str(HERE / "results" / "logreg.parquet"))
    ap.add_argument("--check", action="store_true", help="validate and print the plan only")
    args = parse_args(ap)
    lrs = tuple(float(v) for v in args.lrs.split(","))
    blocks = tuple(b.strip() for b in args.blocks.split(",") if b.strip())
    if args.epoch_rounds < 0 or (args.epoch_rounds and args.schedule != "a9a"):
        ap.error("--epoch-rounds needs --schedule a9a and a value >= 1")
    if not 0.0 <= args.p <= 1.0:
        ap.error(f"--p must be in [0, 1]; got {args.p}")
    if args.p and args.schedule != "coin":
        ap.error("--p is the coin schedule's probability; --schedule a9a does not use it")

    a, y = load_problem()
    m = len(y)
    period = None
    if args.schedule == "a9a":
        period = args.epoch_rounds or -(-m // BATCH)  # run_a9a.py: one epoch = ceil(m/b) batches
    try:
        plan = configs(lrs, args.shift_back_mult, period, blocks)
        for name, kw, plist in plan:
            M.MarinaConfig(num_steps=args.steps, **kw)
    except (ValueError, TypeError) as e:  # ConfigError is a ValueError
        ap.error(str(e))
    p = args.p or BATCH / m
    sched = f"full round every {period} rounds" if period else f"p = {p:.4g}"
    print(f"{len(plan)} configurations, stepsizes {lrs}, shift-back mult "
          f"{args.shift_back_mult!r}, {sched}, {args.steps} rounds x {args.seeds} seeds "
          f"-> {args.out}")
    for name, kw, plist in plan:
        print(f"  {name}: {len(plist)} points")
    if args.check:
        return

    f_star, w_star, gnorm = reference_optimum(a, y)
    lip = np.linalg.eigvalsh(a.T @ a / m).max() / 4 + REG
    print(f"m={m} d={a.shape[1]} f*={f_star:.15f} |grad f(w*)|={gnorm:.2e} L={lip:.3f}")
    idx = np.tile(np.arange(m, dtype=np.int32), (N_CLIENTS, 1))  # every client: full data
    aj, yj = jnp.asarray(a), jnp.asarray(y)
    oracle = M.finite_sum_oracle(loss, aj, yj, idx, BATCH, num_classes=2)

    def metric(w):
        return {"loss": loss(w, aj, yj)}

    x0 = jnp.zeros(a.shape[1], jnp.float64)
    keys = jax.random.split(jax.random.key(20241), args.seeds)
    out = Path(args.out)
    parts_dir = out.with_name(out.stem + ".parts")
    parts_dir.mkdir(parents=True, exist_ok=True)
    # what a stored part must have been run with to be reused
    settings = dict(steps=args.steps, seeds=args.seeds, record_every=args.record_every,
                    shift_back_mult=str(args.shift_back_mult), p=None if period else p,
                    full_round_every=period)
    meta = {**run_metadata(), "f_star": repr(f_star), "L": repr(lip), "steps": str(args.steps),
            "settings": json.dumps(settings, sort_keys=True)}
    t_all = time.time()
    part_files = []
    for name, kw, plist in plan:
        cfg = M.MarinaConfig(num_steps=args.steps, **kw)
        grid = None
        for lr in dict.fromkeys(q["lr"] for q in plist):
            sub = [q for q in plist if q["lr"] == lr]
            # named by the block key (unique; the configuration names are not unique once
            # reduced to file-name characters: "PP+, clipping" and "PP, clipping")
            part = parts_dir / f"{BLOCK_OF[name]}__lr{lr!r}.parquet"
            if part in part_files:
                raise SystemExit(f"two runs would share the part {part}")
            part_files.append(part)
            if part.exists():
                stored = read_metadata(part)
                if stored.get("settings") != meta["settings"] or stored.get("config") != name:
                    raise SystemExit(
                        f"{part} holds {stored.get('config')!r} run with "
                        f"{stored.get('settings')}, not {name!r} with {meta['settings']}; "
                        f"remove {parts_dir} (or use another --out) to rerun")
                print(f"{name}, lr {lr:g}: stored in {part.name}, skipped")
                continue
            if grid is None:
                run = M.build_run(cfg, oracle, metric)
                grid = jax.jit(jax.vmap(jax.vmap(run, in_axes=(None, None, 0)),
                                        in_axes=(None, 0, None)))
            P = M.MarinaParams(
                lr=jnp.array([q["lr"] for q in sub]),
                p=jnp.full(len(sub), p),
                alpha=jnp.array([q["alpha"] for q in sub]),
                f_real=jnp.array([q["f_real"] for q in sub], jnp.int32),
                f=jnp.zeros(len(sub), jnp.int32),
            )
            t = time.time()
            _, tr = grid(x0, P, keys)
            tr = jax.tree.map(np.asarray, tr)
            dt = time.time() - t
            print(f"{name}, lr {lr:g}: {len(sub)} points x {args.seeds} seeds, {dt:.1f} s",
                  flush=True)
            ks = np.arange(0, args.steps, args.record_every)
            rows = []
            for i, q in enumerate(sub):
                for s in range(args.seeds):
                    gap0 = float(tr["init"]["loss"][i, s]) - f_star
                    rows.append(dict(config=name, **q, seed=s, step=0, epochs=1.0, gap=gap0,
                                     full=True, byz_majority=False, radius=np.nan))
                    rows += [dict(config=name, **q, seed=s, step=int(k) + 1,
                                  epochs=float(tr["epochs"][i, s, k]),
                                  gap=float(tr["loss"][i, s, k]) - f_star,
                                  full=bool(tr["full"][i, s, k]),
                                  byz_majority=bool(tr["byz_majority"][i, s, k]),
                                  radius=float(tr["radius"][i, s, k])) for k in ks]
                    maj = tr["byz_majority"][i, s]
                    print(f"   {q} seed {s}: final gap {tr['loss'][i, s, -1] - f_star:.3e}, "
                          f"epochs {tr['epochs'][i, s, -1]:.0f}, byz-majority rounds "
                          f"{maj.sum()} ({maj.mean():.3f}), full rounds {tr['full'][i, s].sum()}")
            df = pd.DataFrame(rows)
            df["n_clients"], df["b"], df["p"], df["f_star"] = N_CLIENTS, BATCH, p, f_star
            # Columns for the options, only away from their defaults (the stored table has none).
            if period is not None:
                df["p"] = np.nan
                df["full_round_every"] = period
            if args.shift_back_mult != 2.0:
                df["shift_back_mult"] = str(args.shift_back_mult)
            write_table(df, part, {**meta, "config": name, "wall_s": f"{dt:.1f}"})
    print(f"total {time.time() - t_all:.0f} s")
    df = pd.concat([load_results(f) for f in part_files], ignore_index=True)
    write_table(df, out, meta)
    print("wrote", out)


if __name__ == "__main__":
    main()
