"""ByzFL's own benchmark (``byzfl.benchmark.run_benchmark``) and ``jbyz run`` on the same reduced
cells of experiments/robustness_benchmark, timed side by side.

    python benchmarks/byzfl_benchmark_timing.py --steps-optimal 100  # as measured: build/repair, run, print, write JSON
    python benchmarks/byzfl_benchmark_timing.py --steps 20 --cells median:none --out /tmp/smoke.json
    python benchmarks/byzfl_benchmark_timing.py --grid-model         # + jbyz on the grid's own setting (MLP 784-32-10)

What it does, end to end (every step is idempotent):

1. Builds or repairs a venv of its own (``--venv`` or $BYZFL_BENCH_VENV, default
   benchmarks/.venv-byzfl-bench, git-ignored)
   with the real ``torch==2.14.1``, ``torchvision==0.29.1`` (a CUDA build from PyPI, ~5.8 GB; the
   pair loads together, unlike PyPI's torchvision beside the CPU torch of benchmarks/setup_byzfl.sh)
   and ``byzfl==0.0.11``.
2. Prepares torchvision's FashionMNIST folder (``--data-dir`` or $BYZFL_BENCH_DATA, default
   benchmarks/.byzfl-bench-data, git-ignored):
   ``<root>/FashionMNIST/raw/*-ubyte``. torchvision 0.29 reads only the *uncompressed* IDX files,
   and ByzFL calls it with ``download=True``, which tries the network unless all four are present
   (Debian's .gz files have other MD5s than torchvision's, so torchvision cannot "verify and
   extract" them either). So the four Debian files (/usr/share/datasets/fashion-mnist/*.gz) are
   decompressed there once; the .gz files are also symlinked beside them for provenance.
3. For every cell: writes ByzFL's ``config.json`` (its benchmark's JSON format) in a fresh folder
   and runs ``byzfl.benchmark.run_benchmark(nb_jobs=1)`` there, unmodified, in a fresh venv process;
   then ``jbyz run`` on a one-cell TOML written beside it: once with ``--compile-cache off``
   (cold), once with a dedicated compile cache (``--jax-cache``; first use compiles and stores it:
   "prime"), and once more with that cache (warm). Both sides under ``nice -n 5 taskset -c 1``
   (``--prefix``), interleaved cell by cell. Nothing of ByzFL is copied into jbyz or changed.
4. Prints a table and writes benchmarks/results/byzfl_benchmark_timing.json (``--out``).

Timings. ByzFL: ``run_s`` = wall time of ``run_benchmark`` in its process after ``import byzfl``
(data loading and splitting, building clients/server, the 300 steps with evaluation every 50 steps
on validation and test, the final evaluation, result files, ByzFL's hyper-parameter selection);
``train_s`` = the ``train_time_*.txt`` ByzFL itself writes (its step loop, evaluations included);
``import_s``; ``proc_s`` = the whole process from outside. jbyz: ``runs_s`` = the "N runs in X s"
line (after imports: data, compile or cache load, training, evaluations, result files, the plot);
``loop_s`` = ``wall_time_s`` in results.parquet (the chunked training loop: compile or cache load
of the chunk program, the 300 steps and the evaluations after each chunk); ``proc_s`` = the whole
process from outside (imports included). Ratios are ByzFL run_s / jbyz runs_s (both without
imports) and ByzFL proc_s / jbyz proc_s.
"""
from __future__ import annotations

import argparse
import gzip
import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
DEBIAN_FMNIST = Path("/usr/share/datasets/fashion-mnist")
IDX = ["train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte",
       "t10k-labels-idx1-ubyte"]
PINS = ["torch==2.14.1", "torchvision==0.29.1", "byzfl==0.0.11"]

# cell name -> (ByzFL aggregator, jbyz aggregator); attack -> (ByzFL attack, jbyz attack TOML)
AGGS = {"median": ("Median", '"median"'), "trimmed_mean": ("TrMean", '"trimmed_mean"')}
ATTACKS = {
    "none": ("NoAttack", '"none"'),
    "sign_flip": ("SignFlipping", '"sign_flip"'),
    "alie": ("ALittleIsEnough", '{name = "alie", z = 1.5, sign = "plus"}'),  # ByzFL: mu + 1.5 sigma
    "optimal_alie": ("Optimal_ALittleIsEnough", '"optimal_alie"'),           # both: 20 evals, plus
}
DEFAULT_CELLS = ([f"median:{k}" for k in ATTACKS]
                 + [f"trimmed_mean:{k}" for k in ("none", "sign_flip", "alie")])

