"""Tidy results tables: one row per (run, evaluation step), Parquet on disk, pandas in memory.

Every configuration field is a column, beside ``run_id`` (the configuration's hash), the
metrics and the versions of jbyz / jax / the device that produced them (:func:`run_metadata`).
``f`` holds the declared ``f`` the run used (``f_real`` when the configuration left it unset).
Scalar hyper-parameters of components are columns of their own, named ``<component>.<name>``
(``aggregator.tau``, ``attack.z``, ``model.width``, ``lr_schedule.every``,
:func:`hyperparameter_columns`); the ``<component>_kwargs`` columns keep every hyper-parameter
given, as JSON text, so a row still describes its configuration completely. Files are written
atomically (temporary file + rename), so a killed process never leaves a half-written table.
Tables written by earlier versions (a ``config_hash`` column, ``f`` empty, hyper-parameters only
as JSON) load into the same shape (:func:`normalize`).

:func:`select_hyperparameters` applies ByzFL's benchmark protocol to a table: per rule and
setting (``f_real`` x data heterogeneity), the hyper-parameters maximising the worst case over
attacks of the validation accuracy, and the test accuracy there (:func:`best_rule_per_cell`:
the best rule of each setting).
"""

from __future__ import annotations

import json
import os
import platform
import tempfile
from pathlib import Path

import pandas as pd

METRICS = ("test_accuracy", "test_loss", "train_loss", "variance_norm_ratio", "agg_distance", "agg_cosine")


def run_metadata() -> dict[str, str]:
    """Versions and device of this process, stored beside every result."""
    import jax

    from jbyz._version import __version__

    dev = jax.devices()[0]
    return {
        "jbyz_version": __version__,
        "jbyz_source": source_fingerprint(),
        "jax_version": jax.__version__,
        "device_kind": f"{dev.platform}:{getattr(dev, 'device_kind', '')}",
        "python_version": platform.python_version(),
    }


def source_fingerprint() -> str:
    """A hash of jbyz's own source files: tells results of edited code apart within a version."""
    import hashlib

    root = Path(__file__).resolve().parent
    h = hashlib.sha256()
    for f in sorted(root.rglob("*.py")):
        h.update(f.relative_to(root).as_posix().encode())
        h.update(f.read_bytes())
    return h.hexdigest()[:12]


# Configuration fields holding a component's hyper-parameters -> the prefix of their columns.
KWARGS_FIELDS = {
    "dataset_kwargs": "dataset",
    "model_kwargs": "model",
    "aggregator_kwargs": "aggregator",
    "attack_kwargs": "attack",
    "latency_kwargs": "latency",
    "lr_schedule_kwargs": "lr_schedule",
}


def _is_scalar(v) -> bool:
    return isinstance(v, (bool, int, float, str))


def hyperparameter_columns(kwargs_by_field) -> dict:
    """``{"aggregator.tau": 1.0, ...}``: the scalar hyper-parameters given to each component.

    Args:
      kwargs_by_field: a mapping with ``<component>_kwargs`` entries (a
        :meth:`~jbyz.config.RunConfig.to_dict`, or a results row), each a dict or its JSON text.

    Lists, tables and ``None`` stay in the ``<component>_kwargs`` column only.
    """
    out = {}
    for field, prefix in KWARGS_FIELDS.items():
        kw = kwargs_by_field.get(field)
        if isinstance(kw, str):
            try:
                kw = json.loads(kw)
            except ValueError:
                continue
        if not isinstance(kw, dict):
            continue
        for k, v in kw.items():
            if _is_scalar(v):
                out[f"{prefix}.{k}"] = v
    return out


def _flatten_cell(v):
    if isinstance(v, (dict, list, tuple)):
        return json.dumps(v, sort_keys=True, default=str)
    return v


def tidy(df: pd.DataFrame) -> pd.DataFrame:
    """Turns nested config values (dicts, lists) into JSON strings so Parquet can store them.

    A hyper-parameter column (``aggregator.b``) whose components disagree on the type (numbers
    here, text there) is stored as text.
    """
    df = df.copy()
    for c in df.columns:
        if df[c].dtype == object:
            df[c] = df[c].map(_flatten_cell)
            if "." in c:
                types = {type(v) for v in df[c] if v is not None and v == v}
                if len(types) > 1 and not types <= {int, float}:
                    df[c] = df[c].map(lambda v: v if v is None or v != v else str(v))
    return df


