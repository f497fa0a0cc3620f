"""The machinery both training phases run on: the process group, DeepSpeed engines, the run's
logs and deadline, checkpoints, the EMA, and ONE phase loop (`run_phase`).

A phase (`models.training.vae`, `models.training.dit`) builds its model on a DeepSpeed engine
(`make_engine`: `deepspeed.initialize`, ZeRO stage 1 or 2, AdamW with a linear warm-up and a
cosine decay; fp32 on CPU, bf16 on GPU) and hands `run_phase` a `Phase`: that engine, a batch per
step and its optimiser step. The loop does the rest: every `checkpoint_every` steps, and when the
phase ends or its time runs out, the engine saves model + optimizer + LR-scheduler state, the EMA,
the step and the wall time spent; a new run with `resume=True` continues from the latest. Rank 0
writes the loss curves (`loss_vae.csv`, `loss_dit.csv`) and `train_log.jsonl`.

On CPU, `DS_ACCELERATOR=cpu` and `deepspeed.init_distributed("gloo")` (which JIT-compiles a comm op
once per venv, ~40-80 s; cached in TORCH_EXTENSIONS_DIR afterwards).
"""

from __future__ import annotations

import csv
import functools
import json
import math
import os
import shutil
import socket
import time
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from models.config import load_config
from models.training.config import TrainConfig
from models.weights import load_modules

# --- distributed setup ----------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def init_training_process() -> tuple[int, int, torch.device]:
    """(rank, world size, device): DeepSpeed's process group, created here unless one exists.

    A lone process gets a one-rank group on loopback. CPU-only machines use gloo and DeepSpeed's
    CPU accelerator (DS_ACCELERATOR=cpu, set here before deepspeed is imported).
    """
    on_gpu = torch.cuda.is_available()
    if not on_gpu:
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    import deepspeed
    import torch.distributed as dist

    if not dist.is_initialized():
        for key, value in (("RANK", "0"), ("LOCAL_RANK", "0"), ("WORLD_SIZE", "1"),
                           ("LOCAL_WORLD_SIZE", "1"), ("MASTER_ADDR", "127.0.0.1")):
            os.environ.setdefault(key, value)
        os.environ.setdefault("MASTER_PORT", str(_free_port()))
    deepspeed.init_distributed(dist_backend="nccl" if on_gpu else "gloo", verbose=False)
    rank, world = dist.get_rank(), dist.get_world_size()
    if on_gpu:
        local = int(os.environ.get("LOCAL_RANK", "0"))
        torch.cuda.set_device(local)
        device = torch.device("cuda", local)
    else:
        device = torch.device("cpu")
    return rank, world, device


def ds_config(batch: int, world: int, zero_stage: int, grad_clip: float, on_gpu: bool) -> dict:
    """The DeepSpeed config of one phase (the optimiser and scheduler are passed in as objects)."""
    return {
        "train_batch_size": batch * world,
        "train_micro_batch_size_per_gpu": batch,
        "gradient_accumulation_steps": 1,
        "gradient_clipping": grad_clip,
        "zero_optimization": {"stage": zero_stage},
        "bf16": {"enabled": on_gpu},
        "steps_per_print": 10 ** 9,
        "wall_clock_breakdown": False,
    }


def lr_lambda(warmup: int, total: int, floor: float = 0.1) -> Callable[[int], float]:
    """Linear warm-up over `warmup` steps, then cosine from 1 to `floor` at `total`."""

    def f(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = min((step - warmup) / max(total - warmup, 1), 1.0)
        return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))

    return f


def make_engine(module: nn.Module, lr: float, weight_decay: float, steps: int, cfg: TrainConfig,
                batch: int, world: int, device: torch.device):
    """(engine, optimizer, scheduler) for a module: AdamW + warm-up/cosine under ZeRO."""
    import deepspeed

    on_gpu = device.type == "cuda"
    module.to(device)
    optimizer = torch.optim.AdamW([p for p in module.parameters() if p.requires_grad], lr=lr, betas=(0.9, 0.99),
                                  weight_decay=weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(cfg.warmup_steps, steps))
    engine, optimizer, _, scheduler = deepspeed.initialize(
        model=module, optimizer=optimizer, lr_scheduler=scheduler,
        config=ds_config(batch, world, cfg.zero_stage, cfg.grad_clip, on_gpu))
    return engine, optimizer, scheduler