# Inside the ByzFL venv: import (timed), run ByzFL's benchmark in the cell folder, report JSON.
BYZFL_DRIVER = r"""
import json, os, sys, time
t0 = time.perf_counter()
import torch, torchvision, byzfl
from byzfl.benchmark import run_benchmark
import importlib.metadata as md
t1 = time.perf_counter()
os.chdir(sys.argv[1])
r0 = os.times()
run_benchmark(nb_jobs=1)
t2 = time.perf_counter()
r1 = os.times()
print("BYZFL_JSON " + json.dumps({
    "import_s": t1 - t0, "run_s": t2 - t1,
    "cpu_s": (r1.user - r0.user) + (r1.system - r0.system)
             + (r1.children_user - r0.children_user) + (r1.children_system - r0.children_system),
    "torch": torch.__version__, "torchvision": torchvision.__version__,
    "byzfl": md.version("byzfl"), "torch_threads": torch.get_num_threads(),
    "affinity": sorted(os.sched_getaffinity(0)),
}))
"""


def sh(cmd, **kw):
    return subprocess.run(cmd, check=True, text=True, **kw)


def ensure_venv(venv: Path, python: str) -> dict:
    """Create/repair the venv; returns the versions it imports."""
    py = venv / "bin" / "python"
    check = ("import importlib.metadata as md, torch, torchvision, byzfl; "
             "from torchvision import datasets, transforms; import torchvision.ops; "
             "print(md.version('torch'), md.version('torchvision'), md.version('byzfl'))")
    want = [p.split("==")[1] for p in PINS]
    ok = False
    if py.exists():
        r = subprocess.run([str(py), "-c", check], capture_output=True, text=True)
        ok = r.returncode == 0 and r.stdout.split() == want
    if not ok:
        if not py.exists() or subprocess.run([str(py), "-c", "import sys; assert sys.version_info[:2] == (3, 11)"]).returncode:
            shutil.rmtree(venv, ignore_errors=True)
            sh([python, "-m", "venv", str(venv)])
        print(f"[venv] installing {' '.join(PINS)} into {venv} (CUDA build, ~5.8 GB, ~3 min)", flush=True)
        sh([str(py), "-m", "pip", "install", "-q", "--disable-pip-version-check", *PINS])
    r = subprocess.run([str(py), "-c", check], capture_output=True, text=True, check=True)
    versions = dict(zip(["torch", "torchvision", "byzfl"], r.stdout.split()))
    print(f"[venv] ok: {venv}  {versions}", flush=True)
    return versions


def ensure_data(root: Path) -> Path:
    raw = root / "FashionMNIST" / "raw"
    raw.mkdir(parents=True, exist_ok=True)
    for name in IDX:
        gz = DEBIAN_FMNIST / f"{name}.gz"
        link = raw / f"{name}.gz"
        if not link.is_symlink():
            if link.exists():
                link.unlink()
            link.symlink_to(gz)
        out = raw / name
        if not out.exists() or out.stat().st_size == 0:
            tmp = out.with_suffix(".part")
            with gzip.open(gz, "rb") as src, open(tmp, "wb") as dst:
                shutil.copyfileobj(src, dst)
            tmp.rename(out)
    print(f"[data] {raw}: {sorted(p.name for p in raw.iterdir())}", flush=True)
    return root


def byzfl_config(agg: str, attack: str, steps: int, data_dir: Path, results: Path, lr: float,
                 gamma: float, size_train_set: float) -> dict:
    f_real = 0 if attack == "NoAttack" else 3  # ByzFL refuses NoAttack with f > 0
    bc = {
        "training_algorithm": {"name": "DSGD", "parameters": {}},
        "nb_steps": steps,
        "device": "cpu",
        "training_seed": 0,
        "nb_training_seeds": 1,
        "nb_honest_clients": 10,
        "f": [f_real],
        "data_distribution_seed": 0,
        "nb_data_distribution_seeds": 1,
        "data_distribution": [{"name": "gamma_similarity_niid", "distribution_parameter": [gamma]}],
        "size_train_set": size_train_set,
    }
    if f_real == 0:
        bc["tolerated_f"] = [3]  # the rule and NNM still declare f = 3
    return {
        "benchmark_config": bc,
        "model": {"name": "fc_mnist", "dataset_name": "fashionmnist", "nb_labels": 10,
                  "loss": "NLLLoss", "learning_rate": lr, "learning_rate_decay": 1.0,
                  "milestones": []},
        "aggregator": [{"name": agg, "parameters": {}}],
        "pre_aggregators": [{"name": "NNM", "parameters": {}}],
        "honest_clients": {"momentum": 0.9, "weight_decay": 0.0001, "batch_size": 25},
        "attack": [{"name": attack, "parameters": {}}],
        "evaluation_and_results": {
            "evaluation_delta": 50, "batch_size_evaluation": 128, "evaluate_on_test": True,
            "store_per_client_metrics": True, "store_models": False,
            "data_folder": str(data_dir), "results_directory": str(results),
        },
    }