def normalize(df: pd.DataFrame) -> pd.DataFrame:
    """Brings a results table to the current layout; tables already in it come back unchanged.

    Tables written by earlier versions of jbyz: ``config_hash`` (a copy of ``run_id``) is
    dropped, an empty ``f`` is filled with ``f_real`` (the declared ``f`` the run used), and the
    scalar hyper-parameters in the ``<component>_kwargs`` JSON columns become
    ``<component>.<name>`` columns (:func:`hyperparameter_columns`); configuration fields added
    later (``local_steps``, ``split_seed``, ...) that an older part lacks get the default that
    reproduces what that part ran (the same defaults that keep its run id).
    """
    from jbyz.config import _HASH_OMIT_AT_DEFAULT

    df = df.copy()
    for field, default in _HASH_OMIT_AT_DEFAULT.items():
        if default is not None and field in df.columns and df[field].isna().any():
            filled = df[field].astype(object).where(df[field].notna(), default)
            filled = filled.infer_objects()
            if isinstance(default, int) and not isinstance(default, bool):
                filled = pd.to_numeric(filled).astype("int64")
            df[field] = filled
    if "config_hash" in df.columns and "run_id" in df.columns:
        h = df["config_hash"]
        if (h.isna() | (h.astype(object) == df["run_id"].astype(object))).all():  # a copy (or absent)
            df = df.drop(columns="config_hash")
    if "f" in df.columns and "f_real" in df.columns and df["f"].isna().any():
        f = df["f"].astype(object).where(df["f"].notna(), df["f_real"])
        df["f"] = pd.to_numeric(f)
        if df["f"].notna().all():
            df["f"] = df["f"].astype("int64")
    fields = [c for c in KWARGS_FIELDS if c in df.columns]
    if fields:
        cells = pd.DataFrame({c: df[c].map(_flatten_cell) if df[c].dtype == object else df[c]
                              for c in fields}, index=df.index)
        codes = cells.groupby(fields, dropna=False, sort=False).ngroup().to_numpy()
        first = pd.Series(range(len(df))).groupby(codes).first()  # few distinct kwargs: parse once
        per_code = pd.DataFrame([hyperparameter_columns(dict(zip(fields, cells.iloc[i])))
                                 for i in first.to_numpy()], index=first.index)
        expanded = per_code.reindex(codes).set_axis(df.index)
        for c in expanded.columns:
            if c in df.columns:
                df[c] = df[c].where(df[c].notna(), expanded[c])
            else:
                df[c] = expanded[c]
    return df


def component_name(values: pd.Series) -> pd.Series:
    """The registry name of each entry of a component column (``attack``, ``aggregator`` ...).

    A component with options is stored as its JSON spec (``'{"name": "alie", "z": 1.5}'``, see
    :func:`tidy`); a plain one as its name. Returns the names, e.g. to group runs by attack
    whatever its options.
    """
    def one(v):
        if isinstance(v, dict):
            return v.get("name", json.dumps(v, sort_keys=True, default=str))
        if isinstance(v, str) and v.startswith("{"):
            try:
                spec = json.loads(v)
            except ValueError:
                return v
            return spec.get("name", v) if isinstance(spec, dict) else v
        return v

    return values.map(one)