# --- run state: logs, checkpoints, deadline -------------------------------------------------


class Run:
    """Paths, the deadline, and rank-0 logging of one training call."""

    def __init__(self, cfg: TrainConfig, rank: int, world: int, device: torch.device):
        self.cfg, self.rank, self.world, self.device = cfg, rank, world, device
        self.out = Path(cfg.out_dir)
        self.out.mkdir(parents=True, exist_ok=True)
        self.t0 = time.monotonic()
        self.deadline = None if cfg.minutes is None else self.t0 + 60.0 * cfg.minutes

    def out_of_time(self) -> bool:
        """Whether the budget is spent; ranks agree (rank 0 decides)."""
        over = self.deadline is not None and time.monotonic() >= self.deadline
        if self.world > 1:
            import torch.distributed as dist

            flag = torch.tensor([1.0 if over else 0.0], device=self.device)
            dist.broadcast(flag, src=0)
            over = bool(flag.item())
        return over

    def barrier(self) -> None:
        """Wait for every rank (a lone process goes on)."""
        if self.world > 1:
            import torch.distributed as dist

            dist.barrier()

    def log(self, event: str, **fields) -> None:
        if self.rank:
            return
        row = {"event": event, "time": time.time(), **fields}
        with open(self.out / "train_log.jsonl", "a") as f:
            f.write(json.dumps(row) + "\n")
        print(json.dumps(row), flush=True)

    def curve(self, name: str, row: dict) -> None:
        if self.rank:
            return
        path = self.out / f"loss_{name}.csv"
        new = not path.exists()
        with open(path, "a", newline="") as f:
            w = csv.DictWriter(f, fieldnames=list(row))
            if new:
                w.writeheader()
            w.writerow(row)


def seed_for(cfg: TrainConfig, phase: int, rank: int, step: int) -> int:
    """The seed of one random draw: `cfg.seed` mixed with the draw's kind (`phase`), rank and step."""
    return (cfg.seed * 1_000_003 + phase * 7919 + rank * 104_729 + step) % (2 ** 63)


def save_checkpoint(engine, ckpt_dir: Path, step: int, client_state: dict, keep: int) -> None:
    """DeepSpeed checkpoint `step{N}` (model, optimizer, scheduler, client state); older ones pruned."""
    engine.save_checkpoint(str(ckpt_dir), tag=f"step{step}", client_state=client_state)
    if engine.global_rank == 0:
        tags = sorted((p for p in ckpt_dir.glob("step*") if p.is_dir()), key=lambda p: int(p.name[4:]))
        for old in tags[:-keep]:
            shutil.rmtree(old, ignore_errors=True)


def load_latest(engine, ckpt_dir: Path) -> dict | None:
    """Client state of the latest checkpoint, loaded into the engine; None when there is none."""
    if not (ckpt_dir / "latest").exists():
        return None
    path, client_state = engine.load_checkpoint(str(ckpt_dir), load_optimizer_states=True,
                                                load_lr_scheduler_states=True)
    if path is None:
        return None
    return client_state


# --- starting from a trained model -----------------------------------------------------------


@functools.lru_cache(maxsize=1)
def _initial_modules(spec: str) -> nn.ModuleDict:
    modules, _ = load_modules(load_config(spec))
    return modules


def initial_modules(cfg: TrainConfig) -> nn.ModuleDict:
    """The modules of `cfg.init_from` (a shipped name, config path or URI), weights checked; read
    once per process for both phases."""
    return _initial_modules(cfg.init_from)


# --- EMA ------------------------------------------------------------------------------------


class EMA:
    """Exponential moving average of a module's float parameters, with DiT's warm-up of the decay."""

    def __init__(self, module: nn.Module, decay: float):
        self.decay = decay
        self.shadow = {k: v.detach().float().clone() for k, v in module.state_dict().items()}

    @torch.no_grad()
    def update(self, module: nn.Module, step: int) -> None:
        d = min(self.decay, (1 + step) / (10 + step))
        for k, v in module.state_dict().items():
            if v.dtype.is_floating_point:
                self.shadow[k].mul_(d).add_(v.detach().float(), alpha=1 - d)
            else:
                self.shadow[k].copy_(v)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {k: v.cpu() for k, v in self.shadow.items()}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        self.shadow = {k: v.detach().float().clone() for k, v in state.items()}


