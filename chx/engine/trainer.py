"""The training loop shared by both stages (one trainer, not two copies).

Read :func:`fit` top to bottom: the run folder, the :class:`TrainState` (model, EMA, optimizer,
per-step warm-up + cosine schedule, grad scaler, step; what a checkpoint restores), then the loop:
one :func:`train_step` per optimizer step (gradient accumulation, mixed precision, clipping, EMA),
a log line, a validation every ``val_every`` of an epoch, and a stop check. A stage supplies the
model, the training dataset and sampler, a ``batch_loss`` function and an ``evaluate`` function;
nothing else is stage-specific.

Exact resume: the sampler order is a function of (seed, epoch), each item's augmentation is seeded
by its position, and the checkpoint holds model, EMA, optimizer, scheduler, scaler and RNG state,
so losses after ``--resume`` equal those of an uninterrupted run.
"""

from __future__ import annotations

import contextlib
import math
import signal
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from chx.data.samplers import EpochSampler
from chx.engine.compat import require_same_classes, require_same_inputs
from chx.engine.distributed import Distributed, setup_distributed
from chx.engine.inference import autocast_dtype, model_to, on_device
from chx.engine.run_folder import RunFolder
from chx.errors import ChxError
from chx.models import load_checkpoint, save_checkpoint
from chx.options import TrainConfig, resume_rule
from chx import workers


def lr_lambda(total_steps: int, warmup_steps: int, min_ratio: float) -> Callable[[int], float]:
    """Linear warm-up to 1, then cosine decay to ``min_ratio``; stepped once per optimizer step."""
    def f(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / (warmup_steps + 1)
        progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
        return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))
    return f


def param_groups(model: nn.Module, weight_decay: float, lr: float,
                 lr_mults: dict[str, float] | None = None) -> list[dict]:
    """No weight decay on biases, norms and other 1-D parameters. ``lr_mults`` (parameter-name
    prefix -> factor of ``lr``, e.g. ``{"image.": 0.1}``) gives those parameters groups of their own,
    after the groups at ``lr`` (the first group's LR is the one the log records)."""
    groups: dict[tuple[float, bool], list] = {(1.0, True): [], (1.0, False): []}
    for name, p in model.named_parameters():
        if p.requires_grad:
            mult = next((m for prefix, m in (lr_mults or {}).items() if name.startswith(prefix)), 1.0)
            groups.setdefault((mult, p.ndim > 1), []).append(p)
    return [{"params": params, "weight_decay": weight_decay if decay else 0.0, "lr": lr * mult}
            for (mult, decay), params in groups.items()]


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


@dataclass
class Stage:
    """What a training stage (train-backbone, train-fusion, train-joint) hands to :func:`fit_stage`:
    the model, its training data and sampler, the loss of one batch, the validation (None: none, best.pt
    = last.pt) and the checkpoint metadata; ``collate_fn`` and ``lr_mults`` as :func:`fit` takes them."""
    model: nn.Module
    train_set: Dataset
    sampler: EpochSampler
    batch_loss: Callable[[nn.Module, dict, torch.device], torch.Tensor]
    evaluate: Callable[[nn.Module], dict] | None
    meta: dict
    collate_fn: Callable | None = None
    lr_mults: dict[str, float] | None = None




def warn(message: str) -> None:
    """A message for the user on stderr that does not break the progress bars."""
    tqdm.write(message, file=sys.stderr)


def require_training_split(count: int, unit: str, source: str, *, blank_is_train: bool = True,
                           fix: str = "assign splits with `chx prepare ... --val-fraction`") -> None:
    """THE error of every stage whose training split is empty: ``count`` training ``unit``s
    (rows, studies) in ``source`` (what the user gave); ``blank_is_train``: rows without a split train."""
    if count == 0:
        split = "split 'train' or empty" if blank_is_train else "split 'train'"
        raise ChxError(f"no training {unit} in {source} ({split}); {fix}")


def warn_no_validation(unit: str, ddp: Distributed) -> None:
    """THE warning of every stage without a validation split (once, on rank 0)."""
    if ddp.is_main:
        warn(f"warning: no validation {unit} (split 'val'): best.pt will be the last checkpoint")


# Options that may change on --resume: they do not change what is computed (declared with
# on_resume="free" in chx.options) ...
RESUMABLE_CHANGES = resume_rule("free")
# ... and those applied, with a warning (on_resume="applied": more or fewer epochs stretch the LR schedule).
APPLIED_ON_RESUME = resume_rule("applied")