def write_table(df: pd.DataFrame, path: str | Path, metadata: dict | None = None) -> Path:
    """Writes ``df`` to Parquet atomically, with ``metadata`` in the file's key-value metadata."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    table = pa.Table.from_pandas(tidy(df), preserve_index=False)
    meta = dict(table.schema.metadata or {})
    meta[b"jbyz"] = json.dumps(metadata or run_metadata()).encode()
    table = table.replace_schema_metadata(meta)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
    os.close(fd)
    try:
        pq.write_table(table, tmp)
        os.chmod(tmp, 0o644)  # mkstemp creates 0600 files
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return path


def read_metadata(path: str | Path) -> dict:
    import pyarrow.parquet as pq

    meta = pq.read_schema(path).metadata or {}
    return json.loads(meta.get(b"jbyz", b"{}"))


def load_results(path: str | Path) -> pd.DataFrame:
    """Loads a results file or directory into one DataFrame.

    A grid's output directory loads its ``parts/``: every run finished so far, whichever command
    stored it. Its ``results.parquet`` is written when a ``jbyz run`` command finishes, so it
    lacks what was stored since (a piece of the grid still running, another process working on
    the same folder); it is loaded only where there are no parts. Any other directory loads every
    ``*.parquet`` under it.

    A run stored twice (two processes of one grid that overlapped, e.g. with different ``--only``
    filters) is loaded once: rows are unique by ``(run_id, step)``.
    """
    path = Path(path)
    parts = sorted((path / "parts").glob("*.parquet")) if path.is_dir() else []
    if parts:
        files = parts
    elif path.is_dir() and (path / "results.parquet").exists():
        files = [path / "results.parquet"]
    else:
        files = sorted(path.rglob("*.parquet")) if path.is_dir() else [path]
    if not files:
        raise FileNotFoundError(f"no .parquet results under {str(path)!r}")
    df = normalize(pd.concat([pd.read_parquet(f) for f in files], ignore_index=True))
    if {"run_id", "step"} <= set(df.columns):
        df = df.drop_duplicates(["run_id", "step"], keep="last").reset_index(drop=True)
    return df


def config_columns(df: pd.DataFrame) -> list[str]:
    """The columns that tell the configurations of ``df`` apart (``seed`` excepted), readably.

    Every configuration field and ``<component>.<name>`` hyper-parameter column that varies,
    except the redundant ones: a ``<component>_kwargs`` JSON column whose hyper-parameters are
    all scalars (its ``<component>.<name>`` columns say the same) and ``f`` where it equals
    ``f_real`` in every row.
    """
    from jbyz.config import FIELDS

    prefixes = tuple(f"{p}." for p in KWARGS_FIELDS.values())
    def varies(col):
        try:
            return df[col].nunique(dropna=False) > 1
        except TypeError:  # unhashable cells (a table not yet through tidy)
            return df[col].astype(str).nunique(dropna=False) > 1

    cols = [c for c in df.columns if (c in FIELDS or c.startswith(prefixes)) and c != "seed"
            and varies(c)]

    def all_scalar(field):
        def one(v):
            if isinstance(v, str):
                try:
                    v = json.loads(v)
                except ValueError:
                    return False
            return isinstance(v, dict) and all(_is_scalar(x) for x in v.values())
        return bool(df[field].map(one).all())

    out = []
    for c in cols:
        if c in KWARGS_FIELDS and all_scalar(c):
            continue
        if c == "f" and "f_real" in df.columns and (df["f"] == df["f_real"]).all():
            continue
        out.append(c)
    return out


def summarize(
    df: pd.DataFrame,
    by: list[str] | None = None,
    metric: str = "test_accuracy",
) -> pd.DataFrame:
    """Final and best ``metric`` per configuration: mean, std and count over seeds.

    Args:
      df: a results table (:func:`load_results`).
      by: the columns that identify a configuration; default: every config column that varies
        in ``df`` except ``seed``.
      metric: the metric to summarise.

    Returns:
      One row per configuration with ``final_mean, final_std, best_mean, best_std, seeds``.
    """
    if by is None:
        by = config_columns(df)
    key = ["run_id"] if "run_id" in df.columns else [*by, "seed"]
    cols = {c: (c, "first") for c in by if c not in key}
    per_run = (
        df.sort_values("step")
        .groupby(key, dropna=False)
        .agg(final=(metric, "last"), best=(metric, "max"), **cols)
        .reset_index()
    )
    if not by:
        by = ["_all"]
        per_run["_all"] = "all"
    out = per_run.groupby(by, dropna=False).agg(
        final_mean=("final", "mean"), final_std=("final", "std"),
        best_mean=("best", "mean"), best_std=("best", "std"), seeds=("final", "size"),
    )
    return out.reset_index()


# --------------------------------------------------------------------------------------------
# Hyper-parameter selection: ByzFL's benchmark protocol
# --------------------------------------------------------------------------------------------

#: Columns that describe how the training data is spread over the workers (the heterogeneity of
#: a setting): never tuned, they define the cells.
HETEROGENEITY_COLUMNS = ("split", "dirichlet_alpha", "gamma", "shards_per_worker")

#: Fields that define the setting rather than the method: never chosen by
#: :func:`select_hyperparameters` (it refuses a table where one varies inside a cell).
SETTING_COLUMNS = ("dataset", "dataset_kwargs", "model", "model_kwargs", "n_workers", "f",
                   "steps", "eval_every", "validation_size", *HETEROGENEITY_COLUMNS)

#: The parameter of each parametrised split (its value means nothing to the other splits);
#: for each, a smaller value is a more heterogeneous split.
SPLIT_PARAMETERS = {"dirichlet": "dirichlet_alpha", "gamma_similarity": "gamma",
                    "shards": "shards_per_worker"}
_PARAMETER_NAMES = {"dirichlet_alpha": "alpha", "shards_per_worker": "per_worker"}

#: Seeds: the runs that differ only in them are averaged.
SEED_COLUMNS = ("seed", "split_seed")

# Splits from the most homogeneous to the most heterogeneous; others go between iid and extreme.
_SPLIT_ORDER = {"shared": 0, "iid": 1, "extreme": 99}

STEP_REDUCTIONS = ("best", "final", "at_val_best")


def _error(message: str) -> Exception:
    from jbyz.registry import ConfigError

    return ConfigError(message)


def _close(name: str, choices) -> str:
    import difflib

    near = difflib.get_close_matches(name, [str(c) for c in choices], n=3, cutoff=0.6)
    return f" (did you mean {', '.join(repr(n) for n in near)}?)" if near else ""


def _metric_columns(df: pd.DataFrame) -> list[str]:
    import re

    return [c for c in df.columns
            if (c in METRICS or re.match(r"^(val|test|train)_", c))
            and pd.api.types.is_numeric_dtype(df[c])]


def _higher_is_better(metric: str) -> bool:
    return "loss" not in metric


def _fmt(v) -> str:
    return f"{v:g}" if isinstance(v, float) else str(v)


def heterogeneity_levels(df: pd.DataFrame) -> pd.Series:
    """Each row's data-heterogeneity level, readably: ``iid``, ``dirichlet alpha=0.1``, ...

    The split's name, followed by its parameter where the split has one
    (:data:`SPLIT_PARAMETERS`: ``dirichlet alpha=0.1``, ``gamma_similarity gamma=0.5``,
    ``shards per_worker=2``); a split of another name gets any other column of
    :data:`HETEROGENEITY_COLUMNS` that takes several values among its rows. The result is an
    ordered categorical from homogeneous to heterogeneous: ``shared``, ``iid``, the parametrised
    splits (by name, each from its largest parameter to its smallest), ``extreme``. A table
    without a ``split`` column is all ``shared`` (the :class:`~jbyz.config.RunConfig` default).
    """
    split = (df["split"].astype(str) if "split" in df.columns
             else pd.Series("shared", index=df.index))
    params = [c for c in HETEROGENEITY_COLUMNS[1:] if c in df.columns]
    cols = pd.concat([split.rename("split"), df[params]], axis=1)
    combos = cols.drop_duplicates()  # few: labels are made once per combination
    label, key = {}, {}
    for s_ in combos["split"].unique():
        rows = combos[combos["split"] == s_]
        known = SPLIT_PARAMETERS.get(s_)
        if known is not None:
            used = [known] if known in params else []
        else:  # a split of its own: the other columns that vary among its rows
            used = [c for c in params if c not in SPLIT_PARAMETERS.values()
                    and rows[c].nunique(dropna=True) > 1]
        for i, r in rows.iterrows():
            text = ", ".join(f"{_PARAMETER_NAMES.get(c, c)}={_fmt(r[c])}" for c in used)
            label[i] = f"{s_} {text}" if text else s_
            nums = tuple((-1.0 if known else 1.0) * float(r[c])
                         if pd.api.types.is_number(r[c]) and r[c] == r[c] else 0.0
                         for c in used)
            key.setdefault(label[i], (_SPLIT_ORDER.get(s_, 50), s_, nums))
    combos = combos.assign(_label=pd.Series(label))
    labels = cols.merge(combos, on=list(cols.columns), how="left")["_label"].to_numpy()
    order = sorted(key, key=key.get)
    return pd.Series(pd.Categorical(labels, categories=order, ordered=True), index=df.index,
                     name="heterogeneity")


def _clear_unused_split_parameters(df: pd.DataFrame) -> None:
    """Blanks each split parameter on the rows of the other splits (a product sweep of
    ``dirichlet_alpha`` says nothing about the iid runs)."""
    if "split" not in df.columns:
        return
    for split, col in SPLIT_PARAMETERS.items():
        if col in df.columns:
            df[col] = df[col].where(df["split"] == split)


def _over_labels(df: pd.DataFrame, over: str) -> tuple[pd.Series, list[str]]:
    """One label per row for the ``over`` component with its hyper-parameters (``alie (z = 1.5)``)
    and the columns that went into it."""
    prefix = f"{over}."
    extra = [c for c in df.columns if c.startswith(prefix) and df[c].nunique(dropna=False) > 1]
    kw = f"{over}_kwargs"
    if not extra and kw in df.columns and df[kw].astype(str).nunique() > 1:
        extra = [kw]
    names = component_name(df[over]).astype(str)
    if not extra:
        return names, extra

    def one(row):
        parts = [f"{c[len(prefix):] if c.startswith(prefix) else c} = {_fmt(row[c])}"
                 for c in extra if row[c] is not None and row[c] == row[c]]
        return f" ({', '.join(parts)})" if parts else ""

    cols = pd.concat([names.rename("_name"), df[extra]], axis=1)
    combos = cols.drop_duplicates()
    combos = combos.assign(_label=combos["_name"] + combos.apply(one, axis=1))
    labels = cols.merge(combos, on=list(cols.columns), how="left")["_label"]
    return pd.Series(labels.to_numpy(), index=df.index), extra


def _varies_within(df: pd.DataFrame, col: str, keys: list[str]) -> bool:
    if not keys:
        return df[col].nunique(dropna=False) > 1
    return bool(df.groupby(keys, dropna=False, observed=True, sort=False)[col]
                .nunique(dropna=False).gt(1).any())


def select_hyperparameters(
    table: pd.DataFrame,
    *,
    by: tuple[str, ...] | list[str] | None = None,
    over: str = "attack",
    tune: tuple[str, ...] | list[str] | None = None,
    heterogeneity: str | None = "auto",
    metric: str = "val_accuracy",
    report: str = "test_accuracy",
    reduce_steps: str = "best",
    attacks: tuple[str, ...] | list[str] | None = None,
    per_attack: bool = False,
) -> pd.DataFrame:
    """ByzFL's benchmark protocol: per rule and setting, the hyper-parameters that maximise the
    worst case over attacks of the validation accuracy, and the test accuracy they reach.

    For each cell of ``by`` (by default the aggregator, the number of Byzantine workers
    ``f_real`` and the data heterogeneity) and each candidate, a combination of the ``tune``
    columns' values, every attack's runs are reduced to one number: the mean over seeds of
    ``metric`` at each evaluation, then the best evaluation of that mean curve (``reduce_steps``).
    The candidate whose worst attack is best wins. At that choice, ``report`` is reduced the same
    way for each attack, and its worst case over attacks is what the benchmark reports.

    This is what ByzFL's ``find_best_hyperparameters`` and ``test_heatmap`` compute
    (``byzfl/benchmark/evaluate_results.py``): seeds (training and data-distribution seeds alike)
    are averaged first, the maximum over evaluations is taken of the seed-mean curve (evaluation 0
    included), the choice maximises the minimum over attacks of that maximum on the validation
    set, and the reported test accuracy is the minimum over attacks of the maximum over
    evaluations of the seed-mean test curve, each attack at its own best evaluation. Differences:
    ByzFL breaks exact ties by the order of its configuration lists, this function by the higher
    mean over attacks, then the smaller tuned values; ByzFL keeps the pre-aggregators a setting
    (one heatmap per set of pre-aggregators), here they are tuned when they vary, unless ``by``
    names ``preaggregators``.

    Args:
      table: a results table (:func:`load_results`) with a validation column: runs made with
        ``validation_size`` set.
      by: the columns of a cell. Default: ``("aggregator", "f_real", <heterogeneity>)``.
      over: the column whose values are the adversaries of the worst case (its hyper-parameter
        columns, ``attack.z``, tell attacks apart too).
      tune: the columns chosen per cell. Default: every configuration column that varies inside
        a cell (learning rate, momentum, weight decay, pre-aggregators, a rule's own
        hyper-parameters ...) except the seeds (:data:`SEED_COLUMNS`: ``seed`` and
        ``split_seed``, averaged over), ``over``'s and the setting's
        (:data:`SETTING_COLUMNS`; a table where one of those varies inside a cell is refused).
      heterogeneity: the column of the data-heterogeneity level, added to the default ``by``:
        ``"auto"`` derives a ``heterogeneity`` column from ``split`` and its parameter
        (:func:`heterogeneity_levels`); a column name (``"dirichlet_alpha"``, ``"gamma"``) uses
        that column as it is; ``None``: no heterogeneity axis.
      metric: the column maximised (minimised if its name contains ``loss``), normally
        ``val_accuracy``. ``"test_accuracy"`` selects on the test set, which makes the reported
        accuracy optimistic.
      report: the column reported at the choice, normally ``test_accuracy``.
      reduce_steps: how a run's evaluations become one number: ``"best"`` (ByzFL: the best
        evaluation of the seed-mean curve; ``"max"`` is accepted as a synonym), ``"final"`` (the
        last evaluation, mean over seeds) or ``"at_val_best"`` (``metric`` as ``"best"``,
        ``report`` at the evaluation where the seed-mean ``metric`` curve is best: the test
        set never picks the step).
      attacks: only these values of ``over`` (by name, e.g. to leave ``"none"`` out).
      per_attack: return one row per cell and attack at the choice instead.

    Returns:
      One row per cell, in ``by`` order: the ``by`` columns, the chosen ``tune`` values,
      ``<metric>_worst`` (the worst case over attacks at the choice) and
      ``<metric>_worst_attack`` (both absent when ``metric`` is ``report``), ``<report>_worst``
      with ``<report>_worst_std`` (standard deviation over seeds at the same evaluation), ``<report>_worst_attack`` and ``<report>_worst_step``,
      ``<report>_attack_mean`` (mean over attacks), ``seeds`` (fewest seeds of an attack),
      ``attacks`` and ``candidates`` (combinations compared). With ``per_attack``: ``by``, the
      chosen values, ``over``, ``<metric>``, ``<report>``, ``<report>_std``, ``<report>_step``,
      ``seeds``. ``DataFrame.attrs["selection"]`` records the arguments as resolved, for
      :func:`jbyz.plots.selection_heatmaps` and :func:`jbyz.plots.best_rule_map`.

    Candidates missing an attack that others in their cell have are left out (with a warning),
    so an unfinished grid never wins by having fewer adversaries.
    """
    import warnings

    if reduce_steps == "max":
        reduce_steps = "best"
    if reduce_steps not in STEP_REDUCTIONS:
        raise _error(f"reduce_steps={reduce_steps!r}; valid: {', '.join(STEP_REDUCTIONS)} "
                     "('max' is 'best')")
    if table is None or len(table) == 0:
        raise _error("the results table is empty: no finished run to select from")
    df = tidy(table)
    metrics = _metric_columns(df)
    for role, col in (("metric", metric), ("report", report)):
        if col in df.columns:
            continue
        if col.startswith("val_") and not any(c.startswith("val_") for c in df.columns):
            raise _error(
                f"{role}={col!r}: the table has no {col!r} column, so its runs had no "
                "validation split. Rerun the grid with validation_size set (a held-out part of "
                "the training set, evaluated beside the test set: ByzFL selects on it), or pass "
                "metric='test_accuracy' (jbyz select --metric test_accuracy) to select on the "
                "test set (then the reported accuracy is "
                f"tuned on the test set, an optimistic estimate). Metric columns present: "
                f"{', '.join(metrics) or 'none'}")
        raise _error(f"{role}={col!r} is not a column of the table{_close(col, df.columns)}; "
                     f"metric columns present: {', '.join(metrics) or 'none'}")
    for col in ("step", over):
        if col not in df.columns:
            raise _error(f"{'over' if col == over else 'the table'}: no {col!r} column"
                         f"{_close(col, df.columns)}; the table has: {', '.join(df.columns)}")

    # the heterogeneity axis
    het_sources: list[str] = []
    het = heterogeneity
    if heterogeneity == "auto":
        if "heterogeneity" not in df.columns:
            df["heterogeneity"] = heterogeneity_levels(df)
        het = "heterogeneity"
        het_sources = [c for c in HETEROGENEITY_COLUMNS if c in df.columns]
    elif heterogeneity is not None:
        if heterogeneity not in df.columns:
            present = [c for c in HETEROGENEITY_COLUMNS if c in df.columns]
            raise _error(f"heterogeneity={heterogeneity!r} is not a column of the table"
                         f"{_close(heterogeneity, df.columns)}; heterogeneity columns present: "
                         f"{', '.join(present) or 'none'}; or 'auto' (split and its parameter) "
                         "or None (no heterogeneity axis)")
        het_sources = [heterogeneity]
    _clear_unused_split_parameters(df)

    if by is None:
        by = ["aggregator", "f_real"] + ([het] if het is not None else [])
    by = list(by)
    tune_given = tune is not None
    tune = list(tune or [])
    for role, cols in (("by", by), ("tune", tune)):
        missing = [c for c in cols if c not in df.columns]
        if missing:
            hint = "".join(_close(c, df.columns) for c in missing)
            raise _error(f"{role}: no column {', '.join(repr(c) for c in missing)} in the table"
                         f"{hint}; configuration columns that vary: "
                         f"{', '.join(config_columns(df)) or 'none'}")
    if over in by or over in tune:
        raise _error(f"over={over!r} is also in by or tune: the worst case is taken over it")

    # the adversaries: the over column with its own hyper-parameters
    df["_over"], over_cols = _over_labels(df, over)
    if attacks is not None:
        names = component_name(df[over]).astype(str)
        unknown = sorted(set(map(str, attacks)) - set(names))
        if unknown:
            raise _error(f"attacks: {', '.join(map(repr, unknown))} not in the table's {over!r} "
                         f"column; values there: {', '.join(sorted(set(names)))}")
        df = df[names.isin([str(a) for a in attacks])]
    over_all = {over, f"{over}_kwargs", *over_cols,
                *(c for c in df.columns if c.startswith(f"{over}."))}

    fixed = set(by) | over_all | set(SEED_COLUMNS) | (set(het_sources) if het in by else set())
    cfg = [c for c in config_columns(df) if c not in fixed]
    if not tune_given:
        tune = [c for c in cfg if c not in SETTING_COLUMNS and not c.startswith(("dataset.", "model."))
                and _varies_within(df, c, by)]
    loose = [c for c in cfg if c not in tune and _varies_within(df, c, by + tune + ["_over"])]
    if loose:
        vals = "; ".join(f"{c}: {', '.join(map(_fmt, sorted(df[c].dropna().unique(), key=str)[:6]))}"
                         for c in loose)
        one = len(loose) == 1
        raise _error(f"{', '.join(loose)} {'varies' if one else 'vary'} inside the cells but "
                     f"{'is' if one else 'are'} neither in by nor in tune ({vals}): add "
                     f"{'it' if one else 'them'} to by (a setting: one cell per value) or to tune "
                     "(chosen per cell), or keep one value (table[table[col] == value]); "
                     "otherwise their runs would be averaged as if they were seeds")

    sign = 1.0 if _higher_is_better(metric) else -1.0
    rsign = 1.0 if _higher_is_better(report) else -1.0
    keys = by + tune + ["_over"]
    per = _reduce_steps(df, keys, metric, report, reduce_steps, sign, rsign)

    # the worst case over attacks of each candidate, then the best candidate of each cell
    cand_keys = by + tune
    per["_score"] = sign * per[metric]
    cands = per.groupby(cand_keys, dropna=False, observed=True, sort=False).agg(
        _worst=("_score", "min"), _mean=("_score", "mean"), _n=("_over", "nunique")).reset_index()
    n_over = per.groupby(by, dropna=False, observed=True, sort=False)["_over"].nunique()
    cands = cands.merge(n_over.rename("_cell_n").reset_index(), on=by, how="left")
    cands = cands[cands["_worst"].notna()]
    incomplete = cands["_n"] < cands["_cell_n"]
    if incomplete.any():
        warnings.warn(f"{int(incomplete.sum())} of {len(cands)} candidates lack an attack that "
                      "other candidates of their cell have, and were left out (an unfinished "
                      "grid?)", stacklevel=2)
    counted = (cands.groupby(by, dropna=False, observed=True, sort=False).size()
               .rename("candidates").reset_index())
    cands = cands[~incomplete]
    order = cands.sort_values(tune, key=_sort_key, kind="stable") if tune else cands
    order = order.sort_values(["_worst", "_mean"], ascending=False, kind="stable")
    chosen = order.drop_duplicates(by, keep="first").merge(counted, on=by, how="left")
    if len(chosen) < len(counted):
        left = counted.merge(chosen[by], on=by, how="left", indicator=True)
        left = left[left["_merge"] == "left_only"][by]
        warnings.warn(f"{len(left)} cell(s) have no candidate with every attack and are left "
                      f"out: {left.head(5).to_dict('records')}", stacklevel=2)
    chosen_keys = chosen[cand_keys]

    at = per.merge(chosen_keys, on=cand_keys, how="inner")
    at = at.rename(columns={"_over": over})
    if per_attack:
        out = at[[*cand_keys, over, metric, report, f"{report}_std", f"{report}_step", "seeds"]]
        out = out.sort_values([*by, over], key=_sort_key, kind="stable").reset_index(drop=True)
    else:
        at["_rscore"] = rsign * at[report]
        g = at.groupby(cand_keys, dropna=False, observed=True, sort=False)
        worst_val = at.loc[g["_score"].idxmin()].set_index(cand_keys)
        worst_rep = at.loc[g["_rscore"].idxmin()].set_index(cand_keys)
        cols = {} if metric == report else {f"{metric}_worst": worst_val[metric],
                                            f"{metric}_worst_attack": worst_val[over]}
        out = pd.DataFrame({
            **cols,
            f"{report}_worst": worst_rep[report],
            f"{report}_worst_std": worst_rep[f"{report}_std"],
            f"{report}_worst_attack": worst_rep[over],
            f"{report}_worst_step": worst_rep[f"{report}_step"],
            f"{report}_attack_mean": g[report].mean(),
            "seeds": g["seeds"].min(),
            "attacks": g[over].nunique(),
        })
        out = out.reset_index().merge(chosen[[*cand_keys, "candidates"]], on=cand_keys)
        out = out.sort_values(by, key=_sort_key, kind="stable").reset_index(drop=True)
    out.attrs["selection"] = dict(by=by, over=over, tune=tune, heterogeneity=het, metric=metric,
                                  report=report, reduce_steps=reduce_steps)
    return out


def _sort_key(col: pd.Series) -> pd.Series:
    """Sorts numbers as numbers, categories in their order, anything else as text."""
    if isinstance(col.dtype, pd.CategoricalDtype) or pd.api.types.is_numeric_dtype(col):
        return col
    return col.astype(str)


def _reduce_steps(df, keys, metric, report, how, sign, rsign) -> pd.DataFrame:
    """Per combination of ``keys`` (a candidate and an attack): ``metric`` reduced over seeds and
    evaluations, ``report`` with its spread over seeds and the evaluation it was read at."""
    run = (["run_id"] if "run_id" in df.columns
           else [*keys, *(c for c in SEED_COLUMNS if c in df.columns)])
    if how == "final":
        last = (df.sort_values("step", kind="stable")
                .groupby([*keys, *[c for c in run if c not in keys]], dropna=False,
                         observed=True, sort=False)
                .agg(**{metric: (metric, "last"), report: (report, "last"), "step": ("step", "last")})
                .reset_index())
        out = last.groupby(keys, dropna=False, observed=True, sort=False).agg(
            **{metric: (metric, "mean"), report: (report, "mean"),
               f"{report}_std": (report, "std"), f"{report}_step": ("step", "max"),
               "seeds": (report, "size")})
        return out.reset_index()
    # the seed-mean curve of each combination
    cols = [metric] if metric == report else [metric, report]
    curve = df.groupby([*keys, "step"], dropna=False, observed=True, sort=False)[cols].agg(
        ["mean", "std", "count"])
    curve.columns = [f"{c}|{s}" for c, s in curve.columns]
    curve = curve.reset_index()
    curve["_m"] = sign * curve[f"{metric}|mean"]
    curve["_r"] = rsign * curve[f"{report}|mean"]

    def best(col):  # the row of each combination's best evaluation (evaluations without it skipped)
        c = curve[curve[col].notna()]
        return c.loc[c.groupby(keys, dropna=False, observed=True, sort=False)[col].idxmax()
                     ].set_index(keys)

    best_m = best("_m")
    best_r = best_m if how == "at_val_best" else best("_r")
    out = pd.DataFrame({
        metric: best_m[f"{metric}|mean"],
        report: best_r[f"{report}|mean"],
        f"{report}_std": best_r[f"{report}|std"],
        f"{report}_step": best_r["step"],
        "seeds": best_r[f"{report}|count"],
    })
    return out.reset_index()


def _component_text(col: str, v) -> str:
    """A rule column's value as a short label: pre-aggregators by name (``nnm+clipping``)."""
    if v is None or v != v:
        return ""
    if col == "preaggregators" and isinstance(v, str) and v.startswith("["):
        try:
            items = json.loads(v)
        except ValueError:
            return v
        names = [p if isinstance(p, str) else
                 (p.get("name", "?") if isinstance(p, dict) else str(p[0])) for p in items]
        return "+".join(names)
    if isinstance(v, str) and v.startswith("{"):
        return str(component_name(pd.Series([v])).iloc[0])
    return _fmt(v)


