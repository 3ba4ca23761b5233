"""Time the PyTorch peer ByzFL (byzfl 0.0.11) on the jbyz speed-comparison workload.

Run with the peer's own venv (built by ``bash benchmarks/setup_byzfl.sh``), not jbyz's:

    benchmarks/.venv-byzfl/bin/python benchmarks/byzfl_workload.py --aggregator median --steps 300 --seeds 1 --json
    benchmarks/.venv-byzfl/bin/python benchmarks/byzfl_workload.py --aggregator average          # no attack
    benchmarks/.venv-byzfl/bin/python benchmarks/byzfl_workload.py --aggregator krum --seeds 8   # grid, sequential
    benchmarks/.venv-byzfl/bin/python benchmarks/byzfl_workload.py --model cnn --steps 50 --json  # the CNN

Workload (benchmarks/README.md): Fashion-MNIST read from the Debian IDX files, MLP 784-100-10
(ByzFL's ``fc_mnist``, log-softmax + NLLLoss), n = 10 workers of which f = 3 Byzantine, batch 32 per
honest worker, worker momentum 0.9, ALIE (ByzFL's ``ALittleIsEnough``, tau = 1.5), server SGD lr 0.1,
300 steps. ``--model cnn`` swaps the MLP for a small CNN (jbyz's ``lenet``): conv5x5-32 (VALID),
ReLU, maxpool 2, conv5x5-64 (VALID), ReLU, maxpool 2, flatten (4*4*64 = 1024), fc-10, log-softmax;
it is registered into ByzFL's models module (``byzfl.fed_framework.models``, where
``ModelBaseInterface`` resolves ``model_name`` with ``getattr``) under the name ``jbyz_cnn``, so
ByzFL's own ``Client`` and ``Server`` build and train it. Only ByzFL's own classes do the work, wired as the "Federated Learning Simulation
Example" of ByzFL's README (and its own DSGD loop in byzfl/benchmark/train.py) wires them:

* ``DataDistributor("iid")`` splits the training set into 7 disjoint shuffled shards, one
  ``DataLoader(batch_size=32, shuffle=True)`` each (``--sampler replacement`` instead gives each
  worker a loader that draws 32 indices i.i.d. with replacement from the whole training set);
* 7 ``Client``: ``compute_gradients()`` then ``get_flat_gradients_with_momentum()``. ByzFL's
  momentum is the EMA u <- 0.9 u + 0.1 g with u initialised to **zero**, so u_1 = 0.1 g_1 (no
  bias correction); we do not re-implement it;
* ``ByzantineClient(ALittleIsEnough, f=3, tau=1.5)``: one vector mean + 1.5 * std (std with
  ddof = 1, over the 7 honest momenta; note the **+** sign, the ALIE paper subtracts), sent 3 times;
* ``Server``: ``RobustAggregator`` (Median / TrMean(f=3) / Krum(f=3) / Average, no pre-aggregation)
  then ``torch.optim.SGD(lr=0.1)`` (no weight decay, constant learning rate);
* every step the server's state dict is loaded into each client (``set_model_state``).

With ``--aggregator average`` the attack defaults to ``none``: the f Byzantine workers are absent
and the server averages the 7 honest momenta (``--attack alie`` forces the attack).

Timing: ``steps_per_s`` is steps / wall time of the training loop alone (the per-step loop above),
excluding imports, data loading, object construction and the final test evaluation, which are
reported separately, as is the end-to-end time of the whole process. ``--seeds K`` runs K seeds one
after another in this process (seeds seed0 .. seed0+K-1) and reports the total seconds.
"""

from __future__ import annotations

import time

_T_SCRIPT0 = time.perf_counter()

import argparse  # noqa: E402
import gzip  # noqa: E402
import importlib.metadata as md  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import platform  # noqa: E402
import statistics  # noqa: E402
import sys  # noqa: E402
from pathlib import Path  # noqa: E402

AGGREGATORS = {  # our name -> ByzFL aggregator_info (f filled in below)
    "median": ("Median", False),
    "trmean": ("TrMean", True),
    "krum": ("Krum", True),
    "average": ("Average", False),
}


def _process_age_s() -> float | None:
    """Seconds since this process started (Linux /proc), so interpreter start-up counts too."""
    try:
        ticks = os.sysconf("SC_CLK_TCK")
        with open("/proc/self/stat") as fh:
            start_ticks = int(fh.read().rsplit(")", 1)[1].split()[19])
        with open("/proc/uptime") as fh:
            uptime = float(fh.read().split()[0])
        return uptime - start_ticks / ticks
    except (OSError, ValueError, IndexError):
        return None


