"""The training loop shared by both stages (one trainer, not two copies).

Read :func:`fit` top to bottom: distributed set-up, optimizer, per-step warm-up + cosine schedule,
resume, then the loop (gradient accumulation, mixed precision, clipping, EMA, validation every
``val_every`` of an epoch, checkpoints). A stage supplies the model, the training dataset and
sampler, a ``batch_loss`` function and an ``evaluate`` function; nothing else is stage-specific.

Exact resume: the sampler order is a function of (seed, epoch), each item's augmentation is seeded
by its position, and the checkpoint holds model, EMA, optimizer, scheduler, scaler and RNG state,
so losses after ``--resume`` equal those of an uninterrupted run.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import signal
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from chx.data.samplers import EpochSampler
from chx.errors import ChxError
from chx.pipeline.checkpoint import load_checkpoint, save_checkpoint
from chx.pipeline.inference import resolve_device


@dataclass
class TrainConfig:
    """Optimisation options (paper defaults: AdamW 3e-5, wd 0.01, batch 8, 4 validations/epoch)."""

    epochs: float = 6.0
    batch_size: int = 8
    lr: float = 3e-5
    weight_decay: float = 0.01
    warmup: float = 0.05          # fraction of all optimizer steps
    min_lr_ratio: float = 0.01    # cosine ends at lr * min_lr_ratio
    grad_accum: int = 1
    clip_grad: float = 1.0        # max grad norm; 0 = off
    precision: str = "auto"       # auto (bf16/fp16 on GPU, fp32 on CPU) | bf16 | fp16 | fp32
    ema: float = 0.0              # EMA decay; 0 = off
    val_every: float = 0.25       # validate every this fraction of an epoch
    seed: int = 0
    workers: int = 2
    max_steps: int = 0            # stop after this many optimizer steps (0 = all); schedule unchanged
    log_every: int = 10
    nonfinite: str = "stop"       # stop | skip: what a NaN/inf loss does
    device: str = "auto"

    def validate(self) -> None:
        checks = [
            (self.epochs > 0, "--epochs", "must be > 0"),
            (self.batch_size >= 1, "--batch-size", "must be >= 1"),
            (self.lr > 0, "--lr", "must be > 0"),
            (self.weight_decay >= 0, "--weight-decay", "must be >= 0"),
            (0 <= self.warmup < 1, "--warmup", "must be a fraction in [0, 1)"),
            (self.grad_accum >= 1, "--grad-accum", "must be >= 1"),
            (self.clip_grad >= 0, "--clip-grad", "must be >= 0 (0 = off)"),
            (0 <= self.ema < 1, "--ema", "must be a decay in [0, 1) (0 = off)"),
            (0 < self.val_every <= 1e6, "--val-every", "must be > 0 (a fraction of an epoch)"),
            (self.workers >= 0, "--workers", "must be >= 0"),
            (self.precision in ("auto", "bf16", "fp16", "fp32"), "--precision", "must be auto, bf16, fp16 or fp32"),
            (self.nonfinite in ("stop", "skip"), "--nonfinite", "must be stop or skip"),
        ]
        for ok, name, what in checks:
            if not ok:
                raise ChxError(f"{name} {getattr(self, name[2:].replace('-', '_'), '')} {what}")


@dataclass
class Distributed:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def setup_distributed(device: str = "auto") -> Distributed:
    """Read torchrun's environment; init the process group once (NCCL on GPU, gloo on CPU)."""
    dev = resolve_device(device)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Distributed(device=dev)
    rank, local = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    if dev.type == "cuda":
        torch.cuda.set_device(local)
        dev = torch.device("cuda", local)
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if dev.type == "cuda" else "gloo")
    return Distributed(rank=rank, world_size=world, local_rank=local, device=dev)


def autocast_dtype(precision: str, device: torch.device) -> torch.dtype | None:
    """Mixed precision on GPU only (bf16 autocast is ~10x slower on CPUs without native bf16)."""
    if device.type != "cuda" or precision == "fp32":
        return None
    if precision == "auto":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return {"bf16": torch.bfloat16, "fp16": torch.float16}[precision]


