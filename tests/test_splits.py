"""Worker splits beyond iid / Dirichlet, the split seed and the held-out validation set.

* ``gamma_similarity`` against a literal numpy transcription of ByzFL's ``gamma_niid_idx``
  (LPD-EPFL/byzfl at 69bd1ac, ``byzfl/fed_framework/data_distributor.py``), fed the same
  permutation; ``shards`` against the shards of Blades' ``ShardPartitioner`` (fedlib at 3f95f0a,
  ``fedlib/datasets/partitioners/shard_partitioner.py``).
* ``split_seed``: changes the split and nothing else; ``seed`` with a fixed ``split_seed``
  changes everything but the split.
* ``validation_size``: held-out samples disjoint from the workers' and the server's, evaluated
  beside the test set by ``jbyz.run`` and by ``jbyz.grid.run_grid``.
"""

from __future__ import annotations

import jax
import numpy as np
import pytest
from jax.flatten_util import ravel_pytree

import jbyz
from jbyz import data as D
from jbyz import grid, simulate
from jbyz.config import RunConfig
from jbyz.registry import ConfigError
from jbyz.validation import validate


def _labels(n, classes=10, seed=0):
    return np.random.default_rng(seed).integers(0, classes, size=n).astype(np.int32)


def _workers(split):
    return [split.worker(i) for i in range(split.n_workers)]


def _is_partition(split, n):
    allidx = np.concatenate(_workers(split))
    return split.sizes.min() >= 1 and np.array_equal(np.sort(allidx), np.arange(n))


# ----------------------------------------------------------------------- gamma similarity
def _byzfl_gamma_niid(targets, idx, nb_honest, gamma, shuffle):
    """ByzFL's ``DataDistributor.gamma_niid_idx`` transcribed line by line (numpy in place of
    torch; ``shuffle`` stands for its ``random.shuffle`` of the iid part)."""
    def iid_idx(idx):
        idx = list(idx)
        shuffle(idx)
        return np.array_split(idx, nb_honest)

    def extreme_niid_idx(targets, idx):
        if len(idx) == 0:
            return list([[]] * nb_honest)
        sorted_idx = np.array(sorted(zip(targets[idx], idx)))[:, 1]
        return np.array_split(sorted_idx, nb_honest)

    nb_similarity = int(len(idx) * gamma)
    iid = iid_idx(idx[:nb_similarity])
    niid = extreme_niid_idx(targets, idx[nb_similarity:])
    split_idx = [np.concatenate((iid[i], niid[i])) for i in range(nb_honest)]
    return [node_idx.astype(int) for node_idx in split_idx]


@pytest.mark.parametrize("gamma", [0.0, 0.1, 0.37, 0.5, 0.9, 1.0])
@pytest.mark.parametrize("n, workers", [(500, 7), (103, 10)])
def test_gamma_similarity_is_byzfl_on_a_shuffled_training_set(gamma, n, workers):
    y = _labels(n, seed=n)
    seed = 11
    s = D.split_workers(y, workers, "gamma_similarity", gamma=gamma, seed=seed)
    assert _is_partition(s, n)
    # ByzFL's benchmark hands the distributor a random_split subset: its indices are a random
    # permutation. The same permutation, the iid part's reshuffle left out (it is already random).
    perm = np.random.default_rng(seed).permutation(n)
    ref = _byzfl_gamma_niid(y, perm, workers, gamma, shuffle=lambda a: None)
    for mine, theirs in zip(_workers(s), ref):
        np.testing.assert_array_equal(mine, np.sort(theirs))


def test_gamma_one_is_iid_and_zero_is_extreme():
    y = _labels(300)
    for seed in (0, 5):
        one = D.split_workers(y, 8, "gamma_similarity", gamma=1.0, seed=seed)
        iid = D.split_workers(y, 8, "iid", seed=seed)
        np.testing.assert_array_equal(one.indices, iid.indices)
        np.testing.assert_array_equal(one.sizes, iid.sizes)
        zero = D.split_workers(y, 8, "gamma_similarity", gamma=0.0, seed=seed)
        ext = D.split_workers(y, 8, "extreme")
        for a, b in zip(_workers(zero), _workers(ext)):
            np.testing.assert_array_equal(a, np.sort(b))