def rule_labels(selection: pd.DataFrame, rule: list[str] | tuple[str, ...]) -> pd.Series:
    """One label per row naming the method: the values of the ``rule`` columns joined
    (``median``, ``median + nnm`` with ``preaggregators``)."""
    rule = list(rule)
    return selection[rule].apply(
        lambda r: " + ".join(t for t in (_component_text(c, r[c]) for c in rule) if t) or "-",
        axis=1).astype(str) if len(selection) else pd.Series([], dtype=str)


def _selection_axes(selection: pd.DataFrame, value, x, y, rule):
    """Fills in what a selection's figures default to, from ``selection.attrs``."""
    info = selection.attrs.get("selection", {})
    if value is None:
        value = f"{info.get('report', 'test_accuracy')}_worst"
    if y is None:
        y = info.get("heterogeneity")
        if y is None and "heterogeneity" in selection.columns:
            y = "heterogeneity"
    if rule is None:
        by = info.get("by", ["aggregator"])
        rule = [c for c in by if c not in (x, y)] or ["aggregator"]
    elif isinstance(rule, str):
        rule = [rule]
    missing = [c for c in (value, x, y, *rule) if c is not None and c not in selection.columns]
    if missing:
        raise _error(f"the selection has no column {', '.join(map(repr, missing))}; its columns: "
                     f"{', '.join(selection.columns)}")
    return value, x, y, list(rule)


