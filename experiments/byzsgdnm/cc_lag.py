"""Why centered clipping (tau = 0.1) loses at large batches in scaled.toml: its aggregate lags.

    nice -n 5 python experiments/byzsgdnm/cc_lag.py        # 4 runs, ~2 CPU-minutes

ByzSGDnm, no attack, lr0 0.1, B in {128, 8} (128 / 2048 steps of the same compute), CC radius
tau in {0.1 (the paper's), 1.0}. Prints, per evaluation, the test accuracy, the cosine between the
aggregate and the honest mean and their distance (the run's diagnostics, means over the chunk).
CC moves its centre by at most tau per step from the previous aggregate (starting at 0), so when
the honest momenta are much longer than tau the aggregate trails them for many steps.
"""

from jbyz import simulate
from jbyz.config import from_dict

for B, ev in ((128, 16), (8, 256)):
    for tau in (0.1, 1.0):
        cfg = from_dict(dict(dataset="fashion_mnist", model="mlp", split="iid", n_workers=8, f_real=0,
                             batch_size=B, compute_budget=131072, eval_every=ev, lr=0.1, momentum=0.9,
                             normalize=True, lr_schedule="cosine", attack="none", diagnostics=True,
                             aggregator={"name": "centered_clip", "tau": tau}))
        r = simulate.run(cfg, progress=False)
        print(f"B={B} tau={tau} final acc {r.final_accuracy:.4f}")
        for h in r.history[1:]:
            print(f"  step {h['step']:5d} acc {h['test_accuracy']:.3f} cos(agg, honest mean) "
                  f"{h['agg_cosine']:.3f} |agg - mean| {h['agg_distance']:.3f}")