class TrainState:
    """Everything a checkpoint restores: model, EMA copy, optimizer, LR schedule, grad scaler, step,
    best validation score and each rank's RNG state."""

    def __init__(self, model: nn.Module, cfg: TrainConfig, total_steps: int, device: torch.device,
                 lr_mults: dict[str, float] | None = None):
        self.model = model
        self.amp_dtype = autocast_dtype(cfg.precision, device)
        self.scaler = torch.amp.GradScaler("cuda", enabled=self.amp_dtype == torch.float16)
        self.optimizer = torch.optim.AdamW(param_groups(model, cfg.weight_decay, cfg.lr, lr_mults), lr=cfg.lr)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lr_lambda(total_steps, round(cfg.warmup * total_steps), cfg.min_lr_ratio))
        self.ema = None
        if cfg.ema > 0:
            from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn
            self.ema = AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(cfg.ema), use_buffers=True)
        self.step, self.best = 0, None
        self.rng: list[dict] = []       # every rank's RNG state, gathered before a checkpoint

    @property
    def eval_model(self) -> nn.Module:
        return self.ema.module if self.ema is not None else self.model

    def weights(self) -> dict:
        return {"state_dict": self.model.state_dict(),
                "ema_state_dict": self.ema.state_dict() if self.ema is not None else None,
                "step": self.step, "best_metric": self.best}

    def state_dict(self) -> dict:
        return {**self.weights(), "optimizer": self.optimizer.state_dict(),
                "scheduler": self.scheduler.state_dict(), "scaler": self.scaler.state_dict(),
                "rng": {**self.rng[0], "per_rank": list(self.rng)}}

    def load_state_dict(self, ckpt: dict, rank: int, world_size: int, device: torch.device) -> None:
        self.model.load_state_dict(ckpt["state_dict"])
        self.optimizer.load_state_dict(ckpt["optimizer"])
        self.scheduler.load_state_dict(ckpt["scheduler"])
        self.scaler.load_state_dict(ckpt["scaler"])
        if self.ema is not None and ckpt.get("ema_state_dict") is not None:
            self.ema.load_state_dict(ckpt["ema_state_dict"])
        self.step, self.best = ckpt["step"], ckpt.get("best_metric")
        per_rank = ckpt["rng"].get("per_rank") or [ckpt["rng"]]
        rng = per_rank[rank] if len(per_rank) == world_size else per_rank[0]
        torch.set_rng_state(rng["torch"])
        if device.type == "cuda" and rng.get("cuda") is not None:
            torch.cuda.set_rng_state(rng["cuda"], device)

    def gather_rng(self, ddp: Distributed) -> None:
        """All ranks: collect each rank's RNG state, so a resumed DDP run restores its own stream."""
        mine = {"torch": torch.get_rng_state(),
                "cuda": torch.cuda.get_rng_state(ddp.device) if ddp.device.type == "cuda" else None}
        self.rng = ddp.all_gather(mine)

    def autocast(self, device: torch.device):
        return torch.autocast(device.type, dtype=self.amp_dtype or torch.float32,
                              enabled=self.amp_dtype is not None)


# meta entries that go into checkpoints only, not into the run's config.json
BINARY_META = ("model_state", "train_patients")


def _check_resume(ckpt: dict, meta: dict, cfg: TrainConfig, path: Path) -> None:
    """A resumed run must compute what the first one did: same classes, model and options."""
    require_same_classes(meta["class_names"], ckpt["class_names"], "this data", f"--resume {path}",
                         fix="use the same manifest's classes or a new --out")
    if ckpt.get("model_config") != meta.get("model_config"):
        raise ChxError(f"--resume: {path} holds a different model configuration; use the same model "
                       f"options or a new --out")
    old = {**(ckpt.get("train_config") or {}), **(ckpt.get("options") or {})}
    new = {**asdict(cfg), **(meta.get("options") or {})}
    changed = [f"--{k.replace('_', '-')} {old[k]} -> {new[k]}" for k in sorted(set(old) & set(new))
               if k not in RESUMABLE_CHANGES | APPLIED_ON_RESUME and old[k] != new[k]]
    for k in sorted(APPLIED_ON_RESUME & set(old)):
        if old[k] != new[k]:
            warn(f"warning: --resume with --{k} {new[k]} (the run had {old[k]}): the LR schedule now "
                 f"spans the new length; config.json records it")
    old_sampler = (ckpt.get("reader") or {}).get("sampler")
    new_sampler = (meta.get("reader") or {}).get("sampler")
    if old_sampler and new_sampler and old_sampler != new_sampler:
        changed.append(f"study order {old_sampler} -> {new_sampler} (--preload resolved otherwise: give "
                       f"--preload {ckpt['reader'].get('preload')})")
    if changed:
        raise ChxError(f"--resume: option(s) differ from the run in {path.parent}: {'; '.join(changed)}; "
                       f"resume with the run's own options (see its config.json) or start a new --out")
    require_same_inputs(ckpt, meta, str(path.parent))


