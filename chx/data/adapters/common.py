"""Helpers shared by the dataset adapters: declared options, notes for the user, reading native
tables, mapping views (through :mod:`chx.data.views`), parsing and harmonising labels, combining
labels per study, and finding image files under an images root.

Everything works on whole columns (polars expressions); nothing loops over rows.
"""

from __future__ import annotations

import difflib
import os
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

import polars as pl

from chx.data.classes import NAMED_CLASS_LISTS, class_key
from chx.data.manifest import LABEL_DTYPE, build_manifest, validate
from chx.data.views import canonical_view_expr
from chx.errors import ChxError

# What an adapter tells the user besides the manifest (rows dropped and why, views that became
# OTHER, images found under --images): one line each, printed by `chx prepare`.
Notes = list[str]


@dataclass(frozen=True)
class AdapterOption:
    """An option an adapter takes, declared by the adapter so that `chx prepare` can offer it.

    ``name`` is the Python keyword (``min_readers``; on the command line ``--min-readers``);
    ``type`` is str, int, float or bool (a flag); ``choices`` limits a str; ``minimum`` bounds an
    int or float from below; ``multiple`` takes the option several times (a tuple of values);
    ``default_text`` is shown as the default in ``--help`` where the value itself says little
    (an empty tuple). Two adapters that take the same option declare it identically.
    """

    name: str
    type: type
    default: object
    help: str
    choices: tuple[str, ...] | None = None
    multiple: bool = False
    minimum: float | None = None
    metavar: str | None = None
    default_text: str | None = None

    @property
    def flag(self) -> str:
        return "--" + self.name.replace("_", "-")


UNCERTAIN_POLICIES: dict[str, float | None] = {"ignore": None, "ones": 1.0, "zeros": 0.0}
UNCERTAIN = AdapterOption(
    "uncertain", str, "ignore", "what -1 (uncertain) becomes: null (ignore), 1 (ones) or 0 (zeros).",
    choices=tuple(UNCERTAIN_POLICIES))


def uncertain_value(policy: str) -> float | None:
    """The label value -1 becomes under an ``--uncertain`` policy; ChxError for an unknown one."""
    if policy not in UNCERTAIN_POLICIES:
        raise ChxError(f"--uncertain {policy!r}: use one of {', '.join(UNCERTAIN_POLICIES)}")
    return UNCERTAIN_POLICIES[policy]


def note(notes: Notes | None, line: str) -> None:
    """Add one line for the user (adapters run without notes in tests and library use)."""
    if notes is not None:
        notes.append(line)


def count_listing(pairs: Iterable[tuple[object, int]], limit: int = 6) -> str:
    """``"LAO 5, blank 4, ..."`` from (value, count) pairs, largest first (blank for '' / None)."""
    pairs = sorted(((("blank" if v in (None, "") else str(v)), int(n)) for v, n in pairs),
                   key=lambda p: (-p[1], p[0]))
    text = ", ".join(f"{v} {n:,}" for v, n in pairs[:limit])
    return text + (", ..." if len(pairs) > limit else "")


def map_views(native: pl.Series, notes: Notes | None, *, column: str) -> pl.Series:
    """Native view strings -> canonical views (:func:`chx.data.views.canonical_view_expr`), with a
    note saying how many became OTHER and from which native values."""
    frame = pl.DataFrame({"native": native.cast(pl.Utf8)})
    views = frame.select(canonical_view_expr(pl.col("native")).alias("view"))["view"]
    other = frame.filter(views == "OTHER")
    if other.height:
        counts = other.group_by(pl.col("native").str.strip_chars()).len().iter_rows()
        note(notes, f"{column}: {other.height:,} of {frame.height:,} images became OTHER "
                    f"({count_listing(counts)})")
    return views


