"""The manifest: one table schema for every dataset.

One row per image::

    image_id  study_id  subject_id  view  path  split  <class 1> ... <class K>

- ``view`` is normalised to one of :data:`VIEWS`;
- ``path`` is relative to an images root (``--images``);
- ``split`` is ``train``, ``val``, ``test`` or null (not assigned);
- each class column holds 1, 0 or null (null = not annotated by this dataset; pseudo labels fill
  these with probabilities in [0, 1], which is allowed with ``soft=True``).

Every column that is not an id column is a class column, in order: the class list is data.
Labels are per study, so all images of a study must agree on them.

Stored as Parquet (CSV is accepted on input). Writes are atomic (temp name, then rename). A Parquet
manifest made by `chx prepare --images ROOT` records ROOT in its metadata (:func:`images_root`), so
later commands need no ``--images`` (one given overrides it).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import polars as pl

from chx.atomic import atomic_path
from chx.data.views import VIEWS
from chx.errors import ChxError, ManifestError

ID_COLUMNS: tuple[str, ...] = ("image_id", "study_id", "subject_id", "view", "path", "split")
SPLITS: tuple[str, ...] = ("train", "val", "test")
LABEL_DTYPE = pl.Float32
MAX_IMAGES_PER_STUDY = 100   # more is a study_id mistake, not an exam
MISSING_WORDS = ("nan", "none", "null", "na", "n/a")   # how libraries write a missing value


def class_columns(df: pl.DataFrame) -> list[str]:
    """The class columns of a manifest, in table order."""
    return [c for c in df.columns if c not in ID_COLUMNS]


def build_manifest(ids: pl.DataFrame, labels: pl.DataFrame | None = None) -> pl.DataFrame:
    """Assemble a manifest from id columns and (optional, row-aligned) label columns, with the
    schema's column order and dtypes. ``split`` is added as null when absent."""
    if "split" not in ids.columns:
        ids = ids.with_columns(pl.lit(None, dtype=pl.Utf8).alias("split"))
    ids = ids.select(
        [pl.col(c).cast(pl.Utf8) for c in ID_COLUMNS]
    )
    if labels is None or labels.width == 0:
        return ids
    return pl.concat([ids, labels.select(pl.all().cast(LABEL_DTYPE))], how="horizontal")


def _where(source: str | None) -> str:
    return f"{source}: " if source else ""


def _first_bad_row(df: pl.DataFrame, mask: pl.Series) -> tuple[int, str]:
    """(1-based data row number, image_id) of the first True in ``mask``."""
    idx = int(mask.arg_true()[0])
    image_id = df["image_id"][idx] if "image_id" in df.columns else "?"
    return idx + 1, str(image_id)