def best_rule_per_cell(
    selection: pd.DataFrame,
    *,
    value: str | None = None,
    x: str = "f_real",
    y: str | None = None,
    rule: str | list[str] | None = None,
    tie_tol: float = 0.0,
) -> pd.DataFrame:
    """The best method of each setting cell of a :func:`select_hyperparameters` table.

    Args:
      selection: the table (one row per method and cell).
      value: the column compared (default ``<report>_worst``: the worst case over attacks of the
        test accuracy at each method's choice); higher is better unless it names a loss.
      x, y: the cell's columns (default ``f_real`` and the selection's heterogeneity column).
      rule: the columns naming a method (default: the selection's ``by`` without ``x`` and ``y``).
      tie_tol: methods within this distance of the best count as tied.

    Returns:
      One row per cell: ``x``, ``y``, ``rule`` (the best method's label, :func:`rule_labels`;
      ties: the first in label order), ``value``, ``tied`` (the other methods within
      ``tie_tol``, comma separated) and ``runner_up`` (the best value among the other methods).
    """
    value, x, y, rules = _selection_axes(selection, value, x, y, rule)
    sign = 1.0 if _higher_is_better(value) else -1.0
    d = selection.assign(rule=rule_labels(selection, rules), _v=sign * selection[value])
    d = d[d["_v"].notna()]
    cell = [x] + ([y] if y is not None else [])
    rows = []
    for key, g in d.groupby(cell, dropna=False, observed=True, sort=True):
        g = g.sort_values("rule", kind="stable").sort_values("_v", ascending=False, kind="stable")
        top = g.iloc[0]
        tied = g[(g["_v"] >= top["_v"] - tie_tol) & (g["rule"] != top["rule"])]["rule"]
        others = g[g["rule"] != top["rule"]]["_v"]
        key = key if isinstance(key, tuple) else (key,)
        rows.append({**dict(zip(cell, key)), "rule": top["rule"], value: top[value],
                     "tied": ", ".join(tied),
                     "runner_up": sign * others.max() if len(others) else float("nan")})
    out = pd.DataFrame(rows, columns=[*cell, "rule", value, "tied", "runner_up"])
    if y is not None and isinstance(selection[y].dtype, pd.CategoricalDtype):
        out[y] = pd.Categorical(out[y], categories=selection[y].cat.categories, ordered=True)
    return out
