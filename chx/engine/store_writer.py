"""Filling a store in whole shards: what extract-features (feature maps) and cache-images (images)
share. Which writer owns which shards (``--shard i/n``, ``--shard auto``: SLURM arrays or torchrun
ranks), store creation serialised between writers of one machine, ``--repair`` (verify, then mark
the damaged shards missing), the rows this writer still has to do, the write loop (a DataLoader
feeding a :class:`chx.store.ShardBuffer` whose complete shards a background thread writes, two queued),
and the completeness mark once every shard is done.
"""

from __future__ import annotations

import collections
import contextlib
import fcntl
import os
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import polars as pl
import torch
from tqdm.auto import tqdm

from chx.errors import ChxError
from chx.store import ShardBuffer, backend_class, local_path, open_store, stopped_answering
from chx.workers import batches


def parse_shard(shard: str | None, env=None) -> tuple[int, int]:
    """'i/n' -> (i, n); torchrun's RANK/WORLD_SIZE when not given; 'auto': a SLURM array task's
    (SLURM_ARRAY_TASK_ID - SLURM_ARRAY_TASK_MIN of SLURM_ARRAY_TASK_COUNT), else torchrun's, else ChxError."""
    env = os.environ if env is None else env
    if shard is None:
        return int(env.get("RANK", "0")), int(env.get("WORLD_SIZE", "1"))
    if shard.strip().lower() == "auto":
        return _auto_shard(env)
    try:
        i, n = (int(x) for x in shard.split("/"))
    except ValueError:
        raise ChxError(f"--shard {shard!r}: write it as i/n, e.g. 0/4") from None
    if not (n >= 1 and 0 <= i < n):
        raise ChxError(f"--shard {shard}: i must be in 0..n-1 (e.g. 0/{max(n, 2)} .. {max(n, 2) - 1}/{max(n, 2)})")
    return i, n


def _auto_shard(env) -> tuple[int, int]:
    """--shard auto. SLURM arrays: task ids run from SLURM_ARRAY_TASK_MIN (not always 0, e.g.
    --array=1-8) with step SLURM_ARRAY_TASK_STEP (--array=0-15:2), SLURM_ARRAY_TASK_COUNT tasks in
    all; an id list (--array=1,4,9) has no fixed step, so it is refused. Else torchrun's RANK/WORLD_SIZE."""
    def number(name):
        try:
            return int(env[name])
        except ValueError:
            raise ChxError(f"--shard auto: {name}={env[name]!r} is not a whole number") from None

    if env.get("SLURM_ARRAY_TASK_ID") not in (None, ""):
        if env.get("SLURM_ARRAY_TASK_COUNT") in (None, ""):
            raise ChxError("--shard auto: SLURM_ARRAY_TASK_ID is set but SLURM_ARRAY_TASK_COUNT is not; run it "
                           "as a SLURM array job (sbatch --array=0-N) or give --shard i/n")
        task, count = number("SLURM_ARRAY_TASK_ID"), number("SLURM_ARRAY_TASK_COUNT")
        low = number("SLURM_ARRAY_TASK_MIN") if env.get("SLURM_ARRAY_TASK_MIN") not in (None, "") else 0
        step = number("SLURM_ARRAY_TASK_STEP") if env.get("SLURM_ARRAY_TASK_STEP") not in (None, "") else 1
        i, rest = divmod(task - low, max(step, 1))
        if count < 1 or rest or not 0 <= i < count:
            raise ChxError(f"--shard auto: SLURM array task {task} is not one of {count} evenly spaced tasks from "
                           f"{low} (step {step}); use --array=0-{max(count - 1, 0)} (a range, not a list) or give "
                           f"--shard i/n")
        return i, count
    if env.get("RANK") not in (None, "") and env.get("WORLD_SIZE") not in (None, ""):
        i, n = number("RANK"), number("WORLD_SIZE")
        if n < 1 or not 0 <= i < n:
            raise ChxError(f"--shard auto: RANK={i} is not in 0..WORLD_SIZE-1 (WORLD_SIZE={n})")
        return i, n
    raise ChxError("--shard auto: neither a SLURM array task (SLURM_ARRAY_TASK_ID/SLURM_ARRAY_TASK_COUNT) nor "
                   "torchrun (RANK/WORLD_SIZE) is set; run it as a SLURM array task or under torchrun, or give "
                   "--shard i/n")