def train_step(state: TrainState, train_model: nn.Module, batches, batch_loss, cfg: TrainConfig,
               ddp: Distributed) -> tuple[float, dict | None]:
    """One optimizer step over ``cfg.grad_accum`` batches: (mean loss, the non-finite batch or None).

    A non-finite loss on any rank skips the update on every rank (the schedule still advances, so a
    skip does not shift later steps); ``cfg.nonfinite == "stop"`` makes the caller stop."""
    device = ddp.device
    losses, bad = [], None
    for micro in range(cfg.grad_accum):
        batch = next(batches)
        sync = micro == cfg.grad_accum - 1 or not ddp.enabled
        with contextlib.nullcontext() if sync else train_model.no_sync():
            with state.autocast(device):
                loss = batch_loss(train_model, batch, device)
            if not torch.isfinite(loss):
                bad = batch
                loss = loss * 0.0 if cfg.nonfinite == "skip" else loss
            state.scaler.scale(loss / cfg.grad_accum).backward()
        losses.append(float(loss.detach()))
    all_finite = ddp.all_reduce(0.0 if bad is not None else 1.0, "min") >= 1
    if all_finite:
        if cfg.clip_grad > 0:
            state.scaler.unscale_(state.optimizer)
            torch.nn.utils.clip_grad_norm_(state.model.parameters(), cfg.clip_grad)
        state.scaler.step(state.optimizer)
        state.scaler.update()
        if state.ema is not None:
            state.ema.update_parameters(state.model)
    state.optimizer.zero_grad(set_to_none=True)
    state.scheduler.step()
    state.step += 1
    return sum(losses) / len(losses), (None if all_finite else (bad or {"ids": []}))


class _Progress:
    """A tqdm bar on a terminal; elsewhere (a pipe, nohup, a scheduler) a short line every
    ``every`` seconds: step, epoch, loss, items/s and the time left."""

    def __init__(self, total: int, initial: int, desc: str, every: float, items_per_step: int, enabled: bool):
        self.bar = tqdm(total=total, initial=initial, desc=desc, unit="step", dynamic_ncols=True,
                        leave=False, disable=None if enabled else True)
        self.lines = enabled and self.bar.disable and not sys.stderr.isatty()
        self.total, self.start_step, self.every = total, initial, every
        self.items_per_step, self.desc = items_per_step, desc
        self.t0 = self.last = time.time()
        self.loss: float | None = None   # the last logged loss: every line shows it (logged every --log-every)

    def update(self, step: int, steps_per_epoch: int, loss: float | None) -> None:
        self.bar.update(1)
        if loss is not None:
            self.loss = loss
            self.bar.set_postfix(loss=f"{loss:.4f}")
        loss = self.loss
        now = time.time()
        if self.lines and (now - self.last >= self.every or step == self.total):
            self.last = now
            rate = (step - self.start_step) / max(now - self.t0, 1e-9)
            eta = (self.total - step) / rate if rate > 0 else float("nan")
            warn(f"{self.desc}: step {step}/{self.total} (epoch {step / steps_per_epoch:.2f})"
                 + (f", loss {loss:.4f}" if loss is not None else "")
                 + f", {rate * self.items_per_step:.1f} items/s, ETA {_duration(eta)}")

    def close(self) -> None:
        self.bar.close()


def _duration(seconds: float) -> str:
    if not math.isfinite(seconds):
        return "?"
    m, s = divmod(int(round(seconds)), 60)
    h, m = divmod(m, 60)
    return f"{h}h{m:02d}m" if h else f"{m}m{s:02d}s"


