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
    ``<component>.<name>`` columns (:func:`hyperparameter_columns`).
    """
    df = df.copy()
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

    A directory holding ``results.parquet`` (a grid's output) loads that table; a grid still
    running (only ``parts/``) loads its finished parts; any other directory loads every
    ``*.parquet`` under it.
    """
    path = Path(path)
    if path.is_dir() and (path / "results.parquet").exists():
        files = [path / "results.parquet"]
    elif path.is_dir() and (path / "parts").is_dir():
        files = sorted((path / "parts").glob("*.parquet"))
    else:
        files = sorted(path.rglob("*.parquet")) if path.is_dir() else [path]
    if not files:
        raise FileNotFoundError(f"no .parquet results under {str(path)!r}")
    return normalize(pd.concat([pd.read_parquet(f) for f in files], ignore_index=True))


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