def validate(df: pl.DataFrame, source: str | None = None, *, soft: bool = False,
             require_labels: bool = True) -> pl.DataFrame:
    """Check a manifest against the schema; return it with normalised dtypes.

    Raises :class:`ManifestError` naming the first bad row (1-based data row, and its image_id) and
    column. ``soft=True`` accepts label values anywhere in [0, 1] (pseudo labels).
    """
    where = _where(source)
    missing = [c for c in ID_COLUMNS if c not in df.columns]
    if missing:
        raise ManifestError(
            f"{where}missing column(s) {', '.join(missing)}; a manifest needs {', '.join(ID_COLUMNS)} "
            f"and one column per class (make one with `chx prepare`)")
    if df.height == 0:
        raise ManifestError(f"{where}the manifest has no rows")
    classes = class_columns(df)
    if require_labels and not classes:
        raise ManifestError(f"{where}no class columns: every column besides {', '.join(ID_COLUMNS)} "
                            f"is a class with values 1, 0 or empty")
    df = df.with_columns([pl.col(c).cast(pl.Utf8) for c in ID_COLUMNS])

    for col in ("image_id", "study_id", "subject_id", "path"):
        # "NaN"/"None"/"null" are a missing value written out by a dataframe library, not an id:
        # as an id they would merge every such image into one study (or patient)
        bad = (df[col].is_null() | (df[col].str.strip_chars() == "")
               | df[col].str.strip_chars().str.to_lowercase().is_in(list(MISSING_WORDS)))
        if bad.any():
            row, image_id = _first_bad_row(df, bad)
            raise ManifestError(f"{where}row {row} (image_id {image_id}), column {col}: empty value "
                                f"({df[col][row - 1]!r}); every image needs a {col}")

    dup = ~df["image_id"].is_first_distinct()
    if dup.any():
        row, image_id = _first_bad_row(df, dup)
        first = int((df["image_id"] == image_id).arg_true()[0]) + 1
        raise ManifestError(f"{where}row {row}, column image_id: duplicate image_id {image_id!r} "
                            f"(first at row {first}); image ids must be unique")

    bad = ~df["view"].is_in(list(VIEWS)) | df["view"].is_null()
    if bad.any():
        row, image_id = _first_bad_row(df, bad)
        raise ManifestError(f"{where}row {row} (image_id {image_id}), column view: unknown view "
                            f"{df['view'][row - 1]!r}; use one of {', '.join(VIEWS)}")

    bad = ~(df["split"].is_null() | df["split"].is_in(list(SPLITS) + [""]))
    if bad.any():
        row, image_id = _first_bad_row(df, bad)
        raise ManifestError(f"{where}row {row} (image_id {image_id}), column split: unknown split "
                            f"{df['split'][row - 1]!r}; use train, val, test or leave it empty")
    df = df.with_columns(pl.when(pl.col("split") == "").then(None).otherwise(pl.col("split"))
                         .alias("split"))

    cast = []
    for c in classes:
        values = df[c]
        if values.dtype == pl.Utf8 or values.dtype == pl.String:
            stripped = values.str.strip_chars()
            numeric = stripped.cast(pl.Float64, strict=False)
            bad = numeric.is_null() & stripped.is_not_null() & (stripped != "")
            if bad.any():
                row, image_id = _first_bad_row(df, bad)
                raise ManifestError(f"{where}row {row} (image_id {image_id}), column {c!r}: label "
                                    f"{values[row - 1]!r} is not a number; use 1, 0 or leave it empty")
            values = numeric
        elif not values.dtype.is_numeric() and values.dtype != pl.Null:
            raise ManifestError(f"{where}column {c!r} has type {values.dtype}; labels must be 1, 0 or empty")
        values = values.cast(pl.Float64)
        values = values.fill_nan(None)
        if soft:
            bad = values.is_not_null() & ((values < 0) | (values > 1))
            allowed = "a probability in [0, 1]"
        else:
            bad = values.is_not_null() & ~values.is_in([0.0, 1.0])
            allowed = ("1, 0 or empty (soft labels in (0, 1) are pseudo labels: only train-backbone and "
                       "extract-features take them, from `chx pseudo-label`)")
        if bad.any():
            row, image_id = _first_bad_row(df, bad)
            raise ManifestError(f"{where}row {row} (image_id {image_id}), column {c!r}: label "
                                f"{values[row - 1]} is not allowed; use {allowed}")
        cast.append(values.cast(LABEL_DTYPE).alias(c))
    if cast:
        df = df.with_columns(cast)

    per_study = df.group_by("study_id").len()
    crowded = per_study.filter(pl.col("len") > MAX_IMAGES_PER_STUDY)
    if crowded.height:
        study = crowded["study_id"][0]
        row, image_id = _first_bad_row(df, df["study_id"] == study)
        raise ManifestError(f"{where}row {row} (image_id {image_id}), column study_id: study {study!r} "
                            f"has {crowded['len'][0]} images (more than {MAX_IMAGES_PER_STUDY}); a "
                            f"study is one exam of one patient: check how study_id is built")

    if classes:
        # All images of a study must carry the same labels (labels are per study). Compare each
        # image's label vector with its study's first image (null == null).
        firsts = df.group_by("study_id", maintain_order=True).agg(
            [pl.col(c).first().alias(f"__first_{c}") for c in classes])
        joined = df.select(["study_id", *classes]).join(firsts, on="study_id", how="left",
                                                         maintain_order="left")
        for c in classes:
            a, b = joined[c], joined[f"__first_{c}"]
            bad = (a.is_null() != b.is_null()) | (a.is_not_null() & b.is_not_null() & (a != b))
            bad = bad.fill_null(False)
            if bad.any():
                row, image_id = _first_bad_row(df, bad)
                raise ManifestError(
                    f"{where}row {row} (image_id {image_id}), column {c!r}: study "
                    f"{df['study_id'][row - 1]!r} has images with different labels; labels are per "
                    f"study, so give all its images the same values")

        # A subject's studies must stay in one split; a study's images too.
        for key in ("study_id", "subject_id"):
            n_splits = df.group_by(key).agg(pl.col("split").n_unique().alias("n"))
            leaked = n_splits.filter(pl.col("n") > 1)
            if leaked.height:
                value = leaked[key][0]
                mask = (df[key] == value)
                row, image_id = _first_bad_row(df, mask)
                raise ManifestError(
                    f"{where}row {row} (image_id {image_id}), column split: {key} {value!r} appears "
                    f"in more than one split; split by patient (`chx prepare ... --val-fraction`)")
    return df