def fit(model: nn.Module, train_set: Dataset, sampler: EpochSampler,
        batch_loss: Callable[[nn.Module, dict, torch.device], torch.Tensor],
        evaluate: Callable[[nn.Module], dict] | None, cfg: TrainConfig, out: str | Path,
        meta: dict, *, resume: bool = False, overwrite: bool = False,
        ddp: Distributed | None = None, collate_fn=None,
        lr_mults: dict[str, float] | None = None) -> FitResult:
    """Train ``model`` and write the run folder ``out``.

    ``batch_loss(model, batch, device)`` returns the scalar loss of one batch; ``evaluate(model)``
    returns a dict with at least ``mAP`` (may be None: no validation, best.pt = last.pt).
    ``meta`` goes into every checkpoint and must hold ``kind``, ``model_config`` and ``class_names``.
    ``lr_mults``: parameter-name prefix -> factor of ``cfg.lr`` for those parameters (see
    :func:`param_groups`; e.g. a backbone fine-tuned at a tenth of the rate).
    """
    cfg.validate()
    ddp = ddp or setup_distributed(cfg.device)
    device = ddp.device
    run = RunFolder(out)
    if ddp.is_main:
        if cfg.tensorboard:   # before the folder is touched: a missing package stops here
            from chx.engine.tensorboard import TensorBoardLogger

            run.tensorboard = TensorBoardLogger(run.out)
        run.open(resume=resume, overwrite=overwrite)
    try:
        return _fit(model, train_set, sampler, batch_loss, evaluate, cfg, run, meta, resume, ddp,
                    device, collate_fn, lr_mults)
    finally:
        run.close()


def fit_stage(stage: Stage, cfg: TrainConfig, out: str | Path, *, resume: bool = False,
              overwrite: bool = False, ddp: Distributed | None = None) -> FitResult:
    """:func:`fit` of a stage's description: the one way every training stage trains."""
    return fit(stage.model, stage.train_set, stage.sampler, stage.batch_loss, stage.evaluate, cfg, out,
               stage.meta, resume=resume, overwrite=overwrite, ddp=ddp, collate_fn=stage.collate_fn,
               lr_mults=stage.lr_mults)