def _cpu_jiffies() -> tuple[int, int, int] | None:
    """(busy jiffies of all CPUs, all jiffies of all CPUs, this process's jiffies) from /proc."""
    try:
        with open("/proc/stat") as fh:
            v = [int(x) for x in fh.readline().split()[1:9]]  # user nice system idle iowait irq softirq steal
        with open("/proc/self/stat") as fh:
            fields = fh.read().rsplit(")", 1)[1].split()
        own = int(fields[11]) + int(fields[12])  # utime + stime, all threads
        return sum(v) - v[3] - v[4], sum(v), own
    except (OSError, ValueError, IndexError):
        return None


def _other_cores(a, b) -> float | None:
    """Average number of CPU cores that *other* processes kept busy between two snapshots."""
    if a is None or b is None or b[1] == a[1]:
        return None
    ncpu = os.cpu_count() or 1
    return round(((b[0] - a[0]) - (b[2] - a[2])) / ((b[1] - a[1]) / ncpu), 3)


def _read_idx(path: Path, np):
    """Read one IDX file (optionally .gz) into a numpy array."""
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as fh:
        raw = fh.read()
    if raw[0] != 0 or raw[1] != 0 or raw[2] != 0x08:  # magic: 0, 0, dtype=uint8, ndim
        raise ValueError(f"{path}: not an unsigned-byte IDX file")
    ndim = raw[3]
    shape = tuple(int.from_bytes(raw[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim))
    arr = np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim)
    if arr.size != int(np.prod(shape)):
        raise ValueError(f"{path}: expected {shape}, got {arr.size} bytes")
    return arr.reshape(shape)


MODELS = {  # --model -> (ByzFL model_name, description for the JSON)
    "fc_mnist": ("fc_mnist", "fc_mnist (784-100-10, ReLU, log-softmax, NLLLoss)"),
    "cnn": ("jbyz_cnn", "cnn (jbyz lenet: conv5x5-32 VALID, ReLU, maxpool2, conv5x5-64 VALID, ReLU, "
                        "maxpool2, fc 1024-10, log-softmax, NLLLoss)"),
}


def _register_cnn(torch, byzfl_models) -> str:
    """Define the CNN as a torch module and register it into ByzFL's models namespace, where
    ``byzfl.fed_framework.model_base_interface`` looks ``model_name`` up (``getattr(models, name)()``).
    Inputs are [B, 1, 28, 28] (the ArrayDataset below yields [1, 28, 28] per sample)."""
    nn, F = torch.nn, torch.nn.functional

    class jbyz_cnn(nn.Module):
        def __init__(self):
            super().__init__()
            self._c1 = nn.Conv2d(1, 32, 5, 1)   # 28 -> 24, pool -> 12
            self._c2 = nn.Conv2d(32, 64, 5, 1)  # 12 -> 8, pool -> 4
            self._f1 = nn.Linear(4 * 4 * 64, 10)

        def forward(self, x):
            x = F.max_pool2d(F.relu(self._c1(x.reshape(-1, 1, 28, 28))), 2, 2)
            x = F.max_pool2d(F.relu(self._c2(x)), 2, 2)
            return F.log_softmax(self._f1(x.flatten(1)), dim=1)

    byzfl_models.jbyz_cnn = jbyz_cnn
    return "jbyz_cnn"


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--aggregator", choices=sorted(AGGREGATORS), default="median")
    ap.add_argument("--model", choices=sorted(MODELS), default="fc_mnist",
                    help="fc_mnist: ByzFL's MLP 784-100-10 (default); cnn: the small CNN (jbyz lenet)")
    ap.add_argument("--attack", choices=["auto", "alie", "none"], default="auto",
                    help="auto: ALIE for robust rules, none for average (default)")
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--seeds", type=int, default=1, help="number of seeds, run one after another")
    ap.add_argument("--seed0", type=int, default=1, help="first seed")
    ap.add_argument("--threads", type=int, default=2, help="torch.set_num_threads (intra-op)")
    ap.add_argument("--n", type=int, default=10, help="workers in all")
    ap.add_argument("--f", type=int, default=3, help="Byzantine workers among them")
    ap.add_argument("--batch", type=int, default=32, help="per honest worker")
    ap.add_argument("--momentum", type=float, default=0.9)
    ap.add_argument("--lr", type=float, default=0.1)
    ap.add_argument("--tau", type=float, default=1.5, help="ALIE factor (ByzFL: mean + tau * std)")
    ap.add_argument("--sampler", choices=["byzfl-iid", "replacement"], default="byzfl-iid",
                    help="byzfl-iid: DataDistributor('iid') shards, shuffled; "
                         "replacement: i.i.d. with replacement from the whole training set")
    ap.add_argument("--data-dir", default="/usr/share/datasets/fashion-mnist")
    ap.add_argument("--eval-batch", type=int, default=1000)
    ap.add_argument("--phases", action="store_true",
                    help="also time each part of the step (sync, batch, grad, momentum, attack, aggregate, update)")
    ap.add_argument("--json", action="store_true", help="print one JSON object only")
    args = ap.parse_args(argv)
    if args.steps < 1 or args.seeds < 1 or not 0 <= args.f < args.n:
        ap.error("need steps >= 1, seeds >= 1, 0 <= f < n")
    return args