def check_writers(store_path: str, shard_n: int, repair: bool, work: str = "extraction") -> None:
    """One line when this many writers cannot write ``store_path``: --repair takes one process, an
    HDF5 file one writer."""
    if repair and shard_n > 1:
        raise ChxError("--repair runs in one process (it verifies the whole store first); run it without "
                       "--shard/torchrun")
    if shard_n > 1 and not backend_class(store_path).supports_parallel_writers:
        raise ChxError(f"HDF5 stores take one writer: --shard/torchrun cannot write {store_path}; "
                       f"use a Zarr store (a folder path, e.g. features.zarr) for parallel {work}")


@contextlib.contextmanager
def creation_lock(store: str):
    """Serialise store creation between shard processes on one machine (local paths)."""
    path = local_path(store)
    if path is None:
        yield
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.parent / f".{path.name}.lock", "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def repair_shards(store, echo, work: str = "extract") -> None:
    """--repair: verify the store and mark its damaged shards missing (this run writes them again)."""
    report = store.verify()
    store.mark_shards_missing(report.bad_shards)
    echo(f"repair: {len(report.bad_shards):,} damaged shard(s) of {store.n_shards:,} to {work} again"
         + (f" ({report.summary()})" if len(report.bad_shards) else ""))


def writer_todo(store, df: pl.DataFrame, shard_i: int, shard_n: int):
    """This writer's shards not done yet, their store rows in store order, and the manifest rows of
    those (``df``: every image of the store, any order) -> (shards, rows, table)."""
    mine = np.intersect1d(store.shards_for_writer(shard_i, shard_n), store.missing_shards())
    todo_rows = (np.concatenate([np.arange(*store.shard_rows(s)) for s in mine]) if len(mine)
                 else np.zeros(0, dtype=np.int64))
    df_pos = np.empty(store.n_images, dtype=np.int64)
    df_pos[store.image_index(df["image_id"].to_list())] = np.arange(df.height)   # store row -> manifest row
    return mine, todo_rows, df.select(pl.all().gather(df_pos[todo_rows].tolist()))


@contextlib.contextmanager
def write_errors(path, what: str = "feature store", done: str = "the images written so far"):
    """A failed write into a store or image cache (disk full, permissions, an object store that
    stopped answering) is one clear line; what was written before stays marked done, so rerunning the
    same command continues from there."""
    try:
        yield
    except Exception as e:
        lost = stopped_answering(path, e)
        if lost is not None:
            raise lost from None
        if not isinstance(e, OSError):
            raise
        raise ChxError(f"could not write to the {what} {path}: {e.strerror or e}; {done} are kept: free space "
                       f"(or fix the cause) and rerun the same command to continue") from None


def fill_shards(store, shards, todo_rows: np.ndarray, loader, maps_of, desc: str,
                in_flight: int = 2) -> tuple[int, float]:
    """Write ``shards`` from ``loader`` (items of ``todo_rows`` in order, batches with an ``index``
    into it); ``maps_of(batch)`` -> (maps, flipped maps or None) as numpy. The main thread fills the
    shard buffers; each complete shard goes to a writer thread, up to ``in_flight`` shards queued
    (memory: those plus the shard filling), so writing hides behind ``maps_of`` while the disk keeps
    up. (With one write in flight and the batches waiting for it, an H200 extracted at 0.36x of its
    bare forward; benchmarks/results/gpu-bench-2026-12-04-run2.json.) Returns (images written, seconds)."""
    written = 0
    queued: collections.deque = collections.deque()
    t0 = time.perf_counter()
    with ThreadPoolExecutor(max_workers=1) as writer, torch.no_grad(), batches(loader) as it:
        # the workers end on any exit; the writer then finishes the shards already complete

        def done_one() -> None:
            nonlocal written
            written += _rows_in(store, [queued.popleft().result()])

        def write(s: int, maps, flips) -> None:
            while len(queued) >= in_flight:
                done_one()
            queued.append(writer.submit(_write_shard, store, s, maps, flips))

        buffer = ShardBuffer(store, shards, write=write)
        for batch in tqdm(it, desc=desc, unit="batch", leave=False, disable=None):
            maps, flips = maps_of(batch)
            buffer.add(todo_rows[batch["index"].numpy()], maps, flips)
            while queued and queued[0].done():     # a failed write stops the run now, not a shard later
                done_one()
        while queued:
            done_one()
    return written, time.perf_counter() - t0


def _write_shard(store, s: int, maps, flips) -> int:
    store.write_shard(s, maps, flips)
    return s


def _rows_in(store, shards: list[int]) -> int:
    return sum(b - a for a, b in map(store.shard_rows, shards))


def mark_if_complete(store_path: str) -> int:
    """Reopen the store, mark it complete when every shard is done; returns the images still missing."""
    with open_store(store_path, mode="r+") as store:
        remaining = len(store.missing_rows())
        if remaining == 0 and not store.complete:
            store.mark_complete()
    return remaining