def test_gamma_interpolates_label_skew():
    y = _labels(2000)

    def mean_max_share(g):
        s = D.split_workers(y, 10, "gamma_similarity", gamma=g, seed=0)
        return np.mean([np.bincount(y[w], minlength=10).max() / len(w) for w in _workers(s)])

    shares = [mean_max_share(g) for g in (0.0, 0.5, 1.0)]
    assert shares[0] > 0.8 and shares[0] > shares[1] > shares[2] and shares[2] < 0.2
    # the iid part of a worker is a random floor(gamma N) / n of the samples
    s = D.split_workers(y, 10, "gamma_similarity", gamma=0.5, seed=0)
    assert s.sizes.max() - s.sizes.min() <= 2


# ------------------------------------------------------------------------------- shards
def _fedlib_shards(targets, num_shards):
    """Blades' ``ShardPartitioner.split_dataset`` up to the shuffle: label-sorted indices (a
    stable sort: fedlib's default argsort leaves ties unspecified) cut into ``num_shards``
    contiguous shards, the first ``N mod num_shards`` one longer."""
    indices = np.argsort(targets, kind="stable")
    base, extra = divmod(len(indices), num_shards)
    shards, start = [], 0
    for i in range(num_shards):
        end = start + base + (1 if i < extra else 0)
        shards.append(indices[start:end])
        start = end
    return shards


def _fedlib_deal(shards, order, num_clients):
    """fedlib's dealing: each shard (in shuffled order) to the client with the fewest samples."""
    clients = [[] for _ in range(num_clients)]
    counts = [0] * num_clients
    for j in order:
        c = int(np.argmin([len(x) for x in clients]))
        clients[c].extend(shards[j])
        counts[c] += 1
    return clients, counts


@pytest.mark.parametrize("n, workers, k", [(600, 10, 2), (997, 7, 3), (50, 5, 1), (64, 4, 16)])
def test_shards_are_fedlibs_shards_k_per_worker(n, workers, k):
    y = _labels(n, seed=k)
    s = D.split_workers(y, workers, "shards", shards_per_worker=k, seed=4)
    assert _is_partition(s, n)  # every sample exactly once
    shards = _fedlib_shards(y, k * workers)
    shard_of = np.empty(n, int)
    for j, sh in enumerate(shards):
        shard_of[sh] = j
    used = []
    for w in _workers(s):
        ids = np.unique(shard_of[w])
        assert len(ids) == k  # exactly k whole shards
        assert sum(len(shards[j]) for j in ids) == len(w)
        used += list(ids)
    assert sorted(used) == list(range(k * workers))
    # fedlib's least-loaded dealing also gives k shards each when every shard has >= k samples
    if n // (k * workers) >= k:
        _, counts = _fedlib_deal(shards, np.random.default_rng(0).permutation(k * workers), workers)
        assert counts == [k] * workers


def test_shards_label_counts_and_seed():
    # balanced classes whose size is a multiple of the shard size: no shard straddles a class
    y = np.random.default_rng(1).permutation(np.repeat(np.arange(10), 60)).astype(np.int32)
    for k in (1, 2, 3):
        s = D.split_workers(y, 10, "shards", shards_per_worker=k, seed=0)
        assert all(len(np.unique(y[w])) <= k for w in _workers(s))
    # in general a shard spans at most two classes here (shards shorter than a class)
    s = D.split_workers(_labels(1000), 25, "shards", shards_per_worker=2, seed=0)
    assert all(len(np.unique(_labels(1000)[w])) <= 4 for w in _workers(s))
    a = D.split_workers(y, 10, "shards", seed=3)
    np.testing.assert_array_equal(a.indices, D.split_workers(y, 10, "shards", seed=3).indices)
    assert not np.array_equal(a.indices, D.split_workers(y, 10, "shards", seed=4).indices)


def test_new_split_errors():
    y = _labels(20)
    with pytest.raises(ConfigError, match=r"4 shards per worker x 6 workers = 24 shards, more than "
                                          r"the 20 samples; use shards_per_worker <= 3"):
        D.split_workers(y, 6, "shards", shards_per_worker=4)
    with pytest.raises(ConfigError, match=r"shards_per_worker >= 1 \(an integer\), got 0"):
        D.split_workers(y, 6, "shards", shards_per_worker=0)
    with pytest.raises(ConfigError, match=r"needs 0 <= gamma <= 1, got 1.5"):
        D.split_workers(y, 3, "gamma_similarity", gamma=1.5)
    # 15 samples over 10 workers with gamma = 0.5: 7 iid + 8 sorted leave workers 8, 9 empty
    with pytest.raises(ConfigError, match=r"leaves worker\(s\) \[8, 9\] without samples; use "
                                          r"n_workers <= 7 or gamma in \{0, 1\}"):
        D.split_workers(_labels(15), 10, "gamma_similarity", gamma=0.5)
    with pytest.raises(ConfigError, match="valid: shared, iid, dirichlet, extreme, "
                                          "gamma_similarity, shards"):
        D.split_workers(y, 3, "shard")
    with pytest.raises(ConfigError, match=r"validation_size=20 must be an integer >= 0 and below "
                                          r"the 20 training samples"):
        D.split_training_set(y, 3, validation_size=20)