def _fit(model, train_set, sampler, batch_loss, evaluate, cfg, run: RunFolder, meta, resume, ddp,
         device, collate_fn, lr_mults) -> FitResult:
    # ---- steps, state, resume
    steps_per_epoch = sampler.per_rank // cfg.batch_size // cfg.grad_accum
    if steps_per_epoch < 1:
        raise ChxError(f"the training split has {sampler.num_samples} items: too few for one step of "
                       f"--batch-size {cfg.batch_size} x --grad-accum {cfg.grad_accum}"
                       f"{f' x {ddp.world_size} processes' if ddp.enabled else ''}; lower them")
    total_steps = max(1, math.ceil(cfg.epochs * steps_per_epoch))
    last_step = min(total_steps, cfg.max_steps) if cfg.max_steps else total_steps
    val_interval = max(1, round(cfg.val_every * steps_per_epoch))
    model_to(model, device)
    state = TrainState(model, cfg, total_steps, device, lr_mults)
    if resume:
        ckpt = load_checkpoint(run.last, kind=meta["kind"])
        _check_resume(ckpt, meta, cfg, run.last)
        state.load_state_dict(ckpt, ddp.rank, ddp.world_size, device)
        if state.best is not None and not run.best.exists() and ddp.is_main:
            warn(f"warning: --resume: {run.best} is missing though {run.last} records a best score of "
                 f"{state.best:.4f}; the next validation writes a new best.pt (the best since now)")
        state.best = run.resumed_best(state.best, meta["kind"])
    else:  # dropout RNG; a resumed run restores it from the checkpoint instead
        torch.manual_seed(cfg.seed + 1_000_003 * ddp.rank)
    train_model = (nn.parallel.DistributedDataParallel(
        model, device_ids=[device.index] if device.type == "cuda" else None) if ddp.enabled else model)
    if ddp.is_main:
        run.write_config({"train": asdict(cfg), **{k: v for k, v in meta.items() if k not in BINARY_META},
                          "world_size": ddp.world_size, "steps_per_epoch": steps_per_epoch,
                          "total_steps": total_steps})

    def save(path: Path, metrics: dict | None, full: bool) -> None:
        """last.pt holds the whole train state; best.pt the weights only (no optimizer state)."""
        body = state.state_dict() if full else state.weights()
        save_checkpoint({**meta, **body, "train_config": asdict(cfg), "metrics": metrics}, path)

    def validate() -> dict | None:
        state.gather_rng(ddp)
        metrics = None
        if ddp.is_main:
            if evaluate is not None:
                m = state.eval_model
                was_training = m.training
                m.eval()
                with torch.no_grad(), state.autocast(device):
                    metrics = evaluate(m)
                m.train(was_training)
                score = metrics.get("mAP")
                score = float("-inf") if score is None or math.isnan(score) else score
                improved = state.best is None or score > state.best
                state.best = score if improved else state.best
                run.log({"kind": "val", "step": state.step, "epoch": state.step / steps_per_epoch,
                         **metrics, "best": improved})
            else:
                improved = True
            # best.pt first: last.pt (which --resume reads) never records a best that is not on disk
            if improved:
                save(run.best, metrics, full=False)
            if cfg.keep_checkpoints:      # weights only, as best.pt; the last K kept
                run.keep_checkpoint(state.step, cfg.keep_checkpoints, lambda p: save(p, metrics, full=False))
            save(run.last, metrics, full=True)
        ddp.barrier()
        return metrics

    # ---- the loop: one optimizer step per iteration
    held = on_device(train_set)     # --preload gpu: batches are gathered on the device, no workers
    model.train()
    logged: list[float] = []
    last_metrics = None
    started = time.time()
    progress = _Progress(total_steps, state.step, f"train {meta['kind']}", cfg.progress_every,
                         cfg.batch_size * cfg.grad_accum * ddp.world_size, enabled=ddp.is_main)
    # the bar is cleared before any error; the loader's workers end on every exit path
    with _StopFlag() as stop, contextlib.closing(progress), _Batches() as loaders:
        batches, epoch = None, None
        while state.step < last_step:
            if state.step // steps_per_epoch != epoch:          # a new epoch: a new loader
                epoch, k = divmod(state.step, steps_per_epoch)
                sampler.set_epoch(epoch, start=k * cfg.grad_accum * cfg.batch_size)
                batches = loaders.next_epoch(DataLoader(
                    train_set, batch_size=cfg.batch_size, sampler=sampler,
                    num_workers=0 if held else cfg.workers, drop_last=True, collate_fn=collate_fn,
                    pin_memory=device.type == "cuda" and not held,
                    worker_init_fn=workers.worker_init,
                    # own generator: creating a loader must not draw from the global RNG, or a
                    # resumed run's dropout would diverge
                    generator=torch.Generator().manual_seed(cfg.seed + epoch)))
            lr = state.scheduler.get_last_lr()[0]                # the LR this step uses
            loss, bad = train_step(state, train_model, batches, batch_loss, cfg, ddp)
            if bad is not None:
                ids = ", ".join(map(str, bad.get("ids", [])[:8])) or "on another rank"
                if cfg.nonfinite == "stop":
                    raise ChxError(f"loss is NaN/inf at step {state.step} (batch ids: {ids}); weights "
                                   f"were not updated, {run.last} holds the last good state; lower "
                                   f"--lr, check those images, or use --nonfinite skip")
                if ddp.is_main:
                    warn(f"warning: skipped step {state.step}: NaN/inf loss (batch ids: {ids})")
                    run.log({"kind": "skip", "step": state.step, "ids": ids})
            logged.append(loss)
            mean_loss = None
            if state.step % cfg.log_every == 0 or state.step == last_step:
                mean_loss = ddp.all_reduce(sum(logged) / len(logged), "mean")
                logged = []
                if ddp.is_main:
                    run.log({"kind": "train", "step": state.step, "epoch": state.step / steps_per_epoch,
                             "loss": mean_loss, "lr": lr, "elapsed_s": round(time.time() - started, 3)})
            progress.update(state.step, steps_per_epoch, mean_loss)
            if state.step % val_interval == 0 or state.step == last_step:
                last_metrics = validate() or last_metrics
            if ddp.all_reduce(1.0 if stop.signal else 0.0, "max") > 0:
                state.gather_rng(ddp)
                if ddp.is_main:
                    save(run.last, last_metrics, full=True)
                    warn(f"interrupted at step {state.step}/{total_steps}: {run.last} saved; "
                         f"continue with --resume")
                return FitResult(run.out, state.step, state.best, interrupted=stop.signal or signal.SIGTERM,
                                 last_metrics=last_metrics)
    return FitResult(run.out, state.step, state.best, last_metrics=last_metrics)


class _Batches:
    """The training loop's current epoch iterator; the previous epoch's and, when the loop ends in
    any way, the current one's workers are ended (see :mod:`chx.workers`)."""

    def __init__(self):
        self.current = None

    def next_epoch(self, loader):
        workers.close(self.current)
        self.current = workers.start(loader)
        return self.current

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        workers.close(self.current)
        self.current = None