def main(argv=None):
    args = parse_args(argv)
    attack = args.attack if args.attack != "auto" else ("none" if args.aggregator == "average" else "alie")
    log = (lambda *a: print(*a, file=sys.stderr, flush=True)) if args.json else print

    # ---- imports (timed) ---------------------------------------------------------------------
    t = time.perf_counter()
    import numpy as np
    t_np = time.perf_counter() - t
    t = time.perf_counter()
    import torch
    t_torch = time.perf_counter() - t
    torch.set_num_threads(args.threads)
    t = time.perf_counter()
    import byzfl  # noqa: F401  (timed on its own: the whole package loads here)
    from byzfl import ByzantineClient, Client, DataDistributor, Server
    from byzfl.utils.misc import set_random_seed
    t_byzfl = time.perf_counter() - t
    model_name, model_desc = MODELS[args.model]
    if args.model == "cnn":
        import byzfl.fed_framework.models as byzfl_models
        model_name = _register_cnn(torch, byzfl_models)
    # torch.optim.Optimizer.__init__ imports torch._dynamo on first use (seconds): count it as an
    # import here rather than as part of the first seed's setup.
    t = time.perf_counter()
    import torch._dynamo  # noqa: F401
    t_dynamo = time.perf_counter() - t
    import torchvision  # already imported by byzfl; only to report which one
    tv = "stand-in" if getattr(torchvision, "IS_STANDIN", False) else torchvision.__version__
    import_s = t_np + t_torch + t_byzfl + t_dynamo
    log(f"imports {import_s:.2f}s (numpy {t_np:.2f}, torch {t_torch:.2f}, byzfl {t_byzfl:.2f}, "
        f"torch._dynamo {t_dynamo:.2f}); "
        f"torch {torch.__version__}, byzfl {md.version('byzfl')}, torchvision {tv}, threads {torch.get_num_threads()}")

    # ---- data (timed): IDX .gz -> float32 in [0, 1] (ToTensor's scaling, no augmentation) -------
    t = time.perf_counter()
    d = Path(args.data_dir)

    def load(split):
        x = _read_idx(d / f"{split}-images-idx3-ubyte.gz", np)
        y = _read_idx(d / f"{split}-labels-idx1-ubyte.gz", np)
        return (torch.from_numpy(x.astype(np.float32) / 255.0).unsqueeze(1),
                torch.from_numpy(y.astype(np.int64)))

    class ArrayDataset(torch.utils.data.Dataset):
        """Tensors in memory, one sample per __getitem__ like a torchvision dataset (minus PIL).
        ``targets`` is what DataDistributor reads."""

        def __init__(self, data, targets):
            self.data, self.targets = data, targets

        def __len__(self):
            return len(self.targets)

        def __getitem__(self, i):
            return self.data[i], self.targets[i]

    train_ds = ArrayDataset(*load("train"))
    test_ds = ArrayDataset(*load("t10k"))
    data_s = time.perf_counter() - t
    log(f"data {data_s:.2f}s: train {tuple(train_ds.data.shape)}, test {tuple(test_ds.data.shape)}")

    n_honest = args.n - args.f
    agg_name, takes_f = AGGREGATORS[args.aggregator]
    agg_info = {"name": agg_name, "parameters": {"f": args.f} if takes_f else {}}
    if attack == "alie":
        attack_cfg = {"name": "ALittleIsEnough", "f": args.f, "parameters": {"tau": float(args.tau)}}
    else:  # the f Byzantine workers send nothing
        attack_cfg = {"name": "NoAttack", "f": 0, "parameters": {}}

    def one_run(seed):
        t0 = time.perf_counter()
        set_random_seed(seed)  # ByzFL's: random, numpy, torch
        if args.sampler == "byzfl-iid":
            loaders = DataDistributor({
                "data_distribution_name": "iid",
                "nb_honest": n_honest,
                "data_loader": torch.utils.data.DataLoader(train_ds),
                "batch_size": args.batch,
            }).split_data()
        else:
            loaders = [torch.utils.data.DataLoader(
                train_ds, batch_size=args.batch,
                sampler=torch.utils.data.RandomSampler(train_ds, replacement=True,
                                                       num_samples=args.batch * args.steps))
                for _ in range(n_honest)]
        clients = [Client({
            "model_name": model_name,
            "device": "cpu",
            "loss_name": "NLLLoss",
            "LabelFlipping": False,
            "training_dataloader": loaders[i],
            "momentum": float(args.momentum),
            "nb_labels": 10,
            "store_per_client_metrics": False,
        }) for i in range(n_honest)]
        server = Server({
            "device": "cpu",
            "model_name": model_name,
            "test_loader": torch.utils.data.DataLoader(test_ds, batch_size=args.eval_batch, shuffle=False),
            "optimizer_name": "SGD",
            "learning_rate": float(args.lr),
            "weight_decay": 0.0,
            "milestones": [],
            "learning_rate_decay": 1.0,
            "aggregator_info": agg_info,
            "pre_agg_list": [],
        })
        byz_client = ByzantineClient(dict(attack_cfg, parameters=dict(attack_cfg["parameters"])))
        setup_s = time.perf_counter() - t0

        phases = None
        if args.phases:  # same calls, with clocks between them; two methods wrapped to time them
            phases = dict.fromkeys(["sync", "batch", "grad", "momentum", "attack", "aggregate", "update"], 0.0)

            def timed(fn, key):
                def wrapper(*a, **k):
                    t = time.perf_counter()
                    try:
                        return fn(*a, **k)
                    finally:
                        phases[key] += time.perf_counter() - t
                return wrapper

            for client in clients:
                client._sample_train_batch = timed(client._sample_train_batch, "batch")
            server.aggregate = timed(server.aggregate, "aggregate")

        step_times = []
        t_loop = time.perf_counter()
        for _ in range(args.steps):
            ts = time.perf_counter()
            server_model = server.get_dict_parameters()
            for client in clients:
                client.set_model_state(server_model)
            t1 = time.perf_counter()
            for client in clients:
                client.compute_gradients()
            t2 = time.perf_counter()
            honest = [client.get_flat_gradients_with_momentum() for client in clients]
            t3 = time.perf_counter()
            byz = byz_client.apply_attack(honest)
            t4 = time.perf_counter()
            server.update_model_with_gradients(honest + byz)
            t5 = time.perf_counter()
            step_times.append(t5 - ts)
            if phases is not None:
                for key, dt in zip(["sync", "grad", "momentum", "attack", "update"],
                                   [t1 - ts, t2 - t1, t3 - t2, t4 - t3, t5 - t4]):
                    phases[key] += dt
        train_s = time.perf_counter() - t_loop
        if phases is not None:  # 'grad' and 'update' exclude the 'batch' and 'aggregate' inside them
            phases["grad"] -= phases["batch"]
            phases["update"] -= phases["aggregate"]
            phases = {k: round(1e3 * v / args.steps, 3) for k, v in phases.items()}

        t = time.perf_counter()
        with torch.no_grad():
            acc = server.compute_test_accuracy()
        eval_s = time.perf_counter() - t
        return dict(seed=seed, setup_s=setup_s, train_s=train_s, eval_s=eval_s,
                    steps_per_s=args.steps / train_s,
                    step_ms_median=1e3 * statistics.median(step_times),
                    step_ms_p10=1e3 * statistics.quantiles(step_times, n=10, method="inclusive")[0] if len(step_times) > 1
                    else 1e3 * step_times[0],
                    step_ms_min=1e3 * min(step_times),
                    final_test_accuracy=acc, n_aggregated=n_honest + len(byz), phases_ms=phases)

    load_before = os.getloadavg()
    cpu_before = _cpu_jiffies()
    runs = []
    t_grid = time.perf_counter()
    for seed in range(args.seed0, args.seed0 + args.seeds):
        r = one_run(seed)
        runs.append(r)
        log(f"seed {seed}: {r['steps_per_s']:.1f} steps/s (median step {r['step_ms_median']:.1f} ms), "
            f"train {r['train_s']:.2f}s, setup {r['setup_s']:.2f}s, eval {r['eval_s']:.2f}s, "
            f"test acc {r['final_test_accuracy']:.4f}")
    seeds_total_s = time.perf_counter() - t_grid
    other_cores = _other_cores(cpu_before, _cpu_jiffies())

    cpu = next((ln.split(":", 1)[1].strip() for ln in open("/proc/cpuinfo") if ln.startswith("model name")),
               platform.processor()) if os.path.exists("/proc/cpuinfo") else platform.processor()
    out = {
        "peer": "byzfl",
        "aggregator": args.aggregator,
        "byzfl_aggregator": agg_info,
        "attack": attack,
        "byzfl_attack": attack_cfg,
        "alie_sign": "+ (ByzFL: mean + tau * std, std with ddof=1)" if attack == "alie" else None,
        "n": args.n, "f": args.f, "n_honest": n_honest, "n_aggregated": runs[0]["n_aggregated"],
        "batch_per_worker": args.batch, "sampler": args.sampler,
        "model": model_desc,
        "byzfl_model_name": model_name,
        "momentum": args.momentum,
        "momentum_form": "ByzFL Client EMA: u = m*u + (1-m)*g, u initialised to 0 (u_1 = (1-m)*g_1)",
        "server_optimizer": f"SGD lr={args.lr}, no weight decay, constant lr",
        "steps": args.steps,
        "seeds": [r["seed"] for r in runs],
        "steps_per_s": statistics.fmean(r["steps_per_s"] for r in runs),
        "steps_per_s_per_seed": [round(r["steps_per_s"], 2) for r in runs],
        "step_ms_median": statistics.median(r["step_ms_median"] for r in runs),
        # Robust to other load on the machine: the fastest tenth of the steps.
        "step_ms_p10": statistics.median(r["step_ms_p10"] for r in runs),
        "step_ms_min": min(r["step_ms_min"] for r in runs),
        "final_test_accuracy": statistics.fmean(r["final_test_accuracy"] for r in runs),
        "final_test_accuracy_per_seed": [r["final_test_accuracy"] for r in runs],
        # --phases: mean ms per step in each part of the loop (first seed); the clocks cost ~µs.
        "phases_ms_per_step": runs[0]["phases_ms"],
        "train_s_per_seed": [round(r["train_s"], 3) for r in runs],
        "setup_s_per_seed": [round(r["setup_s"], 3) for r in runs],
        "eval_s_per_seed": [round(r["eval_s"], 3) for r in runs],
        "seeds_total_s": seeds_total_s,  # K runs one after another: setup + train + eval each
        "seeds_train_total_s": sum(r["train_s"] for r in runs),
        "import_s": import_s,
        "import_s_parts": {"numpy": t_np, "torch": t_torch, "byzfl": t_byzfl, "torch._dynamo": t_dynamo},
        "data_load_s": data_s,
        "end_to_end_s": time.perf_counter() - _T_SCRIPT0,  # script start -> here (imports, data, all seeds)
        "end_to_end_from_process_start_s": _process_age_s(),  # also counts interpreter start-up
        "torch_threads": torch.get_num_threads(),
        "torch_interop_threads": torch.get_num_interop_threads(),
        "versions": {"python": platform.python_version(), "torch": torch.__version__,
                     "byzfl": md.version("byzfl"), "numpy": np.__version__, "torchvision": tv},
        "torch_cuda": torch.version.cuda,
        "cpu": cpu, "os_cpu_count": os.cpu_count(),
        # 1-minute load average before and after the runs: other processes on the 2 cores skew
        # the timing badly (torch's intra-op threads wait for descheduled siblings).
        "loadavg_1min_before_after": [round(load_before[0], 2), round(os.getloadavg()[0], 2)],
        # CPU cores kept busy by *other* processes while the seeds ran (0 = a quiet machine).
        "other_processes_cpu_cores": other_cores,
    }
    if args.json:
        print(json.dumps(out))
    else:
        print(f"{args.model}, {args.aggregator} / {attack}: {out['steps_per_s']:.1f} steps/s, test acc "
              f"{out['final_test_accuracy']:.4f}, {args.seeds} seed(s) in {seeds_total_s:.1f}s, "
              f"end to end {out['end_to_end_s']:.1f}s; other processes kept {other_cores} cores busy")
    return out


if __name__ == "__main__":
    main()