# --- the phase loop -------------------------------------------------------------------------


@dataclass
class Phase:
    """What a phase brings to `run_phase`: its model on a DeepSpeed engine, its batches, its step."""

    name: str  # "vae" / "dit": checkpoints in out_dir/NAME/ckpt, the curve loss_NAME.csv, the log's phase
    engine: Any  # from `make_engine`
    scheduler: Any  # the engine's LR scheduler (the curve's lr)
    steps: int  # optimiser steps of the whole phase
    batch: int  # clips per step per rank
    batches: Callable[[int], AbstractContextManager[Iterator[Any]]]  # the batches of the steps from this one on
    train_step: Callable[[Any, int], dict[str, float]]  # one optimiser step on (batch, step number): its losses
    ema: EMA | None = None  # updated after every step, checkpointed and resumed with the engine
    start_fields: dict = field(default_factory=dict)  # more fields of the "start" log line


@dataclass
class PhaseDone:
    """A phase that has run all its steps (its last checkpoint saved)."""

    steps: int
    wall_s: float  # training time over all calls
    params: int


def run_phase(phase: Phase, run: Run) -> PhaseDone | None:
    """Run a phase's steps, from its latest checkpoint with `resume`: the loss curve and the log
    every `log_every` steps, a checkpoint every `checkpoint_every`. None when it paused (the time
    ran out, or `pause_at`) after saving a checkpoint to go on from."""
    cfg, engine = run.cfg, phase.engine
    ckpt = run.out / phase.name / "ckpt"
    step, wall = 0, 0.0
    state = load_latest(engine, ckpt) if cfg.resume else None
    if state is not None:
        step, wall = int(state["step"]), float(state["wall_s"])
        if phase.ema is not None:
            phase.ema.load_state_dict(state["ema"])
        run.log("resume", phase=phase.name, step=step, wall_s=wall)
    params = sum(p.numel() for p in engine.module.parameters())
    run.log("start", phase=phase.name, step=step, params=params, batch=phase.batch, world=run.world,
            **phase.start_fields)
    engine.train()
    acc: dict[str, float] = {}
    n_since, start = 0, step
    t_last = t_mark = time.monotonic()

    def client_state(wall_s: float) -> dict:
        return {"step": step, "wall_s": wall_s, **({} if phase.ema is None else {"ema": phase.ema.state_dict()})}

    with phase.batches(step) as feed:
        for batch in feed:
            if run.out_of_time() or (step == cfg.pause_at and step > start):
                break
            losses = phase.train_step(batch, step)
            step += 1
            if phase.ema is not None:
                phase.ema.update(engine.module, step)
            n_since += 1
            for k, v in losses.items():
                acc[k] = acc.get(k, 0.0) + v
            if step % cfg.log_every == 0 or step == phase.steps:
                now = time.monotonic()
                wall += now - t_mark
                t_mark = now
                row = {"step": step, "wall_s": round(wall, 2), **{k: round(v / n_since, 6) for k, v in acc.items()},
                       "lr": phase.scheduler.get_last_lr()[0],
                       "clips_per_s": round(n_since * phase.batch * run.world / (now - t_last), 3)}
                run.curve(phase.name, row)
                run.log("step", phase=phase.name, **row)
                acc, n_since, t_last = {}, 0, now
            if step % cfg.checkpoint_every == 0:
                save_checkpoint(engine, ckpt, step, client_state(wall + time.monotonic() - t_mark),
                                cfg.keep_checkpoints)
    wall += time.monotonic() - t_mark
    if step < phase.steps:
        save_checkpoint(engine, ckpt, step, client_state(wall), cfg.keep_checkpoints)
        run.log("paused", phase=phase.name, step=step, wall_s=round(wall, 1))
        return None
    if not (ckpt / f"step{step}").exists():
        save_checkpoint(engine, ckpt, step, client_state(wall), cfg.keep_checkpoints)
    return PhaseDone(step, wall, params)
