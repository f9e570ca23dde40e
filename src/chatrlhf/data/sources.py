"""Loading raw rows from local files, saved ``datasets`` dirs, the hub, or the shipped demo data.

A source is one string:
    path/to/file.{json,jsonl,ndjson,csv,parquet}   a local file
    path/to/dir                                     a dataset saved with ``datasets.save_to_disk``
    demo | demo:<name>                              ``src/chatrlhf/demo_data/<name>.jsonl`` (demo = demo:pairs)
    owner/name                                      a hub dataset (needs internet)
``source@split`` picks a split of a saved dataset dict or a hub dataset (e.g. ``Dahoas/rm-static@test``).
"""

from __future__ import annotations

import logging
from pathlib import Path

from chatrlhf.data.formats import DataError, normalise_rows
from chatrlhf.data.readers import Rows, read_csv, read_json, read_json_lines, read_parquet

log = logging.getLogger(__name__)

# The demo files ship inside the package (pyproject package-data); Path(__file__) works for editable
# and regular installs alike.
DEMO_DIR = Path(__file__).resolve().parent.parent / "demo_data"
DEMO_DEFAULT = "pairs"
_FILE_SUFFIXES = (".json", ".jsonl", ".ndjson", ".csv", ".parquet", ".pq")
_DATASET_MARKERS = ("dataset_info.json", "state.json", "dataset_dict.json")


def demo_names() -> list[str]:
    """Names usable as ``demo:<name>``."""
    return sorted(p.stem for p in DEMO_DIR.glob("*.jsonl")) if DEMO_DIR.is_dir() else []


def own_eval_source(source: str) -> str | None:
    """The held-out split shipped with a source, if any: ``demo`` / ``demo:pairs`` -> ``demo:pairs_eval``."""
    if source in ("demo", "demo:pairs") and (DEMO_DIR / "pairs_eval.jsonl").is_file():
        return "demo:pairs_eval"
    return None


def demo_path(source: str) -> Path:
    """Resolves ``demo`` / ``demo:<name>`` to the shipped JSONL file."""
    name = source.partition(":")[2] or DEMO_DEFAULT
    path = DEMO_DIR / f"{name}.jsonl"
    if not path.is_file():
        raise DataError(f"no demo data set {name!r} in {DEMO_DIR}.",
                        f"use one of: {', '.join('demo:' + n for n in demo_names()) or '(none installed)'}.",
                        source=source)
    return path


# ----------------------------------------------------------------------------- files
def _read_file(path: Path, source: str, skipped: list[str] | None) -> tuple[str, Rows]:
    suffix = path.suffix.lower()
    if suffix == ".json":
        return read_json(path, source, skipped)
    if suffix in (".jsonl", ".ndjson"):
        return source, read_json_lines(path, source, skipped)
    if suffix == ".csv":
        return source, read_csv(path, source, skipped)
    if suffix in (".parquet", ".pq"):
        return source, read_parquet(path, source)
    raise DataError(f"has an unsupported file type {suffix!r}.",
                    f"use one of {', '.join(_FILE_SUFFIXES)}, or a saved datasets directory.", source=source)


# ----------------------------------------------------------------------------- datasets library
def _pick_split(ds, split: str | None, source: str):
    from datasets import DatasetDict

    if not isinstance(ds, DatasetDict):
        return ds
    if split is None and "train" in ds:
        return ds["train"]
    if split not in ds:
        raise DataError(f"has splits {sorted(ds)}, not {split!r}.", f"name one as '{source}@<split>'.",
                        source=source)
    return ds[split]


def _read_saved(path: Path, source: str, split: str | None) -> Rows:
    from datasets import load_from_disk

    fix = "save it again with Dataset.save_to_disk, or export it to .jsonl/.parquet."
    try:
        ds = load_from_disk(str(path))
    except Exception as err:  # noqa: BLE001 - a damaged dir fails as JSON, Arrow, OS or datasets errors
        raise DataError(f"is not a readable saved dataset ({type(err).__name__}: {err}).", fix,
                        source=source) from None
    ds = _pick_split(ds, split, source)
    try:
        return list(enumerate(ds.to_list()))
    except Exception as err:  # noqa: BLE001 - truncated Arrow files fail only when read
        raise DataError(f"holds unreadable rows ({type(err).__name__}: {err}).", fix, source=source) from None


def _read_hub(name: str, source: str, split: str | None) -> Rows:
    from datasets import load_dataset

    try:
        ds = load_dataset(name, split=split)
    except Exception as err:  # offline, unknown name, gated: all surface as different exception types
        raise DataError(f"could not be loaded as a local file or a hub dataset ({type(err).__name__}: {err}).",
                        "check the path; for a hub dataset run once with internet, then save it with "
                        "Dataset.save_to_disk (or to_json) and point the source at that copy.",
                        source=source) from None
    return list(enumerate(_pick_split(ds, split, source).to_list()))


def _split_suffix(source: str, split: str | None) -> tuple[str, str | None]:
    """``name@split`` -> (name, split), unless a file with the full name exists."""
    base, at, suffix = source.rpartition("@")
    if not at or Path(source).exists() or "/" in suffix or Path(suffix).suffix.lower() in _FILE_SUFFIXES:
        return source, split
    if split is not None and split != suffix:
        raise DataError(f"names split {suffix!r} but split={split!r} was also given.", "give the split once.",
                        source=source)
    return base, suffix


def load_rows(source: str, split: str | None = None, skipped: list[str] | None = None) -> tuple[str, Rows]:
    """Reads raw rows; returns (display name for messages, [(row number, row dict), ...]).

    ``skipped``: None raises on a row the reader cannot read; a list collects those rows' reasons instead
    (``data.bad_rows=skip``; see chatrlhf.data.readers)."""
    if not isinstance(source, str) or not source.strip():
        raise DataError(f"data source must be a non-empty string, got {source!r}.", "set data.datasets.")
    if source == "demo" or source.startswith("demo:"):
        return source, read_json_lines(demo_path(source), source, skipped)
    name, split = _split_suffix(source, split)
    path = Path(name).expanduser()
    if path.is_dir():
        if not any((path / m).is_file() for m in _DATASET_MARKERS):
            raise DataError("is a directory but not a saved datasets dataset (no state.json / dataset_dict.json).",
                            "point at a data file, or save the dataset with Dataset.save_to_disk.", source=source)
        return source, _read_saved(path, source, split)
    if path.is_file():
        if split not in (None, "train"):
            raise DataError(f"is a single file and has no split {split!r}.",
                            "drop the split, or give a separate file per split.", source=source)
        return _read_file(path, source, skipped)
    if path.suffix.lower() in _FILE_SUFFIXES or name.startswith((".", "/", "~")):
        raise DataError("does not exist.", "check the path (relative paths start at the working directory).",
                        source=source)
    return source, _read_hub(name, source, split)


def load_records(source: str, fmt: str = "auto", split: str | None = None,
                 bad_rows: str = "error") -> tuple[list[dict], str]:
    """Loads one source and normalises it; returns (records, kind). See docs/data.md for formats."""
    skipped: list[str] | None = [] if bad_rows == "skip" else None
    name, rows = load_rows(source, split, skipped)
    records, kind = normalise_rows(rows, name, fmt=fmt, bad_rows=bad_rows, unread=skipped or ())
    log.info("%s: %d %s records", name, len(records), kind)
    return records, kind
