"""Grids of runs as a few compiled programs: grouping, vmap / ``lax.map``, sharding, resume.

A grid is a list of :class:`~jbyz.config.RunConfig` (usually from a configuration file's
``[sweep]`` product and ``[[grid]]`` blocks). :func:`plan` validates every point (all problems
reported at once), then groups the points by their static part
(:func:`jbyz.simulate.static_key`): one group = one compiled program, whatever its seeds,
learning rates, momenta, weight decays, real or declared ``f``, clipping radii and numbers of
workers (padded to the group's largest ``n``; padding slots are invalid rows every kernel
ignores). Each group is cut into *batches* of ``runs_per_call`` runs with a fixed composition;
a batch runs all its steps as one vmapped program (``jax.lax.map`` over runs with
``vmap_width`` runs per vectorised slice, chosen to fit a memory budget), sharded over a device
mesh with one ``"runs"`` axis by :func:`jax.shard_map`, and its results are written atomically
as one Parquet part file the moment it finishes.

Resume: :func:`run_grid` skips every run that has rows in a part file and batches the rest
anew, so a killed grid continues where it stopped, and a grid resumes after a subset of it ran
(``jbyz run --only ...``) or the batch size or device count changed. The final table equals an
uninterrupted run (a run's result does not depend on the runs batched with it). Part files
carry the jbyz / jax versions and the device kind;
parts from another jbyz version are refused rather than mixed.

Multi-process: after ``jax.distributed.initialize(...)`` on every host, the same call builds
one global mesh over every process's devices; every process computes its shards, results are
gathered to process 0, which alone writes (see the README's cluster section).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import time
from pathlib import Path
from typing import Iterable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jbyz import attacks
from jbyz import results as results_mod
from jbyz.config import GridOptions, RunConfig
from jbyz.registry import ConfigError
from jbyz.validation import validate

PARTS = "parts"


@dataclasses.dataclass
class Batch:
    """Runs executed together (fixed composition); its results are one part file."""

    group: int
    configs: list[RunConfig]

    @property
    def run_ids(self) -> list[str]:
        return [c.config_hash() for c in self.configs]

    @property
    def batch_id(self) -> str:
        return hashlib.sha256("|".join(self.run_ids).encode()).hexdigest()[:16]

    @property
    def steps(self) -> int:
        return sum(c.steps for c in self.configs)


@dataclasses.dataclass
class Group:
    """Runs that share one compiled program."""

    key: str
    configs: list[RunConfig]
    n_max: int
    grad_rows: int


@dataclasses.dataclass
class Plan:
    """A validated, grouped and batched grid."""

    groups: list[Group]
    batches: list[Batch]
    invalid: list[tuple[RunConfig, list[str]]]
    options: GridOptions

    @property
    def configs(self) -> list[RunConfig]:
        return [c for g in self.groups for c in g.configs]

    def describe(self) -> str:
        lines = [f"{len(self.configs)} runs in {len(self.groups)} compiled group(s), "
                 f"{len(self.batches)} batch(es); {len(self.invalid)} invalid point(s)"]
        for i, g in enumerate(self.groups):
            c = g.configs[0]
            nb = sum(1 for b in self.batches if b.group == i)
            lines.append(f"  group {i}: {len(g.configs)} runs, {nb} batch(es), n_max={g.n_max}, "
                         f"{c.model}/{c.aggregator}/{c.attack}, {c.steps} steps")
        return "\n".join(lines)


def _dedupe(configs: Iterable[RunConfig]) -> list[RunConfig]:
    seen, out = set(), []
    for c in configs:
        h = c.config_hash()
        if h not in seen:
            seen.add(h)
            out.append(c)
    return out


def plan(configs: Sequence[RunConfig], options: GridOptions | None = None,
         n_devices: int | None = None) -> Plan:
    """Validates, groups and batches a grid. Raises :class:`ConfigError` listing every invalid
    point when ``options.invalid == "error"``."""
    from jbyz.simulate import computes_byzantine_gradients, static_key

    options = options or GridOptions()
    configs = _dedupe(configs)
    invalid, valid = [], []
    for c in configs:
        errs = validate(c)
        (invalid.append((c, errs)) if errs else valid.append(c))
    if invalid and options.invalid == "error":
        lines = [f"{len(invalid)} of {len(configs)} grid point(s) are invalid "
                 "(set [execution] invalid = \"skip\" or --skip-invalid to run the others):"]
        for c, errs in invalid[:50]:
            lines.append(f"  - {_describe(c)}: " + "; ".join(errs))
        if len(invalid) > 50:
            lines.append(f"  ... and {len(invalid) - 50} more")
        raise ConfigError("\n".join(lines))
    by_key: dict[str, list[RunConfig]] = {}
    for c in valid:
        key = static_key(c, pad_workers=options.pad_workers)
        if options.group_by:
            key += json.dumps([getattr(c, k) for k in options.group_by], default=str)
        by_key.setdefault(key, []).append(c)
    ndev = n_devices or _device_count(options)
    groups, batches = [], []
    for key, cs in by_key.items():
        n_max = max(c.n_workers for c in cs)
        if computes_byzantine_gradients(cs[0]) or cs[0].attack == "none":
            grad_rows = n_max
        else:
            grad_rows = n_max - min(c.f_real for c in cs)
        gi = len(groups)
        groups.append(Group(key, cs, n_max, grad_rows))
        per = options.runs_per_call or min(len(cs), 64 * ndev)
        for s in range(0, len(cs), per):
            batches.append(Batch(gi, cs[s:s + per]))
    return Plan(groups, batches, invalid, options)


def _describe(c: RunConfig) -> str:
    return (f"{c.aggregator}/{c.attack} n={c.n_workers} f_real={c.f_real} f={c.f_declared} "
            f"lr={c.lr} seed={c.seed}")


def _device_count(options: GridOptions) -> int:
    return options.devices or jax.device_count()


# ----------------------------------------------------------------------------- execution


def _mesh(ndev: int):
    devs = jax.devices()[:ndev]
    return jax.sharding.Mesh(np.array(devs), ("runs",))


def _stack(trees):
    return jax.tree.map(lambda *xs: np.stack([np.asarray(x) for x in xs]), *trees)


def _to_host(x):
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        return np.asarray(multihost_utils.process_allgather(x, tiled=True))
    return np.asarray(x)


def _memory_budget(options: GridOptions) -> float:
    if options.memory_budget_gb:
        return options.memory_budget_gb * 2**30
    dev = jax.devices()[0]
    if dev.platform != "cpu":
        stats = getattr(dev, "memory_stats", lambda: None)() or {}
        if "bytes_limit" in stats:
            return 0.6 * stats["bytes_limit"]
    try:
        return 0.4 * os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return 4 * 2**30


class BatchRunner:
    """Compiles and runs one batch of a group: init, chunks of ``eval_every`` steps, evaluation."""

    def __init__(self, program, n_runs: int, options: GridOptions, ndev: int, log=None):
        self.prog = program
        self.ndev = ndev
        self.mesh = _mesh(ndev) if ndev > 1 or jax.process_count() > 1 else None
        self.r_pad = -(-n_runs // ndev) * ndev
        self.local = self.r_pad // ndev
        self.width = options.vmap_width
        self.options = options
        self.log = log or (lambda msg: None)
        self._chunks: dict = {}
        self._init = None
        self._eval = None

    # -- wrappers: per-shard function -> sharded jitted function
    def _shard(self, fn, in_specs, out_specs):
        if self.mesh is None:
            return fn
        from jax.sharding import PartitionSpec as P

        conv = lambda s: P("runs") if s else P()
        return jax.shard_map(fn, mesh=self.mesh, in_specs=tuple(conv(s) for s in in_specs),
                             out_specs=jax.tree.map(conv, out_specs), check_vma=False)

    def _mapped(self, fn, width):
        """``fn`` over the leading runs axis: vmap in slices of ``width`` (``lax.map``)."""
        def over(xs):
            n = jax.tree.leaves(xs)[0].shape[0]
            if width == 1 or n == 1:
                # A plain scan, not a vmap of size 1: under vmap a data-dependent lax.switch or
                # lax.cond (SMEA's and MDA's subset size, ...) becomes a select that runs every
                # branch; lax.map(batch_size=1) would vmap each run.
                return jax.lax.map(fn, xs)
            if width >= n:
                return jax.vmap(fn)(xs)
            return jax.lax.map(fn, xs, batch_size=width)
        return over

    def init_fn(self):
        if self._init is None:
            f = lambda inp: self._mapped(self.prog.init, self.local)(inp)
            self._init = jax.jit(self._shard(f, (True,), True))
        return self._init

    def eval_fn(self):
        if self._eval is None:
            prog = self.prog

            def f(carry, val_indices, train, test):
                one = lambda cv: prog.evaluate_run(cv[0], train, test, cv[1])
                return self._mapped(one, self.local)((carry, val_indices))

            self._eval = jax.jit(self._shard(f, (True, True, False, False), True))
        return self._eval

    def chunk_fn(self, length: int, args):
        """The compiled chunk of ``length`` steps; picks ``vmap_width`` on first use."""
        if length in self._chunks:
            return self._chunks[length]
        prog = self.prog

        def build(width):
            def f(carry, t0, inp, train):
                one = lambda ci: prog.chunk(ci[0], t0, length, ci[1], train)
                return self._mapped(one, width)((carry, inp))

            g = jax.jit(self._shard(f, (True, False, True, False), (True, True)), donate_argnums=(0,))
            return g.lower(*args).compile()

        # Default: on CPU one run at a time inside the program (lax.map): measured 1.37x faster
        # in wall time than vmapping 64 runs (benchmarks/README.md); elsewhere the whole batch.
        cpu = jax.devices()[0].platform == "cpu"
        width = self.width or (1 if cpu else self.local)
        budget = _memory_budget(self.options) / max(1, jax.local_device_count())
        while True:
            compiled = build(min(width, self.local))
            mem = _temp_bytes(compiled)
            if self.width or width <= 1 or mem is None or mem <= budget:
                break
            width = max(1, width // 2)
        self.width = min(width, self.local)
        self.log(f"vmap width {self.width} of {self.local} runs per device "
                 f"(working memory {mem / 2**20:.0f} MiB per device)" if mem is not None else
                 f"vmap width {self.width} of {self.local} runs per device")
        self._chunks[length] = compiled
        return compiled


def _temp_bytes(compiled) -> float | None:
    try:
        m = compiled.memory_analysis()
        return float(m.temp_size_in_bytes + m.output_size_in_bytes)
    except Exception:  # noqa: BLE001  (not every backend reports it)
        return None


def _put(x, runner: BatchRunner, sharded: bool):
    """Places a host array (or pytree) as a global array: sharded on runs, or replicated."""
    if runner.mesh is None:
        return jax.tree.map(jnp.asarray, x)
    from jax.sharding import NamedSharding, PartitionSpec as P

    sh = NamedSharding(runner.mesh, P("runs") if sharded else P())

    def one(a):
        a = np.asarray(a)
        return jax.make_array_from_callback(a.shape, sh, lambda idx: a[idx])

    return jax.tree.map(one, x)


def run_batch(program, batch: Batch, options: GridOptions, ndev: int, *, bar=None, log=None) -> list[dict]:
    """Runs one batch to the end; returns one history row per (run, evaluation)."""
    configs = batch.configs
    R = len(configs)
    # Batches of one group with the same size reuse one runner (and its compiled programs).
    rkey = ("runner", R, ndev, options)
    runner = program._compiled.get(rkey)
    if runner is None:
        runner = program._compiled[rkey] = BatchRunner(program, R, options, ndev, log)
    width = max(program.split_width(c) for c in configs)
    per_run = [program.inputs(c, width) for c in configs]
    per_run += [per_run[-1]] * (runner.r_pad - R)  # padding runs: copies, discarded
    inputs = _put(_stack(per_run), runner, True)
    if not hasattr(runner, "data"):  # placed once per runner (replicated over the mesh)
        runner.data = (_put(program.train, runner, False), _put(program.test, runner, False))
    train, test = runner.data
    carry = runner.init_fn()(inputs)
    ev = runner.eval_fn()
    cfg0 = configs[0]
    rows: list[dict] = []

    def record(step, evals, ms=None):
        evals = {k: _to_host(v)[:R] for k, v in evals.items()}
        ms = {k: _to_host(v)[:R] for k, v in (ms or {}).items()}
        for i in range(R):
            row = {"step": step, **{k: float(v[i]) for k, v in evals.items()},
                   **{k: (v[i].tolist() if v.ndim > 1 else float(v[i])) for k, v in ms.items()}}
            row["_run"] = i
            rows.append(row)

    record(0, ev(carry, inputs.val_indices, train, test))
    t = 0
    t0_wall = time.perf_counter()
    while t < cfg0.steps:
        length = min(cfg0.eval_every, cfg0.steps - t)
        t0 = _put(np.asarray(t, np.int32), runner, False)
        fn = runner.chunk_fn(length, (carry, t0, inputs, train))
        carry, ms = fn(carry, t0, inputs, train)
        t += length
        record(t, ev(carry, inputs.val_indices, train, test), ms)
        if bar is not None:
            bar.update(length * R)
    wall = time.perf_counter() - t0_wall
    for r in rows:
        r["wall_time_s"] = wall / R
        r["vmap_width"] = runner.width
    return rows


def _rows_to_frame(batch: Batch, rows: list[dict], meta: dict):
    import pandas as pd

    df = pd.DataFrame(rows)
    cfg_cols = {}
    for i, c in enumerate(batch.configs):
        d = c.to_dict()
        d["run_id"] = c.config_hash()
        d["f"] = c.f_declared  # the value the run used (None in the configuration = f_real)
        d.update(results_mod.hyperparameter_columns(d))  # aggregator.tau, attack.z, ...
        # what the attack resolved from the setting (ALIE's z when left at its default or "baruch")
        d.update(attacks.resolved_columns(c.attack, c.attack_kwargs, c.n_workers, c.f_real))
        cfg_cols[i] = d
    extra = pd.DataFrame([cfg_cols[i] for i in df["_run"]])
    df = pd.concat([extra.reset_index(drop=True), df.drop(columns="_run").reset_index(drop=True)], axis=1)
    df["batch_id"] = batch.batch_id
    for k, v in meta.items():
        df[k] = v
    return results_mod.tidy(df)


def _finished(parts_dir: Path, meta: dict) -> set[str]:
    """Run ids with rows in a part file; refuses parts written by another jbyz version."""
    import pyarrow.parquet as pq

    done, changed = set(), set()
    if not parts_dir.exists():
        return done
    for p in sorted(parts_dir.glob("*.parquet")):
        m = results_mod.read_metadata(p)
        if m.get("jbyz_version") != meta["jbyz_version"]:
            raise ConfigError(
                f"{p} was written by jbyz {m.get('jbyz_version')!r}, this is jbyz "
                f"{meta['jbyz_version']!r}: results of different versions are never mixed. "
                f"Use another output directory, or delete {parts_dir} to recompute.")
        if m.get("jbyz_source") != meta.get("jbyz_source"):
            changed.add(m.get("jbyz_source"))
        done.update(pq.read_table(p, columns=["run_id"]).column("run_id").to_pylist())
    if changed:
        import warnings

        warnings.warn(
            f"{len(changed)} earlier source version(s) of jbyz {meta['jbyz_version']} wrote finished "
            f"batches in {parts_dir} (source fingerprints {sorted(map(str, changed))}, now "
            f"{meta.get('jbyz_source')}); they are reused. Delete them to recompute with this code.",
            stacklevel=3)
    return done


def run_grid(configs: Sequence[RunConfig], out_dir: str | Path, options: GridOptions | None = None,
             *, progress: bool = True, log=print, table_configs: Sequence[RunConfig] | None = None):
    """Runs a grid with resume; returns the tidy results table (also ``out_dir/results.parquet``).

    Args:
      configs: the grid's points.
      out_dir: where ``parts/``, ``results.parquet``, ``invalid.csv`` and ``grid.json`` go.
      options: :class:`GridOptions`.
      progress: show one progress bar (run-steps, runs finished, ETA).
      log: where messages go (``None``: silent).
      table_configs: the runs whose finished results form ``results.parquet`` (default:
        ``configs``); a subset run (``jbyz run --only ...``) passes the whole grid, so the table
        holds every finished run of it.

    Returns:
      A pandas DataFrame, one row per (run, evaluation step), every config field a column
      (``None`` on processes other than 0 of a multi-process job: process 0 writes the table).

    JAX's persistent compilation cache is on for the call (``options.compile_cache``, else
    ``$JBYZ_COMPILE_CACHE``, else a per-user directory: :mod:`jbyz.compile_cache`); the first
    log line says where it is. JAX's own settings are restored on return.
    """
    from jbyz import compile_cache

    options = options or GridOptions()
    with compile_cache.enabled(options.compile_cache, log=log):
        return _run_grid(configs, out_dir, options, progress=progress, log=log,
                         table_configs=table_configs)


def _run_grid(configs, out_dir, options, *, progress, log, table_configs):
    """:func:`run_grid` inside its compile-cache context."""
    import pandas as pd

    from jbyz._progress import tqdm_class
    from jbyz.simulate import get_program

    tqdm = tqdm_class()

    log = log or (lambda *a, **k: None)
    options = options or GridOptions()
    out = Path(out_dir)
    ndev = _device_count(options)
    pl = plan(configs, options, ndev)
    main = jax.process_index() == 0
    meta = results_mod.run_metadata()
    meta["devices"] = str(ndev)
    parts = out / PARTS
    if main:
        out.mkdir(parents=True, exist_ok=True)
        (out / "grid.json").write_text(json.dumps({
            "runs": len(pl.configs), "groups": len(pl.groups), "batches": len(pl.batches),
            "run_ids": [c.config_hash() for c in pl.configs], **meta}, indent=1))
        if pl.invalid:
            inv = pd.DataFrame([{**c.to_dict(), "reason": "; ".join(e)} for c, e in pl.invalid])
            results_mod.tidy(inv).to_csv(out / "invalid.csv", index=False)
            log(f"skipping {len(pl.invalid)} invalid point(s); reasons in {out / 'invalid.csv'}")
    # Resume by run: a run with rows in any finished part is not recomputed, whatever batch it
    # was in (so a grid resumes after --only filters, other device counts or batch sizes change).
    done_runs = _finished(parts, meta)
    flags = np.array([c.config_hash() in done_runs for c in pl.configs], np.int32)
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        flags = multihost_utils.broadcast_one_to_all(flags)
    n_done_runs = int(flags.sum())
    pl_todo = pl
    if n_done_runs:
        pl_todo = plan([c for c, f in zip(pl.configs, flags) if not f], options, ndev)
    todo = pl_todo.batches
    log(pl.describe() + (f"\nresuming: {n_done_runs} of {len(pl.configs)} runs already finished; "
                         f"{len(todo)} batch(es) to go" if n_done_runs else ""))
    total = sum(b.steps for b in pl.batches)
    left = sum(b.steps for b in todo)
    bar = tqdm(total=total, initial=total - left, unit="run-step",
               desc=f"{len(pl.configs)} runs", disable=not (progress and main), smoothing=0.05)
    runs_done = n_done_runs
    for batch in todo:
        g = pl_todo.groups[batch.group]
        prog = get_program(g.configs[0], g.n_max, g.grad_rows)
        bar.set_postfix(runs=f"{runs_done}/{len(pl.configs)}", group=batch.group)
        rows = run_batch(prog, batch, options, ndev, bar=bar,
                         log=lambda m: bar.write(f"group {batch.group}: {m}") if main else None)
        runs_done += len(batch.configs)
        if main:
            df = _rows_to_frame(batch, rows, meta)
            results_mod.write_table(df, parts / f"{batch.batch_id}.parquet", meta)
        bar.set_postfix(runs=f"{runs_done}/{len(pl.configs)}")
    bar.close()
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices("jbyz-grid-finished")
        if not main:
            return None  # process 0 gathered every result and wrote the table
    if table_configs is not None:
        full = plan(table_configs, dataclasses.replace(options, invalid="skip"), ndev)
        ids = {c.config_hash() for c in full.configs}
        pl_table = dataclasses.replace(pl, groups=full.groups) if ids else pl
    else:
        pl_table = pl
    table = collect(out, pl_table)
    results_mod.write_table(table, out / "results.parquet", meta)
    return table


def collect(out_dir: str | Path, pl: Plan | None = None):
    """The grid's table from its part files (only the runs of ``pl`` when given), in plan order."""
    import pandas as pd

    parts = Path(out_dir) / PARTS
    frames = [pd.read_parquet(p) for p in sorted(parts.glob("*.parquet"))]
    if not frames:
        raise FileNotFoundError(f"no finished batches under {parts}")
    df = results_mod.normalize(pd.concat(frames, ignore_index=True))  # parts of earlier versions too
    if pl is not None:
        order = {c.config_hash(): i for i, c in enumerate(pl.configs)}
        df = df[df["run_id"].isin(order)].copy()
        df["_order"] = df["run_id"].map(order)
        df = df.sort_values(["_order", "step"], kind="stable").drop(columns="_order")
        df = df.drop_duplicates(["run_id", "step"], keep="last")
    return df.reset_index(drop=True)