def read_manifest(path: str | os.PathLike, *, soft: bool = False, require_labels: bool = True) -> pl.DataFrame:
    """Read and validate a manifest (Parquet, or CSV by suffix). Labels must be 1, 0 or empty unless
    ``soft`` (pseudo labels in [0, 1]: what train-backbone and extract-features accept)."""
    path = Path(path)
    if not path.is_file():
        raise ChxError(f"manifest {path} does not exist; make one with `chx prepare`")
    try:
        if path.suffix.lower() in {".csv", ".gz"} or path.name.lower().endswith(".csv.gz"):
            df = pl.read_csv(path, infer_schema_length=0)  # all strings; validate() casts
        else:
            df = pl.read_parquet(path)
    except (pl.exceptions.PolarsError, OSError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ManifestError(f"{path}: cannot be read as a {'CSV' if path.suffix.lower() == '.csv' else 'Parquet'} "
                            f"table ({first})") from None
    if df.width == 1 and any(sep in df.columns[0] for sep in (";", "\t", "|")):
        sep = next(sep for sep in (";", "\t", "|") if sep in df.columns[0])
        raise ManifestError(f"{path}: the header is one column {df.columns[0][:60]!r}: the file looks "
                            f"{'tab' if sep == chr(9) else repr(sep)}-separated; chx reads comma-separated CSV "
                            f"(or Parquet): convert it, e.g. with polars.read_csv(path, separator={sep!r})")
    return validate(df, source=str(path), soft=soft, require_labels=require_labels)


def file_sha256(path: str | os.PathLike) -> str:
    """sha256 of a file's bytes (manifests are recorded by it in checkpoints and stores)."""
    import hashlib

    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def soft_label_count(df: pl.DataFrame) -> int:
    """How many labels lie strictly between 0 and 1 (pseudo labels)."""
    return int(sum(((df[c] > 0) & (df[c] < 1)).sum() for c in class_columns(df)))

def write_manifest(df: pl.DataFrame, path: str | os.PathLike, *,
                   images_root: str | os.PathLike | None = None) -> Path:
    """Write a manifest atomically: Parquet unless the name ends in .csv. A Parquet manifest records
    ``images_root`` (the ``--images`` of `chx prepare`) in its metadata (:func:`images_root`)."""
    path = Path(path)
    with atomic_path(path) as tmp:
        if path.suffix.lower() == ".csv":
            df.write_csv(tmp)
        elif images_root is not None:
            df.write_parquet(tmp, metadata={IMAGES_ROOT_KEY: json.dumps(_root_record(images_root, path))})
        else:
            df.write_parquet(tmp)
    return path


# The Parquet metadata key of a manifest's images root: {"given": the path as given to `chx prepare
# --images`, "relative": the same folder relative to the manifest's folder (null where there is none,
# e.g. another drive)}.
IMAGES_ROOT_KEY = "chx.images_root"


def _root_record(root: str | os.PathLike, manifest: Path) -> dict:
    try:
        relative = os.path.relpath(Path(root).resolve(), manifest.resolve().parent)
    except ValueError:
        relative = None
    return {"given": str(root), "relative": relative}


def portable_path(path: str | os.PathLike, *roots: str | os.PathLike | None, keep: int = 1) -> str:
    """``path`` as an output meant to be shared (a model card, explain.json) may show it: relative to
    the first of ``roots`` that holds it; else a relative path that does not climb out ('..') as
    given; else its last ``keep`` parts (``keep=2``: a checkpoint's run folder and name), or its
    name alone where those would name the home directory. Never an absolute path: the home and
    data directories of the machine that wrote it stay out. URLs (fsspec stores) are kept."""
    text = str(path)
    if "://" in text and not text.startswith("file://"):
        return text
    p = Path(text.removeprefix("file://"))
    for root in roots:
        if root is None:
            continue
        try:
            return p.resolve().relative_to(Path(root).resolve()).as_posix() or "."
        except (ValueError, OSError, RuntimeError):
            continue
    if not p.is_absolute() and ".." not in p.parts:
        return p.as_posix()
    home = Path.home()
    if keep > 1 and len(p.parts) > keep and p.parents[keep - 2] not in (home, *home.parents):
        return Path(*p.parts[-keep:]).as_posix()
    return p.name


def recorded_images_root(manifest: str | os.PathLike) -> dict | None:
    """The images root a Parquet manifest records ({"given", "relative"}); None for a CSV manifest,
    one prepared without ``--images`` or one that cannot be read."""
    manifest = Path(manifest)
    if manifest.suffix.lower() in {".csv", ".gz"} or not manifest.is_file():
        return None
    try:
        record = json.loads(pl.read_parquet_metadata(manifest).get(IMAGES_ROOT_KEY) or "null")
    except (pl.exceptions.PolarsError, OSError, ValueError):
        return None
    return record if isinstance(record, dict) and record.get("given") else None


def images_root(manifest: str | os.PathLike, given: str | os.PathLike | None = None) -> Path:
    """The images root of ``manifest``: ``given`` (``--images``) when given, else the one `chx prepare
    --images` recorded in it: an absolute path as given, else the path relative to the manifest's
    folder (it travels with a manifest moved together with its images), else as given (relative to
    the working directory). ChxError (one line) when none is recorded or it no longer exists."""
    if given is not None:
        return Path(given)
    record = recorded_images_root(manifest)
    if record is None:
        raise ChxError(f"{manifest} records no images root (prepared without --images, or a CSV "
                       f"manifest); give --images ROOT")
    as_given = Path(record["given"])
    candidates = [as_given] if as_given.is_absolute() else []
    if record.get("relative"):
        candidates.append(Path(manifest).parent / record["relative"])
    candidates.append(as_given)
    for folder in candidates:
        if folder.is_dir():
            return folder
    raise ChxError(f"{manifest}: its images root {record['given']} (recorded by `chx prepare --images`) "
                   f"no longer exists; give --images ROOT")


def summarize(df: pl.DataFrame) -> dict:
    """Counts used by `chx prepare` and the tests: images, studies, subjects, multi-view studies,
    per-split images and per-class positives (value 1; soft labels are not counted)."""
    views_per_study = df.group_by("study_id").len()
    classes = class_columns(df)
    return {
        "images": df.height,
        "studies": df["study_id"].n_unique(),
        "subjects": df["subject_id"].n_unique(),
        "multi_view_studies": int((views_per_study["len"] > 1).sum()),
        "splits": {str(k): int(v) for k, v in
                   df.group_by("split").len().sort("split").iter_rows()},
        "positives": {c: int((df[c] == 1).sum()) for c in classes},
        "annotated": {c: int(df[c].is_not_null().sum()) for c in classes},
    }