# ------------------------------------------------------------------------ configuration
def test_config_messages_for_the_new_fields():
    def errs(**kw):
        return "\n".join(validate(RunConfig(**kw)))

    assert ("gamma must be in [0, 1] (the fraction of the samples dealt iid by "
            "split='gamma_similarity'), got 1.5") in errs(split="gamma_similarity", gamma=1.5)
    assert errs(split="iid", gamma=1.5) == ""  # only read by gamma_similarity
    assert ("shards_per_worker must be an integer >= 1 (e.g. 2, McMahan et al.'s pathological "
            "split), got 0") in errs(split="shards", shards_per_worker=0)
    assert "split_seed must be an integer >= 0 or omitted (then the split follows seed), got -1" \
        in errs(split_seed=-1)
    assert ("validation_size must be an integer >= 0 (training samples held out for val_loss / "
            "val_accuracy), got 2.5") in errs(validation_size=2.5)
    assert ("validation_size with sampling='epoch_stream' is not supported (the stream runs over "
            "the whole training set); use sampling='replacement'") in errs(
                validation_size=10, sampling="epoch_stream")
    assert ("split='gamma_similarty' is not valid (did you mean 'gamma_similarity'?); choose one "
            "of shared, iid, dirichlet, extreme, gamma_similarity, shards") in errs(
                split="gamma_similarty")
    assert errs(split="gamma_similarity", gamma=0, split_seed=3, validation_size=100) == ""
    assert errs(split="shards", shards_per_worker=5) == ""


def test_run_ids_unchanged_at_the_new_fields_defaults():
    # ids computed before the fields existed (and by jbyz at HEAD before this change)
    assert RunConfig().config_hash() == "b67e3f940a67cae4"
    assert RunConfig(split="dirichlet", dirichlet_alpha=0.1,
                     seed=3).config_hash() == "6076415248f4bc62"
    assert RunConfig(split="iid", server_validation=100,
                     aggregator="dstar").config_hash() == "99853f1fb4b26d7b"
    base = RunConfig()
    ids = {base.config_hash()} | {base.replace(**kw).config_hash() for kw in (
        dict(gamma=0.3), dict(shards_per_worker=3), dict(split_seed=0), dict(validation_size=5))}
    assert len(ids) == 5  # away from the default each field enters the id
    assert RunConfig(seed=4).data_seed == 4 and RunConfig(seed=4, split_seed=1).data_seed == 1


def test_split_fields_share_one_program():
    from jbyz.simulate import static_key

    base = RunConfig(split="gamma_similarity")
    keys = {static_key(base.replace(**kw)) for kw in (
        {}, dict(gamma=0.1), dict(split_seed=3), dict(seed=2, split_seed=7))}
    assert len(keys) == 1
    sh = RunConfig(split="shards")
    assert static_key(sh) == static_key(sh.replace(shards_per_worker=4))
    assert static_key(base) != static_key(base.replace(validation_size=10))  # a shape


# --------------------------------------------------------------- split seed, hold-out
SMALL = RunConfig(dataset="digits", model="mlp", n_workers=5, f_real=1, batch_size=16, steps=4,
                  eval_every=2, aggregator="mean", attack="none", diagnostics=False, split="iid")


def _inputs(cfg):
    return simulate.get_program(cfg).inputs(cfg)


def test_split_seed_changes_the_split_only():
    a = _inputs(SMALL.replace(seed=0, split_seed=5))
    b = _inputs(SMALL.replace(seed=0, split_seed=6))
    c = _inputs(SMALL.replace(seed=1, split_seed=5))
    assert not np.array_equal(a.indices, b.indices)  # another split ...
    np.testing.assert_array_equal(a.params0, b.params0)  # ... the same initialisation
    assert a.dyn == b.dyn  # ... and the same training keys (dyn.seed) and values
    np.testing.assert_array_equal(a.indices, c.indices)  # seed alone keeps the split ...
    assert not np.array_equal(a.params0, c.params0) and a.dyn.seed != c.dyn.seed  # ... not init
    # unset, the split follows seed exactly as before the field existed
    d, e = _inputs(SMALL.replace(seed=5)), _inputs(SMALL.replace(seed=5, split_seed=5))
    np.testing.assert_array_equal(d.indices, e.indices)
    ds = simulate.load_data(SMALL)
    np.testing.assert_array_equal(d.indices, D.split_workers(ds.y_train, 5, "iid", seed=5).indices)
    assert d.val_indices == ()


