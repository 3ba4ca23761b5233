"""Writes the distributed-momentum grids. Run it only if you change a grid: `python make_grid.py`.

* ``grid.toml``: the authors' 736-configuration x 5-seed grid (El Mhamdi, Guerraoui, Rouault,
  ICLR 2021, Sec. 4.1; their ``reproduce.py``) in **the authors' setting**: every place where
  their code differs from the paper's text follows the code (the published numbers came from
  it). Output ``results/grid``.
* ``baseline.toml``: the same grid as jbyz first ran it (paper-text Krum and Bulyan, normalised
  Fashion-MNIST without flips, PyTorch-form Nesterov, LeCun initialisation, with-replacement
  sampling). Output ``results/baseline`` (its Fashion-MNIST part is complete).
* ``ablation.toml``: a Fashion-MNIST slice (f = 24 of 51, both learning rates, both attacks,
  every GAR, both momentum positions, seeds 1-3, plus the unattacked references) in the authors'
  setting with ONE deviation switched back per block (``ABLATIONS``), to attribute the
  difference between ``baseline`` and ``grid``. Output ``results/ablation``.
* ``ablation_f12.toml``: the same switches at f = 12 of 51, where the baseline and the authors'
  setting differ most (ALIE at lr 0.5: 53/60 effective pairs against 1/60), restricted to that
  attack and learning rate, without Nesterov, seeds 1-3. Output ``results/ablation_f12``.
"""

from __future__ import annotations

from pathlib import Path

HERE = Path(__file__).resolve().parent
OUT = "experiments/distributed_momentum/results"

DATASETS = {
    "mnist": dict(model="mlp", n=51, f=(24, 12), b=83, mom=0.9, wd=1e-4, clip=2.0, steps=300, ev=5,
                  lrs={0.5: None, 0.02: None}, normalize=True, flip=False),
    "fashion_mnist": dict(model="mlp", n=51, f=(24, 12), b=83, mom=0.9, wd=1e-4, clip=2.0,
                          steps=300, ev=5, lrs={0.5: None, 0.02: None}, normalize=False, flip=True),
    # CIFAR: lr_t = lr0 / (1 + t'/167), t' = t rounded down to a multiple of 1500 (lr0 = 0.01) or
    # 3000 (lr0 = 0.001): 0.01 -> ~0.001 at t = 1500; 0.001 constant over the 3000 steps.
    "cifar10": dict(model="dm_cnn", n=25, f=(11, 5), b=50, mom=0.99, wd=1e-2, clip=5.0, steps=3000,
                    ev=100, lrs={0.01: (167, 1500), 0.001: (167, 3000)}, normalize=True, flip=True),
    "cifar100": dict(model="dm_cnn", n=25, f=(11, 5), b=50, mom=0.99, wd=1e-2, clip=5.0,
                     steps=3000, ev=100, lrs={0.01: (167, 1500), 0.001: (167, 3000)},
                     normalize=True, flip=True),
}
ATTACKS = '[{name = "alie", z = 1.5, sign = "minus"}, {name = "foe", eps = 0.1}]'

# The GARs as the authors' code computes them: its "krum" is Multi-Krum (Euclidean distances,
# n - f - 1 neighbours, average of the n - f - 2 best); its Bulyan ranks once by Multi-Krum score.
KRUM_CODE = '{name = "multi_krum", distance = "euclidean", neighbours = "code"}'
BULYAN_CODE = '{name = "bulyan", variant = "multikrum"}'
CWISE = ['"median"', '"trimmed_mean"', '"phocas"', '"meamed"']


def gars(krum: str, bulyan: str | None) -> str:
    return "[" + ", ".join([krum, *CWISE] + ([bulyan] if bulyan else [])) + "]"


HEADER = '''# El Mhamdi, Guerraoui, Rouault, "Distributed Momentum for Byzantine-resilient Stochastic
# Gradient Descent", ICLR 2021 (Sec. 4.1; the authors' reproduce.py). Written by make_grid.py.
{what}
#
# Per dataset: 2 lr x 2 Nesterov x (5 GARs at f = floor((n-3)/2) + 6 GARs, Bulyan included, at
# f = floor((n-3)/4)) x 2 attacks x 2 momentum positions = 176 attacked configurations, plus
# 2 f x 2 lr x 2 Nesterov = 8 unattacked references (n - f honest workers, plain averaging).
# Momentum: sum form (dampening 0), at the server ("update") or at the workers; honest workers
# clip their gradient (c) before momentum; l2 penalty lambda * ||theta|| (norm, not squared).
# ALIE: mu - 1.5 sigma; FoE: -0.1 mu; all Byzantine workers send the same vector, f_real = f.
# Metric: highest observed test accuracy, evaluated every 5 (MNIST) / 100 (CIFAR) steps.
# diagnostics = true records, step by step, the variance-norm ratios of the honest workers'
# sampled (clipped) gradients and of the vectors they submit (vnr_sampled / vnr_submitted).

[run]
split = "shared"
momentum_form = "sum"
l2_form = "norm"
diagnostics = true
{run_extra}
[sweep]
seed = {seeds}
nesterov = {nesterov}

[execution]
# f = 24 and f = 12 compile separately, so runs with 24 Byzantine workers compute 27 honest
# gradients per step instead of 39 (one shared program would compute n - min f rows).
group_by = ["f_real"]
'''

