"""Experiment (2): the clipping heuristic on a Fashion-MNIST CNN with partial participation.

20 clients (the first 5 Byzantine), an i.i.d. split of the 60k training images, 4 clients
sampled per round (uniformly, without replacement, so 0-4 of them are Byzantine; 3.2% of the
rounds have a Byzantine majority). Base method as in the paper's neural-network runs: robust
worker-momentum SGD (sum form ``m <- 0.9 m + g``, kept by each client and updated when it is
sampled), aggregator CM or RFA (geometric median) behind bucketing (s = 2), server
``x <- x - lr g``. With clipping, each sampled client's momentum deviation from the previous
aggregate is clipped to ``clip_mult * ||g^{k-1}||`` (the reference code's rule) before the
bucketed aggregation and the previous aggregate is added back
(:func:`jbyz.algorithms.pp_clipping.clip_deviations`); the first round is not clipped.
Attacks: bit flipping (-own momentum), label flipping (9 - y), ALIE (z = 0.2533 from
(n, f) = (20, 5) as the reference code, mu/sigma over the sampled honest clients) and shift-back
(multiplier 2 as the authors' MNIST script, or ``--shift-back-mult lr`` for their a9a
script's and the paper's form); plus a no-attack reference.

Model: ``lenet`` from the registry with channels (16, 32) (conv5x5-16, pool, conv5x5-32, pool,
FC 512 -> 10), a smaller CNN than the paper's (conv32-conv64-FC9216-128) to fit the CPU budget.

One round is one compiled program per (attack, aggregator), with clipping on/off and the number
of Byzantine clients as traced arguments (the no-attack reference is the shift-back program with
f_real = 0), driven by a Python loop: when this was written the conv gradients ran ~3x slower
inside a ``lax.scan`` body than at top level on XLA:CPU (fixed in ``jbyz.models`` since, see
benchmarks/NOTES_cnn.md), and vmap over runs is slower than a loop for convolutions
(benchmarks/NOTES_cnn.md). Seeds run one after the other.

Run (from the repository root):
    nice -n 10 python experiments/marina_pp/run_fmnist.py
Writes experiments/marina_pp/results/fmnist.parquet.

Options beyond the defaults (also as keys of a TOML file, --config experiments/marina_pp/configs/):
  --test-size 10000           the whole Fashion-MNIST test set (default: a 2000-image subset)
  --momentum-all-clients      every client computes a gradient and updates its momentum every
                              round, sampled or not, as the authors' code (code/simulator.py
                              computes every worker's gradient each round); 5x the gradients
  --shift-back-mult lr        shift-back as the paper's text and the a9a script (default 2: the
                              MNIST script's reflection through x0)
  --check                     validate the options and print the plan, run nothing

Resumable: every run (attack, aggregator, clipping, seed) is stored as soon as it finishes, as
one Parquet part in ``<out>.parts/``; a rerun of the same command skips the stored runs, so a
killed run continues where it stopped. A part written with other settings is an error, not
reused. The table ``<out>`` is written from all parts at the end.
"""

from __future__ import annotations

import argparse
import itertools
import json
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import optax
import pandas as pd
from jax.flatten_util import ravel_pytree

from jbyz.aggregators import AGGREGATORS
from jbyz.algorithms.marina import sample_clients, shift_back
from jbyz.algorithms.pp_clipping import client_momentum, clip_deviations
from jbyz.attacks import ATTACKS, alie_z
from jbyz.data import flip_labels, load_dataset, sample_indices, split_workers
from jbyz.models import build_model, per_worker_grads
from jbyz.preaggregators import bucketing
from jbyz.results import load_results, read_metadata, run_metadata, write_table

from config_file import parse_args, parse_mult  # experiments/marina_pp/config_file.py

HERE = Path(__file__).resolve().parent
N, F_REAL, C, BATCH, BETA = 20, 5, 4, 32, 0.9
# shift-back's default multiplier: the authors' MNIST script's (the model reflected through x0);
# the stored parts were run with it
SHIFT_BACK_MULT = 2.0


def make_attack(name, shift_back_mult=SHIFT_BACK_MULT):
    if name == "none":
        return ATTACKS.build("none")
    if name == "bit_flip":
        return ATTACKS.build("bit_flip")
    if name == "label_flip":
        return ATTACKS.build("label_flip")
    if name == "alie":
        return ATTACKS.build("alie", z=alie_z(N, F_REAL))
    if name == "shift_back":
        return shift_back(shift_back_mult)
    raise ValueError(name)