@pytest.mark.parametrize("split", ["iid", "shared", "shards", "gamma_similarity", "dirichlet"])
def test_validation_is_disjoint_from_workers_and_server(split):
    cfg = SMALL.replace(split=split, validation_size=150, server_validation=100, aggregator="mean",
                        split_seed=2)
    prog = simulate.get_program(cfg)
    inp = prog.inputs(cfg)
    n = len(prog.dataset.y_train)
    pool = np.arange(n - 100)  # the last 100 are the server's
    val = np.asarray(inp.val_indices)
    assert val.dtype == np.int32 and len(np.unique(val)) == 150 and set(val) <= set(pool)
    workers = [inp.indices[i, :inp.sizes[i]] for i in range(cfg.n_workers)]
    seen = np.concatenate(workers)
    assert not set(seen) & set(val)
    if split == "shared":
        assert all(np.array_equal(w, np.setdiff1d(pool, val)) for w in workers)
    else:
        np.testing.assert_array_equal(np.sort(seen), np.setdiff1d(pool, val))  # each once
    # the hold-out follows the split seed, not the training seed
    other = prog.inputs(cfg.replace(seed=9))
    np.testing.assert_array_equal(other.val_indices, val)
    assert not np.array_equal(prog.inputs(cfg.replace(split_seed=3)).val_indices, val)
    assert prog.split_width(cfg) == inp.indices.shape[1]


def test_epoch_length_counts_the_workers_samples():
    cfg = SMALL.replace(lr_schedule="cosine", lr_schedule_kwargs={"every": "epoch"}, steps=200)
    held = cfg.replace(validation_size=717)  # 1437 digits: 720 left
    lr = lambda c, t: float(simulate.get_program(c).lr_schedule(0.1)(t))
    # epochs of 1437 / (5 x 16) = 17.96 steps, and of 720 / 80 = 9 steps
    assert lr(cfg, 17) == lr(cfg, 0) and lr(held, 8) == lr(held, 0) != lr(held, 9)


def _val_by_hand(result, prog, inp):
    flat, _ = ravel_pytree(result.params)
    x, y = prog.train
    vi = np.asarray(inp.val_indices)
    m = simulate.evaluate_flat(prog.model, prog.unravel, "classification", flat,
                               prog.model.state, x[vi], y[vi])
    return float(m["test_accuracy"]), float(m["test_loss"])


@pytest.mark.slow  # ~50 s on one core: three compilations (two runs, one grid)
def test_val_columns_from_run_and_run_grid(tmp_path):
    cfg = SMALL.replace(split="shards", validation_size=200, split_seed=1)
    res = jbyz.run(cfg, progress=False)
    assert all({"val_accuracy", "val_loss", "test_accuracy"} <= set(h) for h in res.history)
    prog = simulate.get_program(cfg)
    acc, loss = _val_by_hand(res, prog, prog.inputs(cfg))
    assert res.history[-1]["val_accuracy"] == pytest.approx(acc, abs=1e-6)
    assert res.history[-1]["val_loss"] == pytest.approx(loss, rel=1e-5)
    assert "val_accuracy" not in jbyz.run(SMALL.replace(steps=2), progress=False).history[-1]

    # a vmapped grid: split seeds, seeds and shards_per_worker vary inside one program
    cfgs = [cfg, cfg.replace(split_seed=2), cfg.replace(seed=3, shards_per_worker=3)]
    assert len(grid.plan(cfgs, grid.GridOptions(vmap_width=3)).groups) == 1
    table = grid.run_grid(cfgs, tmp_path, grid.GridOptions(vmap_width=3), progress=False, log=None)
    assert len(table) == 3 * 3 and table[["val_accuracy", "val_loss"]].notna().all().all()
    mine = table[table["run_id"] == cfg.config_hash()].sort_values("step")
    alone = res.to_frame()
    for col in ("val_accuracy", "val_loss", "test_accuracy", "test_loss"):
        np.testing.assert_allclose(mine[col].to_numpy(), alone[col].to_numpy(), rtol=1e-5,
                                   atol=1e-6)
    finals = table[table["step"] == 4].set_index("run_id")["val_loss"]
    assert finals.nunique() == 3  # three hold-outs or models, three values