def jbyz_toml(agg_toml: str, attack_key: str, steps: int, lr: float, gamma: float,
              matched: bool) -> str:
    """matched=True: ByzFL's model and data pipeline (784-100-10, pixels in [0,1], random flips of
    training and test images, none-cell as ByzFL: 10 honest, f_real 0, f 3). matched=False: the
    robustness grid's own setting (784-32-10, normalised, no flips, none-cell 13 workers)."""
    attack_toml = ATTACKS[attack_key][1]
    lines = [
        "[run]",
        'dataset = "fashion_mnist"',
        'model = "mlp"',
        f"model_kwargs = {{hidden = [{100 if matched else 32}]}}",
        'split = "gamma_similarity"',
        f"gamma = {gamma}",
        "batch_size = 25",
        f"steps = {steps}",
        "momentum = 0.9",
        'momentum_at = "worker"',
        "weight_decay = 1e-4",
        'preaggregators = ["nnm"]',
        "validation_size = 5000",
        "eval_every = 50",
        "seed = 0",
        f"lr = {lr}",
        f"aggregator = {agg_toml}",
        f"attack = {attack_toml}",
    ]
    if matched:
        lines += ["dataset_kwargs = {normalize = false}", 'augment = "flip"', 'augment_test = "flip"']
    if matched and attack_key == "none":
        lines += ["n_workers = 10", "f_real = 0", "f = 3"]
    else:
        lines += ["n_workers = 13", "f_real = 3"]
    return "\n".join(lines) + "\n"


def loadavg():
    return [round(float(x), 2) for x in open("/proc/loadavg").read().split()[:3]]


def timed(cmd, **kw):
    l0 = loadavg()
    ru0 = os.times()
    t0 = time.perf_counter()
    r = subprocess.run(cmd, capture_output=True, text=True, **kw)
    wall = time.perf_counter() - t0
    ru1 = os.times()
    cpu = (ru1.children_user - ru0.children_user) + (ru1.children_system - ru0.children_system)
    if r.returncode:
        sys.stderr.write(r.stdout[-4000:] + "\n" + r.stderr[-4000:] + "\n")
        raise SystemExit(f"command failed ({r.returncode}): {' '.join(map(str, cmd))}")
    return r, {"proc_s": round(wall, 2), "proc_cpu_s": round(cpu, 2), "load_before": l0,
               "load_after": loadavg()}


def run_byzfl(prefix, venv, cell_dir: Path, cfg: dict) -> dict:
    work = cell_dir / "byzfl"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    (work / "config.json").write_text(json.dumps(cfg, indent=2))
    r, t = timed([*prefix, str(venv / "bin" / "python"), "-c", BYZFL_DRIVER, str(work)])
    (work / "stdout.log").write_text(r.stdout + r.stderr)
    line = next(x for x in r.stdout.splitlines() if x.startswith("BYZFL_JSON "))
    out = {**json.loads(line[len("BYZFL_JSON "):]), **t}
    res = work / "results"
    run_dirs = [p for p in res.iterdir() if p.is_dir() and p.name != "best_hyperparameters"]
    assert len(run_dirs) == 1, run_dirs
    rd = run_dirs[0]
    out["train_s"] = float((rd / "train_time_tr_seed_0_dd_seed_0.txt").read_text().split(",")[0])
    test = [float(x) for x in (rd / "test_accuracy_tr_seed_0_dd_seed_0.txt").read_text().strip().split(",")]
    val = [float(x) for x in (rd / "val_accuracy_tr_seed_0_dd_seed_0.txt").read_text().strip().split(",")]
    out.update(final_test_acc=test[-1], final_val_acc=val[-1], n_evals=len(test), run_dir=rd.name)
    for k in ("import_s", "run_s", "train_s", "cpu_s"):
        out[k] = round(out[k], 2)
    return out