def read_table(path: str | os.PathLike, required_columns: Iterable[str], *,
               what: str = "the adapter") -> pl.DataFrame:
    """Read a CSV (or .csv.gz), or a Parquet file, with every column as a string (blank -> null).

    Raises :class:`ChxError` when the file is missing, unreadable, or lacks a required column
    (naming the file, the missing columns and what ``what`` expects; a header that looks split by
    another separator says so).
    """
    path = Path(path)
    required = list(required_columns)
    if not path.is_file():
        kind = "is a folder, not a table" if path.is_dir() else "does not exist"
        raise ChxError(f"{path} {kind}; {what} expects a CSV with columns {', '.join(required)}")
    try:
        if path.suffix.lower() == ".parquet":
            df = pl.read_parquet(path)
            df = df.with_columns([pl.col(c).cast(pl.Utf8).replace("", None) for c in df.columns])
        else:
            df = pl.read_csv(path, infer_schema_length=0)
    except (pl.exceptions.PolarsError, OSError, UnicodeDecodeError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ChxError(f"{path}: cannot be read as a CSV table ({first}); {what} expects a CSV "
                       f"with columns {', '.join(required)}") from None
    missing = [c for c in required if c not in df.columns]
    if missing:
        raise ChxError(f"{path}: missing column(s) {', '.join(repr(c) for c in missing)}; {what} "
                       f"expects a CSV with columns {', '.join(required)} (found: "
                       f"{', '.join(df.columns[:12])}{', ...' if df.width > 12 else ''})"
                       f"{_separator_hint(df.columns)}")
    return df


def _separator_hint(columns: list[str]) -> str:
    """A hint when a one-column header holds another separator (a ';' or tab CSV read as ',')."""
    if len(columns) == 1:
        for sep, name in ((";", "';'"), ("\t", "tabs"), ("|", "'|'")):
            if sep in columns[0]:
                return f"; the header looks separated by {name}, not commas: save it as a comma CSV"
    return ""


def table_columns(path: str | os.PathLike) -> list[str]:
    """The header of a CSV (or .csv.gz) without reading its rows; [] when unreadable."""
    try:
        return pl.read_csv(Path(path), n_rows=0, infer_schema_length=0).columns
    except (pl.exceptions.PolarsError, OSError, UnicodeDecodeError):
        return []


def expand_sources(sources: Iterable[str | os.PathLike], patterns: Iterable[str], *,
                   what: str) -> list[Path]:
    """Files given directly stay; a folder is replaced by its files matching ``patterns`` (glob,
    sorted). Raises :class:`ChxError` for a missing path or a folder without a match."""
    patterns = list(patterns)
    out: list[Path] = []
    for src in map(Path, sources):
        if src.is_dir():
            found = sorted({p for pat in patterns for p in src.glob(pat) if p.is_file()})
            if not found:
                raise ChxError(f"{src}: no {' or '.join(patterns)} in this folder; give {what}")
            out.extend(found)
        elif src.exists():
            out.append(src)
        else:
            raise ChxError(f"{src} does not exist; give {what}")
    if not out:
        raise ChxError(f"no source given; give {what}")
    return out


def reject_options(dataset: str, options: Mapping[str, object]) -> None:
    """Adapters take only their own options; anything else is a user mistake."""
    if options:
        raise ChxError(f"`chx prepare {dataset}` takes no option {', '.join(sorted(options))}")


def parse_labels(table: pl.DataFrame, columns: Iterable[str], source: str | os.PathLike, *,
                 minus_one: float | None | str = "error") -> pl.DataFrame:
    """Native label strings -> Float32 columns of 1, 0 or null (blank).

    ``minus_one`` is what -1 becomes (1.0, 0.0 or None); "error" rejects it like any other value.
    Raises :class:`ChxError` naming the file, data row and column of the first bad value.
    """
    out = []
    for c in columns:
        raw = table[c].cast(pl.Utf8).str.strip_chars().replace("", None)
        num = raw.cast(pl.Float64, strict=False)
        bad = raw.is_not_null() & num.is_null()                      # not a number
        if minus_one != "error":
            num = pl.select(pl.when(num == -1.0).then(pl.lit(minus_one, dtype=pl.Float64))
                            .otherwise(num).alias(c)).to_series()
        bad = (bad | (num.is_not_null() & ~num.is_in([0.0, 1.0]))).fill_null(False)
        if bad.any():
            row = int(bad.arg_true()[0])
            allowed = "1, 0, -1 or empty" if minus_one != "error" else "1, 0 or empty"
            raise ChxError(f"{source}: data row {row + 1}, column {c!r}: label {table[c][row]!r} is "
                           f"not {allowed}")
        out.append(num.cast(LABEL_DTYPE).alias(c))
    return pl.DataFrame(out) if out else pl.DataFrame()


def harmonise(native: pl.DataFrame, target: list[str] | None,
              synonyms: Mapping[str, str | None], *, dataset: str = "this dataset") -> pl.DataFrame:
    """Map a dataset's class columns (values 1/0/null) onto a target class list.

    A native column is matched to a target class by :func:`~chx.data.classes.class_key`, under
    its own name and under its synonym (``synonyms``: native name -> target name, matched by
    class_key too); a synonym of None keeps the native class off every target list (it is kept
    only with ``target=None``). Several native columns landing on one target class are combined:
    1 if any is 1, else 0 if any is 0, else null. A target class no native column maps to is
    null (not annotated), never 0. ``target=None`` keeps the dataset's own classes as they are.

    Returns the label columns (Float32), row-aligned with ``native``. Raises :class:`ChxError`
    when no target class is annotated at all.
    """
    if target is None:
        return native.select(pl.all().cast(LABEL_DTYPE))
    syn = {class_key(k): v for k, v in synonyms.items()}
    by_target: dict[str, list[str]] = {}
    for col in native.columns:
        key = class_key(col)
        if key in syn and syn[key] is None:
            continue
        for name_key in dict.fromkeys([key, class_key(syn.get(key) or col)]):
            by_target.setdefault(name_key, []).append(col)
    exprs, matched = [], 0
    for t in target:
        cols = by_target.get(class_key(t))
        if cols:
            matched += 1
            expr = pl.max_horizontal(cols) if len(cols) > 1 else pl.col(cols[0])
        else:
            expr = pl.lit(None)
        exprs.append(expr.cast(LABEL_DTYPE).alias(t))
    if not matched:
        raise ChxError(f"none of the target classes ({', '.join(target[:6])}"
                       f"{', ...' if len(target) > 6 else ''}) is annotated by {dataset}, whose classes "
                       f"are {', '.join(native.columns[:8])}{', ...' if native.width > 8 else ''}; "
                       f"use --classes data for its own classes")
    _refuse_typos([t for t in target if class_key(t) not in by_target],
                  [*native.columns, *(v for v in synonyms.values() if v)], dataset)
    return native.select(exprs)


def _refuse_typos(unannotated: list[str], native_names: list[str], dataset: str) -> None:
    """A target class the dataset does not annotate stays null when it is a known class name (on a
    named list, or the dataset's own); one that is only close to a known name is a typo: ChxError
    with difflib's "did you mean". A name close to nothing known is a new class (null)."""
    spelling: dict[str, str] = {}
    for name in (*native_names, *(n for names in NAMED_CLASS_LISTS.values() for n in names)):
        spelling.setdefault(class_key(name), name)
    for name in unannotated:
        key = class_key(name)
        if key in spelling:
            continue
        close = difflib.get_close_matches(key, list(spelling), n=1, cutoff=0.8)
        if close:
            raise ChxError(f"--classes: {name!r} is neither a class {dataset} annotates nor a known "
                           f"class name; did you mean {spelling[close[0]]!r}?")


def combine_per_study(study_id: pl.Series, labels: pl.DataFrame,
                      notes: Notes | None = None) -> pl.DataFrame:
    """Give every image its study's labels: 1 if any image of the study is 1, else 0 if any is 0,
    else null. (The manifest requires one label vector per study.) With ``notes``, says how many
    studies had images with different labels."""
    if labels.width == 0:
        return labels
    if notes is not None:
        differ = (labels.with_columns(study_id.alias("__study")).group_by("__study")
                  .agg(pl.any_horizontal([pl.col(c).n_unique() > 1 for c in labels.columns]).alias("d"))
                  ["d"].sum())
        if differ:
            note(notes, f"labels: studies whose images had different labels: {differ:,}; each takes "
                        f"the per-class max over its images (1 if any image is 1)")
    cols = labels.columns
    return (labels.with_columns(study_id.alias("__study"))
            .select([pl.col(c).max().over("__study").alias(c) for c in cols]))


def _suffixes(paths: pl.DataFrame, col: str, depth: int, strip_ext: bool) -> pl.DataFrame:
    """Long table (row index, key, depth, n): every trailing run of 1..depth components of a path
    of n components."""
    parts = pl.col(col).str.split("/")
    frames = []
    for k in range(1, depth + 1):
        key = parts.list.slice(-k, k).list.join("/")
        if strip_ext:
            key = key.str.replace(r"\.[^./]*$", "")
        frames.append(paths.select(pl.col("__row"), key.alias("__key"), pl.lit(k).alias("__depth"),
                                   parts.list.len().alias("__n"))
                      .filter(pl.col("__n") >= k))
    return pl.concat(frames)


def _match(wanted: pl.DataFrame, files: pl.DataFrame, strip_ext: bool) -> pl.DataFrame:
    """(row, rel) for manifest paths matching a file: one of the two is a trailing run of whole
    components of the other, that run names no other file, and the longest such run wins."""
    depth = max(int(wanted["__p"].str.count_matches("/").max() or 0),
                int(files["rel"].str.count_matches("/").max() or 0)) + 1
    fkeys = _suffixes(files.rename({"rel": "__p"}).with_row_index("__row"), "__p", depth, strip_ext)
    fkeys = (fkeys.join(files.with_row_index("__row"), on="__row")
             .group_by("__key", "__depth")
             .agg(pl.col("rel").first(), pl.col("__n").first().alias("__nf"), pl.len().alias("__count"))
             .filter(pl.col("__count") == 1).drop("__count"))
    wkeys = _suffixes(wanted, "__p", depth, strip_ext)
    return (wkeys.join(fkeys, on=["__key", "__depth"])
            .filter((pl.col("__depth") == pl.col("__n")) | (pl.col("__depth") == pl.col("__nf")))
            .sort("__depth", descending=True).unique("__row", keep="first")
            .select("__row", "rel"))


def list_images(root: Path) -> pl.DataFrame:
    """Every (non-hidden) file under ``root``, as a one-column table ``rel`` (posix, relative).

    Links to folders are followed, but each folder is listed once, by its (device, inode): the
    real folders first, then linked ones not seen yet (so a link to a folder of the tree adds no
    second name for its files). A link back into the walk (``a -> .``, a link to ``..`` or to any
    folder holding the root, a bind mount of a parent) would list the tree forever: it is skipped."""
    rels: list[str] = []
    seen: set[tuple[int, int]] = set()
    real_root = os.path.realpath(root)
    pending = [(str(root), "")]            # folders to walk: (path, its name relative to root)
    while pending:
        top, top_rel = pending.pop(0)
        if top_rel:
            target = os.path.realpath(top)
            if os.path.commonpath([real_root, target]) == target:
                continue                    # a link to the root or a folder above it (`/` too)
        for dirpath, dirnames, filenames in os.walk(top):
            try:
                st = os.stat(dirpath)
            except OSError:
                dirnames[:] = []
                continue
            if (st.st_dev, st.st_ino) in seen:
                dirnames[:] = []
                continue
            seen.add((st.st_dev, st.st_ino))
            base = os.path.relpath(dirpath, top)
            rel = top_rel + ("" if base == "." else base.replace(os.sep, "/") + "/")
            keep = []
            for d in sorted(dirnames):      # a deterministic walk: which name a linked folder gets
                if d.startswith("."):
                    continue
                if os.path.islink(os.path.join(dirpath, d)):
                    pending.append((os.path.join(dirpath, d), f"{rel}{d}/"))
                else:
                    keep.append(d)
            dirnames[:] = keep
            rels.extend(rel + f for f in filenames if not f.startswith("."))
    return pl.DataFrame({"rel": rels}, schema={"rel": pl.Utf8})


def resolve_paths(manifest: pl.DataFrame, images_root: str | os.PathLike | None,
                  only_existing: bool = False) -> tuple[pl.DataFrame, int]:
    """Find each image's file under ``images_root`` and make ``path`` relative to it.

    One walk of the root lists its files. A manifest path matches a file when one of the two ends
    with the other (whole components: ``x.png`` matches ``images_001/images/x.png``, and
    ``CheXpert-v1.0-small/train/p1/s1/v1.jpg`` matches ``train/p1/s1/v1.jpg`` under a root one
    level down) and no other file fits as well; the longest match wins. So NIH's nested folders,
    flat folders, and a root above or below the one the table assumes all work, while a bare
    file name shared by many files (CheXpert's ``view1_frontal.jpg``) never matches the wrong one.
    A path with no match is then tried without its extension (``.dicom`` converted to ``.png``).

    Returns ``(manifest, missing)``: unmatched rows are dropped with ``only_existing=True`` and
    otherwise kept with their path unchanged; ``missing`` counts them. Without a root the manifest
    is returned as is.
    """
    if images_root is None:
        return manifest, 0
    root = Path(images_root)
    if not root.is_dir():
        raise ChxError(f"--images: {root} is not a folder; give the folder the images are under")
    files = list_images(root)
    wanted = manifest.select(
        pl.col("path").cast(pl.Utf8).str.replace_all(r"\\", "/").str.strip_prefix("./")
        .str.strip_chars_start("/").alias("__p")).with_row_index("__row")
    found = _match(wanted, files, strip_ext=False) if files.height else \
        pl.DataFrame(schema={"__row": pl.UInt32, "rel": pl.Utf8})
    rest = wanted.join(found, on="__row", how="anti")
    if rest.height and files.height:
        found = pl.concat([found, _match(rest, files, strip_ext=True)])
    resolved = (wanted.join(found, on="__row", how="left").sort("__row")["rel"])
    missing = int(resolved.is_null().sum())
    out = manifest.with_columns(resolved.fill_null(manifest["path"].cast(pl.Utf8)).alias("path"))
    if only_existing:
        out = out.filter(resolved.is_not_null())
    return out, missing


def locate(manifest: pl.DataFrame, images: str | os.PathLike | None, only_existing: bool,
           notes: Notes | None, *, source: str) -> pl.DataFrame:
    """:func:`resolve_paths` for an adapter: notes how many of the listed images exist under
    ``images`` and raises :class:`ChxError` when none does (a wrong root, found at prepare time
    rather than at training)."""
    if images is None:
        return manifest
    out, missing = resolve_paths(manifest, images, only_existing)
    n = manifest.height
    if missing == n:
        raise ChxError(f"none of the {n:,} images listed in {source} was found under {images}; "
                       f"check --images (the folder holding the images, or one above it)")
    line = f"images: {n - missing:,} of {n:,} found under {images}"
    if missing:
        line += (f"; {missing:,} missing, dropped (--only-existing)" if only_existing else
                 f"; {missing:,} missing, kept with the table's path (--only-existing drops them)")
    note(notes, line)
    return out


def finish(ids: pl.DataFrame, native: pl.DataFrame, target: list[str] | None,
           synonyms: Mapping[str, str | None], *, dataset: str, source: str,
           images: str | os.PathLike | None = None, only_existing: bool = False,
           per_study: bool = True, notes: Notes | None = None,
           located: Callable[[pl.DataFrame], pl.DataFrame] | None = None) -> pl.DataFrame:
    """The common tail of every adapter: harmonise the native labels onto ``target``, combine
    them per study (``per_study``), assemble, find the images (:func:`locate`), apply ``located``
    (what needs the image files, e.g. views from DICOM headers) and validate."""
    labels = harmonise(native, target, synonyms, dataset=dataset)
    if per_study:
        labels = combine_per_study(ids["study_id"].cast(pl.Utf8), labels, notes)
    df = build_manifest(ids, labels)
    df = locate(df, images, only_existing, notes, source=source)
    if located is not None:
        df = located(df)
    return validate(df, source=f"{dataset} manifest from {source}")
