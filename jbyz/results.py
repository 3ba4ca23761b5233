"""Tidy results tables: one row per (run, evaluation step), Parquet on disk, pandas in memory.

Every configuration field is a column, beside ``run_id``, ``config_hash``, the metrics and the
versions of jbyz / jax / the device that produced them (:func:`run_metadata`). Files are written
atomically (temporary file + rename), so a killed process never leaves a half-written table.
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

    from jbyz import __version__

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


def _flatten_cell(v):
    if isinstance(v, (dict, list, tuple)):
        return json.dumps(v, sort_keys=True, default=str)
    return v


def tidy(df: pd.DataFrame) -> pd.DataFrame:
    """Turns nested config values (dicts, lists) into JSON strings so Parquet can store them."""
    df = df.copy()
    for c in df.columns:
        if df[c].dtype == object:
            df[c] = df[c].map(_flatten_cell)
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
    return pd.concat([pd.read_parquet(f) for f in files], ignore_index=True)


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
        from jbyz.config import FIELDS

        by = [c for c in df.columns if c in FIELDS and c != "seed" and df[c].nunique(dropna=False) > 1]
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