def run_jbyz(prefix, jbyz, toml_path: Path, out_dir: Path, cache: str) -> dict:
    shutil.rmtree(out_dir, ignore_errors=True)
    r, t = timed([*prefix, jbyz, "run", str(toml_path), "--no-progress", "--out", str(out_dir),
                  "--compile-cache", cache], cwd=REPO)
    (out_dir / "stdout.log").write_text(r.stdout + r.stderr)
    m = re.search(r"(\d+) runs in ([\d.]+) s", r.stdout)
    import pandas as pd

    df = pd.read_parquet(out_dir / "results.parquet")
    last = df.sort_values("step").iloc[-1]
    return {**t, "runs_s": float(m.group(2)), "loop_s": round(float(df["wall_time_s"].iloc[0]), 2),
            "final_test_acc": round(float(last["test_accuracy"]), 4),
            "final_val_acc": round(float(last["val_accuracy"]), 4), "n_evals": int(len(df)),
            "cache": cache}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--venv", type=Path, default=Path(os.environ.get("BYZFL_BENCH_VENV", HERE / ".venv-byzfl-bench")))
    ap.add_argument("--data-dir", type=Path, default=Path(os.environ.get("BYZFL_BENCH_DATA", HERE / ".byzfl-bench-data")))
    ap.add_argument("--work", type=Path, default=Path("/tmp/byzfl_benchmark_timing"),
                    help="per-cell folders (ByzFL config/results, jbyz TOML/results)")
    ap.add_argument("--jax-cache", type=Path, default=None,
                    help="compile cache of the prime/warm jbyz runs (default: <work>/jax-cache, emptied first)")
    ap.add_argument("--cells", nargs="+", default=DEFAULT_CELLS, help="aggregator:attack, e.g. median:alie")
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--steps-optimal", type=int, default=None,
                    help="steps of the optimal_alie cells on both sides (default: --steps); ByzFL's "
                         "optimal ALIE costs ~1.7 CPU-s a step here, so 300 steps of it alone take ~9 CPU-min")
    ap.add_argument("--lr", type=float, default=0.1)
    ap.add_argument("--gamma", type=float, default=0.5)
    ap.add_argument("--grid-model", action="store_true",
                    help="also time jbyz (prime + warm) on the grid's own setting (784-32-10, normalised, no flips)")
    ap.add_argument("--prefix", default="nice -n 5 taskset -c 1", help="command prefix for both sides")
    ap.add_argument("--python", default="python3.11", help="interpreter for the venv")
    ap.add_argument("--out", type=Path, default=HERE / "results" / "byzfl_benchmark_timing.json")
    args = ap.parse_args(argv)

    prefix = args.prefix.split()
    jbyz = shutil.which("jbyz") or sys.exit("jbyz not on PATH")
    versions = ensure_venv(args.venv, args.python)
    ensure_data(args.data_dir)
    cache = args.jax_cache or args.work / "jax-cache"
    if args.jax_cache is None:
        shutil.rmtree(cache, ignore_errors=True)
    cache.mkdir(parents=True, exist_ok=True)
    size_train_set = 55000 / 60000 + 1e-6  # int(x * 60000) = 55000 training, 5,000 validation

    def dump(rows, done):
        import importlib.metadata as md

        tot = {k: round(sum(r[src][key] for r in rows), 1) for k, src, key in (
            ("byzfl_run_s", "byzfl", "run_s"), ("jbyz_cold_runs_s", "jbyz_cold", "runs_s"),
            ("jbyz_warm_runs_s", "jbyz_warm", "runs_s"))}
        out = {
            "what": "ByzFL's own benchmark (byzfl.benchmark.run_benchmark) vs jbyz run, same reduced cells",
            "date": time.strftime("%Y-%m-%d %H:%M"), "complete": done,
            "setting": {"steps": args.steps, "steps_optimal": args.steps_optimal or args.steps,
                        "lr": args.lr, "gamma": args.gamma, "f": 3, "n_honest": 10, "batch": 25,
                        "momentum": 0.9, "weight_decay": 1e-4, "preaggregator": "NNM",
                        "validation": 5000, "eval_every": 50, "seed": 0},
            "prefix": args.prefix, "cpus": os.cpu_count(), "byzfl_versions": versions,
            "jbyz_version": md.version("jbyz"), "jax_version": md.version("jax"),
            "venv": str(args.venv), "data_dir": str(args.data_dir), "jax_cache": str(cache),
            "rows": rows, "totals": tot,
        }
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(out, indent=1))

    rows = []
    for cell in args.cells:
        agg_key, attack_key = cell.split(":")
        cdir = args.work / cell.replace(":", "__")
        cdir.mkdir(parents=True, exist_ok=True)
        steps = args.steps_optimal if (attack_key == "optimal_alie" and args.steps_optimal) else args.steps
        row = {"cell": cell, "steps": steps}
        print(f"[{cell}] ByzFL ...", flush=True)
        cfg = byzfl_config(AGGS[agg_key][0], ATTACKS[attack_key][0], steps, args.data_dir,
                           cdir / "byzfl" / "results", args.lr, args.gamma, size_train_set)
        row["byzfl"] = run_byzfl(prefix, args.venv, cdir, cfg)
        print(f"[{cell}] ByzFL {row['byzfl']['run_s']} s (train loop {row['byzfl']['train_s']} s, "
              f"acc {row['byzfl']['final_test_acc']})", flush=True)
        toml = cdir / "jbyz_matched.toml"
        toml.write_text(jbyz_toml(AGGS[agg_key][1], attack_key, steps, args.lr, args.gamma, True))
        for label, c in (("cold", "off"), ("prime", str(cache)), ("warm", str(cache))):
            row[f"jbyz_{label}"] = run_jbyz(prefix, jbyz, toml, cdir / f"jbyz_{label}", c)
            print(f"[{cell}] jbyz {label}: runs {row[f'jbyz_{label}']['runs_s']} s, loop "
                  f"{row[f'jbyz_{label}']['loop_s']} s, process {row[f'jbyz_{label}']['proc_s']} s "
                  f"(acc {row[f'jbyz_{label}']['final_test_acc']})", flush=True)
        if args.grid_model:
            gt = cdir / "jbyz_grid.toml"
            gt.write_text(jbyz_toml(AGGS[agg_key][1], attack_key, steps, args.lr, args.gamma, False))
            for label in ("prime", "warm"):
                row[f"jbyz_grid_{label}"] = run_jbyz(prefix, jbyz, gt, cdir / f"jbyz_grid_{label}", str(cache))
            print(f"[{cell}] jbyz grid setting warm: runs {row['jbyz_grid_warm']['runs_s']} s", flush=True)
        b = row["byzfl"]
        row["ratio_cold"] = round(b["run_s"] / row["jbyz_cold"]["runs_s"], 2)
        row["ratio_warm"] = round(b["run_s"] / row["jbyz_warm"]["runs_s"], 2)
        row["ratio_proc_cold"] = round(b["proc_s"] / row["jbyz_cold"]["proc_s"], 2)
        row["ratio_proc_warm"] = round(b["proc_s"] / row["jbyz_warm"]["proc_s"], 2)
        rows.append(row)
        dump(rows, False)  # partial results after every cell

    hdr = (f"{'cell (steps)':<26} | {'ByzFL run s':>11} | {'(loop s)':>8} | {'jbyz cold s':>11} | "
           f"{'jbyz warm s':>11} | {'(loop c/w)':>12} | {'ratio c/w':>11} | {'proc ratio c/w':>14} | acc ByzFL/jbyz")
    print("\n" + hdr + "\n" + "-" * len(hdr))
    for r in rows:
        b, c, w = r["byzfl"], r["jbyz_cold"], r["jbyz_warm"]
        print(f"{r['cell'] + ' (' + str(r['steps']) + ')':<26} | {b['run_s']:>11.1f} | {b['train_s']:>8.1f} | {c['runs_s']:>11.1f} | "
              f"{w['runs_s']:>11.1f} | {c['loop_s']:>5.1f}/{w['loop_s']:<6.1f} | "
              f"{r['ratio_cold']:>5.1f}/{r['ratio_warm']:<5.1f} | {r['ratio_proc_cold']:>6.1f}/{r['ratio_proc_warm']:<7.1f} | "
              f"{b['final_test_acc']:.3f}/{w['final_test_acc']:.3f}")
    tot_b = sum(r["byzfl"]["run_s"] for r in rows)
    tot_c = sum(r["jbyz_cold"]["runs_s"] for r in rows)
    tot_w = sum(r["jbyz_warm"]["runs_s"] for r in rows)
    print(f"{'total':<26} | {tot_b:>11.1f} | {'':>8} | {tot_c:>11.1f} | {tot_w:>11.1f} | {'':>12} | "
          f"{tot_b / tot_c:>5.1f}/{tot_b / tot_w:<5.1f} |")

    dump(rows, True)
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