def lr_lambda(total_steps: int, warmup_steps: int, min_ratio: float) -> Callable[[int], float]:
    """Linear warm-up to 1, then cosine decay to ``min_ratio``; stepped once per optimizer step."""
    def f(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / (warmup_steps + 1)
        progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
        return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))
    return f


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """No weight decay on biases, norms and other 1-D parameters."""
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:
            (no_decay if p.ndim <= 1 else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


class _StopFlag:
    """SIGINT/SIGTERM set a flag; the loop saves last.pt at the next step boundary and returns."""

    def __init__(self):
        self.signal: int | None = None
        self._old = {}

    def __enter__(self):
        for sig in (signal.SIGINT, signal.SIGTERM):
            try:
                self._old[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread
                pass
        return self

    def _handle(self, signum, frame):
        if self.signal is not None:  # second Ctrl-C: stop now
            raise KeyboardInterrupt
        self.signal = signum

    def __exit__(self, *exc):
        for sig, old in self._old.items():
            signal.signal(sig, old)


@dataclass
class FitResult:
    out: Path
    step: int
    best_metric: float | None
    interrupted: int | None = None   # the signal number when stopped by SIGINT/SIGTERM
    last_metrics: dict | None = None


def warn(message: str) -> None:
    """A message for the user on stderr that does not break the progress bars."""
    tqdm.write(message, file=sys.stderr)


def _append_jsonl(path: Path, record: dict) -> None:
    with open(path, "a") as f:
        f.write(json.dumps(record) + "\n")


def fit(model: nn.Module, train_set: Dataset, sampler: EpochSampler,
        batch_loss: Callable[[nn.Module, dict, torch.device], torch.Tensor],
        evaluate: Callable[[nn.Module], dict] | None, cfg: TrainConfig, out: str | Path,
        meta: dict, *, resume: bool = False, overwrite: bool = False,
        ddp: Distributed | None = None, collate_fn=None) -> FitResult:
    """Train ``model`` and write the run folder ``out``.

    ``batch_loss(model, batch, device)`` returns the scalar loss of one batch; ``evaluate(model)``
    returns a dict with at least ``mAP`` (may be None: no validation, best.pt = last.pt).
    ``meta`` goes into every checkpoint and must hold ``kind``, ``model_config`` and ``class_names``.
    """
    cfg.validate()
    out = Path(out)
    ddp = ddp or setup_distributed(cfg.device)
    device = ddp.device
    last_path, best_path = out / "last.pt", out / "best.pt"
    metrics_path = out / "metrics.jsonl"

    if ddp.is_main:
        if last_path.exists() and not (resume or overwrite):
            raise ChxError(f"{out} already holds a run (last.pt); use --resume to continue it or "
                           f"--overwrite to start again")
        if resume and not last_path.exists():
            raise ChxError(f"--resume: {last_path} does not exist; run without --resume to start")
        out.mkdir(parents=True, exist_ok=True)
        if overwrite and not resume:
            for p in (last_path, best_path, metrics_path):
                p.unlink(missing_ok=True)

    # ---- model, optimizer, schedule
    model.to(device)
    if device.type == "cuda":
        model.to(memory_format=torch.channels_last)
    amp_dtype = autocast_dtype(cfg.precision, device)
    scaler = torch.amp.GradScaler("cuda", enabled=amp_dtype == torch.float16)
    optimizer = torch.optim.AdamW(param_groups(model, cfg.weight_decay), lr=cfg.lr)
    batches_per_epoch = sampler.per_rank // cfg.batch_size
    steps_per_epoch = batches_per_epoch // cfg.grad_accum
    if steps_per_epoch < 1:
        raise ChxError(f"the training split has {sampler.num_samples} images: too few for one step of "
                       f"--batch-size {cfg.batch_size} x --grad-accum {cfg.grad_accum}"
                       f"{f' x {ddp.world_size} processes' if ddp.enabled else ''}; lower them")
    total_steps = max(1, math.ceil(cfg.epochs * steps_per_epoch))
    warmup_steps = round(cfg.warmup * total_steps)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lr_lambda(total_steps, warmup_steps, cfg.min_lr_ratio))
    ema = None
    if cfg.ema > 0:
        from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn
        ema = AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(cfg.ema), use_buffers=True)
    val_interval = max(1, round(cfg.val_every * steps_per_epoch))

    # ---- resume
    step, best = 0, None
    if resume:
        ckpt = load_checkpoint(last_path, kind=meta["kind"])
        if list(ckpt["class_names"]) != list(meta["class_names"]):
            raise ChxError(f"--resume: {last_path} was trained on other classes ({len(ckpt['class_names'])}: "
                           f"{', '.join(ckpt['class_names'][:4])}, ...) than this data "
                           f"({len(meta['class_names'])}: {', '.join(meta['class_names'][:4])}, ...); "
                           f"use the same manifest's classes or a new --out")
        if ckpt.get("model_config") != meta.get("model_config"):
            raise ChxError(f"--resume: {last_path} holds a different model configuration; use the "
                           f"same model options or a new --out")
        model.load_state_dict(ckpt["state_dict"])
        optimizer.load_state_dict(ckpt["optimizer"])
        scheduler.load_state_dict(ckpt["scheduler"])
        scaler.load_state_dict(ckpt["scaler"])
        if ema is not None and ckpt.get("ema_state_dict") is not None:
            ema.load_state_dict(ckpt["ema_state_dict"])
        step, best = ckpt["step"], ckpt.get("best_metric")
        per_rank = ckpt["rng"].get("per_rank") or [ckpt["rng"]]
        rng = per_rank[ddp.rank] if len(per_rank) == ddp.world_size else per_rank[0]
        torch.set_rng_state(rng["torch"])
        if device.type == "cuda" and rng.get("cuda") is not None:
            torch.cuda.set_rng_state(rng["cuda"], device)

    train_model = model
    if ddp.enabled:
        train_model = nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None)

    if ddp.is_main:
        (out / "config.json").write_text(json.dumps(
            {"train": asdict(cfg), **{k: v for k, v in meta.items() if k != "model_state"},
             "world_size": ddp.world_size, "steps_per_epoch": steps_per_epoch,
             "total_steps": total_steps}, indent=2, default=str))

    rank_rng: list = []   # every rank's RNG states, gathered before rank 0 writes a checkpoint

    def gather_rng() -> None:
        """All ranks: collect each rank's RNG state, so a resumed DDP run restores its own stream."""
        mine = {"torch": torch.get_rng_state(),
                "cuda": torch.cuda.get_rng_state(device) if device.type == "cuda" else None}
        if ddp.enabled:
            states = [None] * ddp.world_size
            dist.all_gather_object(states, mine)
            rank_rng[:] = states
        else:
            rank_rng[:] = [mine]

    def checkpoint(path: Path, metrics: dict | None):
        state = {**meta, "state_dict": model.state_dict(),
                 "ema_state_dict": ema.state_dict() if ema is not None else None,
                 "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                 "scaler": scaler.state_dict(), "step": step, "best_metric": best,
                 "train_config": asdict(cfg), "metrics": metrics,
                 "rng": {**rank_rng[0], "per_rank": list(rank_rng)}}
        save_checkpoint(state, path)

    def validate() -> dict | None:
        nonlocal best
        metrics = None
        gather_rng()
        if ddp.is_main:
            if evaluate is not None:
                eval_model = ema.module if ema is not None else model
                was_training = eval_model.training
                eval_model.eval()
                with torch.no_grad(), torch.autocast(device.type, dtype=amp_dtype or torch.float32,
                                                     enabled=amp_dtype is not None):
                    metrics = evaluate(eval_model)
                eval_model.train(was_training)
                score = metrics.get("mAP")
                score = float("-inf") if score is None or math.isnan(score) else score
                improved = best is None or score > best
                if improved:
                    best = score
                _append_jsonl(metrics_path, {"kind": "val", "step": step, "epoch": step / steps_per_epoch,
                                             **{k: v for k, v in metrics.items() if k != "per_class"},
                                             "best": improved})
                checkpoint(last_path, metrics)
                if improved:
                    checkpoint(best_path, metrics)
            else:
                checkpoint(last_path, None)
                checkpoint(best_path, None)
        if ddp.enabled:
            dist.barrier()
        return metrics

    # ---- the loop
    if not resume:  # dropout RNG; a resumed run restores it from the checkpoint instead
        torch.manual_seed(cfg.seed + 1_000_003 * ddp.rank)
    model.train()
    losses_since_log: list[float] = []
    last_metrics = None
    bar = tqdm(total=total_steps, initial=step, desc=f"train {meta['kind']}", unit="step",
               disable=None if ddp.is_main else True, dynamic_ncols=True, leave=False)
    started = time.time()
    with _StopFlag() as stop, contextlib.closing(bar):  # the bar is cleared before any error
        while step < total_steps and not (cfg.max_steps and step >= cfg.max_steps):
            epoch, k = divmod(step, steps_per_epoch)
            sampler.set_epoch(epoch, start=k * cfg.grad_accum * cfg.batch_size)
            loader = DataLoader(train_set, batch_size=cfg.batch_size, sampler=sampler,
                                num_workers=cfg.workers, drop_last=True, collate_fn=collate_fn,
                                pin_memory=device.type == "cuda", persistent_workers=False,
                                # own generator: creating a loader must not draw from the global
                                # RNG, or a resumed run's dropout would diverge
                                generator=torch.Generator().manual_seed(cfg.seed + epoch))
            batches = iter(loader)
            while k < steps_per_epoch and step < total_steps and not (cfg.max_steps and step >= cfg.max_steps):
                micro_losses = []
                bad_batch = None
                for micro in range(cfg.grad_accum):
                    batch = next(batches)
                    sync = (micro == cfg.grad_accum - 1) or not ddp.enabled
                    ctx = contextlib.nullcontext() if sync else train_model.no_sync()
                    with ctx:
                        with torch.autocast(device.type, dtype=amp_dtype or torch.float32,
                                            enabled=amp_dtype is not None):
                            loss = batch_loss(train_model, batch, device)
                        if not torch.isfinite(loss):
                            bad_batch = batch
                            loss = loss * 0.0 if cfg.nonfinite == "skip" else loss
                        scaler.scale(loss / cfg.grad_accum).backward()
                    micro_losses.append(float(loss.detach()))
                finite = torch.tensor([0.0 if bad_batch is not None else 1.0], device=device)
                if ddp.enabled:
                    dist.all_reduce(finite, op=dist.ReduceOp.MIN)
                if finite.item() < 1:
                    ids = ", ".join(map(str, (bad_batch or {}).get("ids", [])[:8])) or "on another rank"
                    if cfg.nonfinite == "stop":
                        raise ChxError(f"loss is NaN/inf at step {step + 1} (batch ids: {ids}); weights "
                                       f"were not updated, {last_path} holds the last good state; lower "
                                       f"--lr, check those images, or use --nonfinite skip")
                    optimizer.zero_grad(set_to_none=True)
                    if ddp.is_main:
                        warn(f"warning: skipped step {step + 1}: NaN/inf loss (batch ids: {ids})")
                        _append_jsonl(metrics_path, {"kind": "skip", "step": step + 1, "ids": ids})
                    # The schedule still advances, so a skip does not shift later steps.
                else:
                    if cfg.clip_grad > 0:
                        scaler.unscale_(optimizer)
                        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.clip_grad)
                    scaler.step(optimizer)
                    scaler.update()
                    optimizer.zero_grad(set_to_none=True)
                    if ema is not None:
                        ema.update_parameters(model)
                step_lr = scheduler.get_last_lr()[0]   # the LR this step used
                scheduler.step()
                step += 1
                k += 1
                bar.update(1)
                losses_since_log.append(sum(micro_losses) / len(micro_losses))
                if step % cfg.log_every == 0 or step in (total_steps, cfg.max_steps):
                    mean_loss = torch.tensor(sum(losses_since_log) / len(losses_since_log), device=device)
                    if ddp.enabled:
                        dist.all_reduce(mean_loss)
                        mean_loss /= ddp.world_size
                    if ddp.is_main:
                        _append_jsonl(metrics_path, {"kind": "train", "step": step,
                                                     "epoch": step / steps_per_epoch,
                                                     "loss": float(mean_loss),
                                                     "lr": step_lr,
                                                     "elapsed_s": round(time.time() - started, 3)})
                        bar.set_postfix(loss=f"{float(mean_loss):.4f}")
                    losses_since_log = []
                if step % val_interval == 0 or step == total_steps:
                    last_metrics = validate() or last_metrics
                stop_now = torch.tensor([1.0 if stop.signal else 0.0], device=device)
                if ddp.enabled:
                    dist.all_reduce(stop_now, op=dist.ReduceOp.MAX)
                if stop_now.item() > 0:
                    gather_rng()
                    if ddp.is_main:
                        checkpoint(last_path, last_metrics)
                        warn(f"interrupted at step {step}/{total_steps}: {last_path} saved; "
                             f"continue with --resume")
                    return FitResult(out, step, best, interrupted=stop.signal or signal.SIGTERM,
                                     last_metrics=last_metrics)
            del batches, loader
        if step % val_interval != 0 and step != total_steps:  # stopped by --max-steps
            last_metrics = validate() or last_metrics
    return FitResult(out, step, best, last_metrics=last_metrics)