AUTHORS_WHAT = '''# The authors' setting (their code where it differs from the paper's text):
#   * Krum = their Multi-Krum (Euclidean, n - f - 1 neighbours, mean of the n - f - 2 best);
#     Bulyan = their variant (one Multi-Krum ranking, n - 2f - 2 nested averages, beta = n - 4f - 2);
#   * Nesterov: gradients at the look-ahead point theta - lr mu m (nesterov_form = "lookahead");
#   * PyTorch's default initialisation (model init = "torch");
#   * one shuffled stream of epochs shared by the workers (sampling = "epoch_stream");
#   * Fashion-MNIST pixels in [0, 1], not normalised; random horizontal flips of the training AND
#     test images on Fashion-MNIST and CIFAR (augment, augment_test = "flip");
#   * CIFAR CNN trained with its forward pass in evaluation mode (train_forward = "eval").
#
#   jbyz run experiments/distributed_momentum/grid.toml --only dataset=fashion_mnist --only seed=1
#
# runs one dataset / some seeds; the same command again resumes. MNIST and CIFAR need their data
# files (see `jbyz list datasets`) or tfds.'''

BASELINE_WHAT = '''# jbyz's first run of this grid (kept as the baseline of the ablation; its Fashion-MNIST part is
# complete in results/baseline): the paper's Krum (squared distances, single vector) and the
# classic Bulyan, normalised Fashion-MNIST without flips, PyTorch-form Nesterov (g + mu m at
# theta), LeCun-normal initialisation, with-replacement sampling; flips on CIFAR training images.'''

ABLATION_WHAT = '''# Ablation slice (Fashion-MNIST, f = 24, seeds 1-3, no Nesterov except in the Nesterov block): the
# authors' setting of grid.toml with ONE deviation switched back per [[grid]] block (the block's
# comment names it). The "authors" blocks themselves are runs of grid.toml (same run ids) and are
# read from results/grid by analyze.py; here only the switched-back runs are computed.
#
#   jbyz run experiments/distributed_momentum/ablation.toml'''

# name -> (what is switched back, field overrides of the authors' setting, f = 24 GAR list or None)
ABLATIONS = {
    "normalised": ("Fashion-MNIST normalised (0.2860, 0.3530)", {"dataset_kwargs": "{}"}, None),
    "paper_krum": ("Krum as the paper (single vector, squared distances, n - f - 2)", {},
                   '["krum"]'),
    "pytorch_nesterov": ("Nesterov in PyTorch's form (g + mu m at theta)",
                         {"nesterov": "true", "nesterov_form": '"pytorch"'}, None),
    "lecun_init": ("LeCun-normal initialisation, zero biases", {"model_kwargs": '{init = "lecun"}'},
                   None),
    "replacement": ("independent with-replacement batches", {"sampling": '"replacement"'}, None),
    "no_flip": ("no random flips", {"augment": '"none"', "augment_test": '"none"'}, None),
    "unit_clip": ("the ICLR snapshot's clipping to norm 1", {"clip_form": '"unit"'}, None),
}


def block(comment, fields):
    return [f"\n[[grid]]  # {comment}"] + [f"{k} = {v}" for k, v in fields.items()]


def common_fields(name, d, lr, sched, authors: bool):
    c = {"dataset": f'"{name}"', "model": f'"{d["model"]}"', "batch_size": d["b"],
         "momentum": d["mom"], "weight_decay": d["wd"], "clip_per_worker": d["clip"],
         "steps": d["steps"], "eval_every": d["ev"], "lr": lr}
    mk = {}
    if name == "cifar100":
        mk["hidden"] = "256"
    if authors:
        mk["init"] = '"torch"'
        if not d["normalize"]:
            c["dataset_kwargs"] = "{normalize = false}"
        if d["flip"]:
            c["augment"] = c["augment_test"] = '"flip"'
        c["sampling"] = '"epoch_stream"'
        if d["model"] == "dm_cnn":
            c["train_forward"] = '"eval"'
    elif name.startswith("cifar"):
        c["augment"] = '"flip"'
    if mk:
        c["model_kwargs"] = "{" + ", ".join(f"{k} = {v}" for k, v in mk.items()) + "}"
    if sched:
        c["lr_schedule"] = '"inverse_time"'
        c["lr_schedule_kwargs"] = f"{{decay = {sched[0]}, every = {sched[1]}}}"
    return c