def build(ds, split, model, attack_name, agg_name, lr, clip_mult, test_x, test_y,
          momentum_all_clients=False, shift_back_mult=SHIFT_BACK_MULT):
    """One compiled round per (attack, aggregator); clipping on/off and f_real are traced.

    ``momentum_all_clients``: every client's momentum moves each round (the authors' code);
    the sampled clients' minibatches are the same as without it.
    """
    attack = make_attack(attack_name, shift_back_mult)
    agg = clip_deviations(AGGREGATORS.build(agg_name), (bucketing(2),), clip_mult=clip_mult)
    grads_fn = per_worker_grads(
        model, lambda logits, y: optax.softmax_cross_entropy_with_integer_labels(logits, y).mean())
    x0, unravel = ravel_pytree(model.params)
    d = x0.shape[0]
    X = jnp.asarray(ds.x_train)
    Y = jnp.asarray(ds.y_train)
    idx_table = jnp.asarray(split.indices)
    sizes = jnp.asarray(split.sizes)

    @jax.jit
    def one_round(carry, k, run_key, clip, f_real):
        x, mom, agg_state = carry
        kk = jax.random.fold_in(run_key, k)
        clients = sample_clients(jax.random.fold_in(kk, 0), N, C)
        byz = clients < f_real
        # who computes a gradient: the sampled clients, or every client (the authors' code)
        workers = jnp.arange(N, dtype=jnp.int32) if momentum_all_clients else clients
        bkeys = jax.vmap(lambda c: jax.random.fold_in(jax.random.fold_in(kk, 1), c))(workers)
        idx = jax.vmap(sample_indices, in_axes=(0, 0, 0, None))(
            bkeys, idx_table[workers], sizes[workers], BATCH)
        yb = Y[idx]
        if attack.flips_labels:
            yb = jnp.where((workers < f_real)[:, None], flip_labels(yb, 10), yb)
        g, _ = grads_fn(unravel(x), model.state, X[idx], yb, bkeys)
        g = jax.vmap(lambda t: ravel_pytree(t)[0])(g)
        # sum-form worker momentum (first buffer = first grad); messages: the sampled buffers
        mom, m_new = client_momentum(mom, g, clients, BETA, all_clients=momentum_all_clients)
        ctx = {"params": x, "x0": x0, "lr": lr, "f": 0, "step": k}
        msgs, _ = attack.apply(m_new, ~byz, byz, jax.random.fold_in(kk, 2), (), ctx)
        # first round: no previous aggregate, no clipping; clip=False: plain bucketed rule
        do_clip = clip & agg_state.started
        out, agg_state = agg.apply(msgs, jnp.ones((C,), bool), jnp.int32(0),
                                   jax.random.fold_in(kk, 3), agg_state, clip=do_clip)
        x = x - lr * out
        return (x, mom, agg_state), 2 * jnp.sum(byz) > C

    @jax.jit
    def evaluate(x):
        logits = model.predict(unravel(x), model.state, test_x, chunk_size=1000)
        acc = jnp.mean(jnp.argmax(logits, -1) == test_y)
        loss = optax.softmax_cross_entropy_with_integer_labels(logits, test_y).mean()
        return acc, loss

    def run(seed, clip, f_real, steps, eval_every):
        # A Python loop over a jitted round: on XLA:CPU a conv gradient inside lax.scan ran
        # ~3x slower than at top level here (124 vs 44 ms per round).
        run_key = jax.random.key(seed)
        carry = (x0, jnp.zeros((N, d), jnp.float32), agg.init(C, d))
        acc, loss = evaluate(x0)
        rows = [(0, float(acc), float(loss), 0)]
        majority = 0
        clip_, f_ = jnp.asarray(clip), jnp.int32(f_real)
        for k in range(steps):
            carry, maj = one_round(carry, jnp.int32(k), run_key, clip_, f_)
            majority += int(maj)
            if (k + 1) % eval_every == 0:
                acc, loss = evaluate(carry[0])
                rows.append((k + 1, float(acc), float(loss), majority))
        return rows

    return run


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--eval-every", type=int, default=25)
    ap.add_argument("--seeds", type=int, default=2)
    ap.add_argument("--lr", type=float, default=0.01)
    ap.add_argument("--clip-mult", type=float, default=1.0)
    ap.add_argument("--test-size", type=int, default=2000)
    ap.add_argument("--attacks", default="none,bit_flip,label_flip,alie,shift_back")
    ap.add_argument("--aggregators", default="median,geometric_median")
    ap.add_argument("--out", default=str(HERE / "results" / "fmnist.parquet"))
    ap.add_argument("--momentum-all-clients", action="store_true",
                    help="update every client's momentum each round (the authors' code)")
    ap.add_argument("--shift-back-mult", type=parse_mult, default=SHIFT_BACK_MULT,
                    help="shift-back's multiplier: 2 (default; the authors' MNIST script: the "
                         "model is reflected through x0) or 'lr' (their a9a script and the "
                         "paper's text: the server steps lr of the way back to x0)")
    ap.add_argument("--check", action="store_true", help="validate and print the plan only")
    args = parse_args(ap)
    known_attacks = {"none", "bit_flip", "label_flip", "alie", "shift_back"}
    bad = [a for a in args.attacks.split(",") if a not in known_attacks]
    if bad:
        ap.error(f"unknown attacks {bad}; known: {', '.join(sorted(known_attacks))}")
    for name in args.aggregators.split(","):
        if name not in AGGREGATORS.names():
            ap.error(f"unknown aggregator {name!r}")
    if args.test_size < 1 or args.seeds < 1 or args.steps < 1 or args.eval_every < 1:
        ap.error("--test-size, --seeds, --steps and --eval-every must be >= 1")
    n_runs = (len([a for a in args.attacks.split(",")]) * 2 * len(args.aggregators.split(","))
              * args.seeds)
    print(f"{n_runs} runs of {args.steps} rounds (attacks {args.attacks}; aggregators "
          f"{args.aggregators}; clipping on/off; {args.seeds} seeds), lr {args.lr}, test images "
          f"{min(args.test_size, 10000)}, momentum of "
          f"{'every client' if args.momentum_all_clients else 'the sampled clients'}, shift-back "
          f"multiplier {args.shift_back_mult} -> {args.out}")
    if args.check:
        return

    ds = load_dataset("fashion_mnist", limit_test=args.test_size)
    split = split_workers(ds.y_train, N, "iid", seed=0)
    model = build_model("lenet", ds.input_shape, 10, key=jax.random.key(0), channels=(16, 32))
    test_x, test_y = jnp.asarray(ds.x_test), jnp.asarray(ds.y_test)
    print(f"{ds}; lenet(16, 32) with {model.num_params} parameters")
    out = Path(args.out)
    parts_dir = out.with_name(out.stem + ".parts")
    parts_dir.mkdir(parents=True, exist_ok=True)
    # what a stored part must have been run with to be reused
    settings = json.dumps(dict(steps=args.steps, eval_every=args.eval_every, lr=args.lr,
                               clip_mult=args.clip_mult, test_size=args.test_size,
                               momentum_all_clients=args.momentum_all_clients,
                               # only when not the default, so parts stored before the option
                               # existed (all with 2) are reused
                               **({} if args.shift_back_mult == SHIFT_BACK_MULT
                                  else {"shift_back_mult": args.shift_back_mult})),
                          sort_keys=True)
    meta = {**run_metadata(), "steps": str(args.steps), "settings": settings}
    constants = dict(n_clients=N, f_real=F_REAL, clients_per_round=C, batch_size=BATCH,
                     momentum=BETA, lr=args.lr, clip_mult=args.clip_mult, model="lenet(16,32)",
                     dataset="fashion_mnist", test_size=args.test_size)
    part_files = []
    t_all = time.time()
    attacks = args.attacks.split(",")
    for attack_name, agg_name in itertools.product(
            [a for a in attacks if a != "none"] or ["shift_back"], args.aggregators.split(",")):
        cases = [(attack_name, clip, F_REAL) for clip in (True, False)]
        if "none" in attacks and attack_name == "shift_back":  # the no-attack reference
            cases += [("none", clip, 0) for clip in (True, False)]
        run = None
        for name, clip, f_real in cases:
            if name not in attacks:
                continue
            for seed in range(args.seeds):
                part = parts_dir / f"{name}__{agg_name}__clip{int(clip)}__seed{seed}.parquet"
                part_files.append(part)
                if part.exists():
                    if read_metadata(part).get("settings") != settings:
                        raise SystemExit(f"{part} was run with other settings than {settings}; "
                                         f"remove {parts_dir} (or use another --out) to rerun")
                    print(f"{name:10s} {agg_name:16s} clip={clip!s:5s} seed {seed}: stored, "
                          "skipped", flush=True)
                    continue
                if run is None:
                    run = build(ds, split, model, attack_name, agg_name, args.lr, args.clip_mult,
                                test_x, test_y, args.momentum_all_clients,
                                args.shift_back_mult)
                t = time.time()
                res = run(seed, clip, f_real, args.steps, args.eval_every)
                dt = time.time() - t
                df = pd.DataFrame([dict(attack=name, aggregator=agg_name, clipping=clip,
                                        seed=seed, step=step, test_accuracy=acc, test_loss=loss,
                                        byz_majority_rounds=maj)
                                   for step, acc, loss, maj in res])
                for k, v in constants.items():
                    df[k] = v
                if args.momentum_all_clients:  # a column only away from the default
                    df["momentum_clients"] = "all"
                if args.shift_back_mult != SHIFT_BACK_MULT:
                    df["shift_back_mult"] = str(args.shift_back_mult)
                write_table(df, part, {**meta, "wall_s": f"{dt:.1f}"})
                print(f"{name:10s} {agg_name:16s} clip={clip!s:5s} seed {seed}: "
                      f"acc {res[-1][1]:.4f} (max {max(r[1] for r in res):.4f}), "
                      f"majority rounds {res[-1][3]}, {dt:.0f} s", flush=True)
    print(f"total {time.time() - t_all:.0f} s")
    df = pd.concat([load_results(f) for f in part_files], ignore_index=True)
    write_table(df, out, meta)
    print("wrote", out)


if __name__ == "__main__":
    main()
