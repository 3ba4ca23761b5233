"""Writes grid.toml: the paper's 736-configuration grid (spec §4(b)), one [[grid]] block per
dataset x f x learning-rate schedule. Run it only if you change the grid: `python make_grid.py`."""

DATASETS = {
    "mnist": dict(model="mlp", n=51, f=(24, 12), b=83, mom=0.9, wd=1e-4, clip=2.0, steps=300, ev=5,
                  lrs={0.5: None, 0.02: None}),
    "fashion_mnist": dict(model="mlp", n=51, f=(24, 12), b=83, mom=0.9, wd=1e-4, clip=2.0, steps=300,
                          ev=5, lrs={0.5: None, 0.02: None}, aug=None),
    # CIFAR: lr_t = lr0 / (1 + t'/167), t' = t rounded down to a multiple of 1500 (lr0 = 0.01) or
    # 3000 (lr0 = 0.001): 0.01 -> ~0.001 at t = 1500; 0.001 constant over the 3000 steps.
    "cifar10": dict(model="dm_cnn", n=25, f=(11, 5), b=50, mom=0.99, wd=1e-2, clip=5.0, steps=3000,
                    ev=100, lrs={0.01: (167, 1500), 0.001: (167, 3000)}, aug="flip"),
    "cifar100": dict(model="dm_cnn", n=25, f=(11, 5), b=50, mom=0.99, wd=1e-2, clip=5.0, steps=3000,
                     ev=100, lrs={0.01: (167, 1500), 0.001: (167, 3000)}, aug="flip"),
}
# Augmentation: the authors' code flips Fashion-MNIST and CIFAR images left-right at random. Our
# Fashion-MNIST runs predate jbyz's `augment` option and were computed without it (a documented
# deviation, README.md); set DATASETS["fashion_mnist"]["aug"] = "flip" for the paper's setting
# (new run ids: nothing already computed is reused).
GARS_LARGE_F = ["krum", "median", "trimmed_mean", "phocas", "meamed"]
GARS_SMALL_F = GARS_LARGE_F + ["bulyan"]
ATTACKS = '[{name = "alie", z = 1.5, sign = "minus"}, {name = "foe", eps = 0.1}]'

HEADER = '''# El Mhamdi, Guerraoui, Rouault, "Distributed Momentum for Byzantine-resilient Stochastic
# Gradient Descent", ICLR 2021: the whole 736-configuration x 5-seed grid (3,680 runs).
# Spec: shared/spec/algorithms.md §4 (from the authors' reproduce.py). Written by make_grid.py.
#
#   jbyz run experiments/distributed_momentum/grid.toml --only dataset=fashion_mnist --only seed=1
#
# runs one dataset / some seeds; the same command again resumes. MNIST and CIFAR need their data
# files (see `jbyz list datasets`) or tfds.
#
# Per dataset: 2 lr x 2 Nesterov x (5 GARs at f = floor((n-3)/2) + 6 GARs, Bulyan included, at
# f = floor((n-3)/4)) x 2 attacks x 2 momentum positions = 176 attacked configurations, plus
# 2 f x 2 lr x 2 Nesterov = 8 unattacked references (n - f honest workers, plain averaging).
# Momentum: sum form (dampening 0), at the server ("update") or at the workers; honest workers
# clip their gradient (c) before momentum; l2 penalty lambda * ||theta|| (norm, not squared).
# ALIE: mu - 1.5 sigma; FoE: -0.1 mu; all Byzantine workers send the same vector, f_real = f.
# Metric: highest observed test accuracy, evaluated every 5 (MNIST) / 100 (CIFAR) steps.
# Augmentation: random horizontal flip for CIFAR (the authors' code); their code flips
# Fashion-MNIST too, our Fashion-MNIST blocks do not (computed before jbyz had `augment`; README).

[run]
split = "shared"
momentum_form = "sum"
l2_form = "norm"
diagnostics = true

[sweep]
seed = [1, 2, 3, 4, 5]
nesterov = [false, true]

[execution]
# f = 24 and f = 12 compile separately, so runs with 24 Byzantine workers compute 27 honest
# gradients per step instead of 39 (one shared program would compute n - min f rows).
group_by = ["f_real"]
'''


def block(comment, fields):
    return [f"\n[[grid]]  # {comment}"] + [f"{k} = {v}" for k, v in fields.items()]


def main():
    lines = [HEADER]
    for name, d in DATASETS.items():
        for lr, sched in d["lrs"].items():
            common = {"dataset": f'"{name}"', "model": f'"{d["model"]}"', "batch_size": d["b"],
                      "momentum": d["mom"], "weight_decay": d["wd"], "clip_per_worker": d["clip"],
                      "steps": d["steps"], "eval_every": d["ev"], "lr": lr}
            if d.get("aug"):
                common["augment"] = f'"{d["aug"]}"'
            if name == "cifar100":
                common["model_kwargs"] = "{hidden = 256}"
            if sched:
                common["lr_schedule"] = '"inverse_time"'
                common["lr_schedule_kwargs"] = f"{{decay = {sched[0]}, every = {sched[1]}}}"
            for f, gars in ((d["f"][0], GARS_LARGE_F), (d["f"][1], GARS_SMALL_F)):
                lines += block(f"{name}, lr {lr}, attacked, f = {f}", {
                    **common, "n_workers": d["n"], "f_real": f,
                    "aggregator": "[" + ", ".join(f'"{g}"' for g in gars) + "]",
                    "attack": ATTACKS, "momentum_at": '["server", "worker"]'})
            lines += block(f"{name}, lr {lr}, unattacked references (n - f honest, averaging)", {
                **common, "n_workers": f"[{d['n'] - d['f'][0]}, {d['n'] - d['f'][1]}]", "f_real": 0,
                "aggregator": '"mean"', "attack": '"none"', "momentum_at": '"server"'})
    lines.append('\n[output]\ndir = "experiments/distributed_momentum/results/grid"\n')
    open("grid.toml", "w").write("\n".join(lines))


if __name__ == "__main__":
    main()