def full_grid(authors: bool) -> str:
    run_extra = 'nesterov_form = "lookahead"\n' if authors else ""
    lines = [HEADER.format(what=AUTHORS_WHAT if authors else BASELINE_WHAT, run_extra=run_extra,
                           seeds="[1, 2, 3, 4, 5]", nesterov="[false, true]")]
    krum = KRUM_CODE if authors else '"krum"'
    bulyan = BULYAN_CODE if authors else '"bulyan"'
    for name, d in DATASETS.items():
        for lr, sched in d["lrs"].items():
            common = common_fields(name, d, lr, sched, authors)
            for f, bul in ((d["f"][0], None), (d["f"][1], bulyan)):
                lines += block(f"{name}, lr {lr}, attacked, f = {f}", {
                    **common, "n_workers": d["n"], "f_real": f, "aggregator": gars(krum, bul),
                    "attack": ATTACKS, "momentum_at": '["server", "worker"]'})
            lines += block(f"{name}, lr {lr}, unattacked references (n - f honest, averaging)", {
                **common, "n_workers": f"[{d['n'] - d['f'][0]}, {d['n'] - d['f'][1]}]", "f_real": 0,
                "aggregator": '"mean"', "attack": '"none"', "momentum_at": '"server"'})
    out = "grid" if authors else "baseline"
    lines.append(f'\n[output]\ndir = "{OUT}/{out}"\n')
    return "\n".join(lines)


def _ablation(what: str, f: int, lrs, attack: str, atk_label: str, gar_list_for, out: str,
              skip: tuple[str, ...] = ()) -> str:
    """One deviation of the authors' Fashion-MNIST setting switched back per block, at ``f``
    Byzantine workers of 51, with the unattacked reference where the setting changes it."""
    name, d = "fashion_mnist", DATASETS["fashion_mnist"]
    lines = [HEADER.format(what=what, run_extra='nesterov_form = "lookahead"\n',
                           seeds="[1, 2, 3]", nesterov="[false]")]
    for key, (desc, over, gar_list) in ABLATIONS.items():
        if key in skip:
            continue
        for lr in lrs:
            common = {**common_fields(name, d, lr, None, True), **over}
            if "dataset_kwargs" in over and over["dataset_kwargs"] == "{}":
                del common["dataset_kwargs"]
            lines += block(f"ablation {key}: {desc}; lr {lr}, {atk_label}, f = {f}", {
                **common, "n_workers": d["n"], "f_real": f, "aggregator": gar_list_for(gar_list),
                "attack": attack, "momentum_at": '["server", "worker"]'})
            if gar_list is None:  # the reference changes with the setting too
                lines += block(f"ablation {key}: reference, lr {lr}", {
                    **common, "n_workers": d["n"] - f, "f_real": 0, "aggregator": '"mean"',
                    "attack": '"none"', "momentum_at": '"server"'})
    lines.append(f'\n[output]\ndir = "{OUT}/{out}"\n')
    return "\n".join(lines)


def ablation_grid() -> str:
    d = DATASETS["fashion_mnist"]
    return _ablation(ABLATION_WHAT, d["f"][0], d["lrs"], ATTACKS, "attacked",
                     lambda gar_list: gar_list or gars(KRUM_CODE, None), "ablation")


ABLATION_F12_WHAT = '''# Ablation at f = 12 of 51 (Fashion-MNIST, ALIE, lr 0.5, no Nesterov, seeds 1-3): where the
# baseline and the authors' setting differ most (the attack costs > 20 points in 23 of 30 baseline
# pairs without Nesterov, in 0 of 30 in the authors' setting). As ablation.toml, ONE deviation of
# the authors' setting switched back per [[grid]] block; the authors' and the baseline's own runs
# are read from results/grid and results/baseline.
#
#   jbyz run experiments/distributed_momentum/ablation_f12.toml'''

F12_LR = 0.5
# left out at f = 12: the Nesterov form (these runs have no Nesterov) and the ICLR snapshot's unit
# clip (not one of the baseline's deviations)
F12_SKIP = ("pytorch_nesterov", "unit_clip")
F12_ATTACK = '{name = "alie", z = 1.5, sign = "minus"}'


def ablation_f12_grid() -> str:
    return _ablation(ABLATION_F12_WHAT, DATASETS["fashion_mnist"]["f"][1], [F12_LR], F12_ATTACK,
                     "ALIE", lambda gar_list: '["krum", "bulyan"]' if gar_list
                     else gars(KRUM_CODE, BULYAN_CODE), "ablation_f12", skip=F12_SKIP)


def main():
    (HERE / "grid.toml").write_text(full_grid(authors=True))
    (HERE / "baseline.toml").write_text(full_grid(authors=False))
    (HERE / "ablation.toml").write_text(ablation_grid())
    (HERE / "ablation_f12.toml").write_text(ablation_f12_grid())


if __name__ == "__main__":
    main()
