"""Phases 1-4 of a run: config and accelerator, inputs, the run folder, batches (see runner.py)."""
from __future__ import annotations

import contextlib
import math
import os
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch

from ..config import RunConfig, dump_config, load_config
from ..data.batching import BatchShape, LengthGroupedBatches, content_keys
from ..errors import RunNotFound
from ..loading import lengths, resolve_model, resolve_precision
from ..methods import get_method
from ..models.sources import ModelSource
from ..tasks import get_task
from ..tasks.base import Task
from ..tasks.common import Splits
from ..track import atomic, guard
from ..track.rundir import RunDir, new_run_dir
from ..track.session import RunTracking
from ..train import checkpoint
from ..train.loop import StepPlan
from ..train.schedules import warmup_steps
from ..train.transfer import truncating_collate


# -- 1. config, resume checks, accelerator -------------------------------------------------------------------

@dataclass(frozen=True)
class Setup:
    cfg: RunConfig
    task: Task
    accelerator: Any  # accelerate.Accelerator
    resume: Path | None  # the run folder a resume continues, else None
    extension: dict  # a resume's overrides (train.epochs / max_steps), recorded in resumes.jsonl
    legacy: bool  # a run saved before today's defaults resumes with the behaviour it started with
    started: float  # perf_counter at the start (summary's wall_seconds)


def prepare(config: str | Path | dict | RunConfig, overrides: list[str] | None, resume: str | Path | None,
            trust_run_code: bool, held: contextlib.ExitStack) -> Setup:
    from accelerate.utils import set_seed

    started = time.perf_counter()
    extension: dict = {}
    legacy = False
    if resume is not None:
        resume = Path(resume)
        if not (resume / "config.yaml").is_file():
            raise RunNotFound(f"{resume}: not a run folder (no config.yaml)")
        if not checkpoint.resumable(resume / "checkpoints" / "last"):
            raise RunNotFound(f"{resume}: no checkpoint to resume from (checkpoints/last is missing)")
        cfg, extension = guard.resume_config(resume, overrides)
        guard.check_run_code(resume, cfg, guard.read_meta(resume), trust_run_code)
        legacy = legacy_defaults(resume / "config.yaml", cfg)
    else:
        cfg = load_config(config, overrides)
    method = get_method(cfg.method.name)
    if method.check_environment:
        method.check_environment(cfg.method)
    accelerator = make_accelerator(resolve_precision(cfg.train.precision))
    if resume is not None and accelerator.is_main_process:  # before anything in the folder is written
        held.enter_context(guard.RunLock(resume))
    set_seed(cfg.train.seed)
    return Setup(cfg, get_task(cfg.task), accelerator, resume, extension, legacy, started)


def legacy_defaults(saved: Path, cfg: RunConfig) -> bool:
    """A run saved before `train.spread_duplicates` and the new head's own default lr existed resumes with the
    behaviour it started with (copies not spread, one lr for the head): its batches and optimizer groups
    must match its checkpoint. Such a config.yaml lacks the key (every later one holds all defaults)."""
    import yaml

    train = (yaml.safe_load(saved.read_text(encoding="utf-8")) or {}).get("train") or {}
    if "spread_duplicates" in train:
        return False
    cfg.train.spread_duplicates = False
    return True


def make_accelerator(mixed_precision: str):
    """An Accelerator for this run. accelerate keeps its state in a process-wide singleton;
    a second run() in the same process (tests, sweeps, notebooks) with another precision
    needs that state reset, while the distributed part (PartialState) is kept."""
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(reset_partial_state=False)
    GradientState._reset_state()
    # cpu=True where there is no GPU: accelerate then forms a gloo group under torchrun /
    # `accelerate launch`; without it each process would train alone
    gpu = torch.cuda.is_available() or (hasattr(torch, "xpu") and torch.xpu.is_available())
    accelerator = Accelerator(mixed_precision=mixed_precision, cpu=not gpu)
    if not gpu and os.environ.get("ACCELERATE_USE_FSDP", "").lower() == "true" and accelerator.is_main_process:
        # accelerate turns FSDP on only for GPU-like processes and drops it for CPU ones without a word
        print("FSDP was asked for, but accelerate shards only GPU processes: each of these CPU processes holds "
              "the whole model (DDP)", file=sys.stderr)
    return accelerator


# -- 2. data, model source, processor, features --------------------------------------------------------------

@dataclass(frozen=True)
class Inputs:
    splits: Splits
    source: ModelSource
    processor: Any  # the tokenizer, or the image preprocessing
    features: dict[str, list[dict]]  # model inputs per split


def read_inputs(setup: Setup) -> Inputs:
    """Data first: every data error shows before a model is loaded."""
    cfg, task = setup.cfg, setup.task
    splits = task.load_data(cfg)
    source = resolve_model(cfg)
    processor = task.load_processor(cfg, source)
    features = task.featurize(cfg, processor, splits)
    if setup.accelerator.is_main_process:  # to stderr, with the other warnings; stdout keeps what a script reads
        for warning in splits.report.warnings:
            print(f"[data warning] {warning}", file=sys.stderr)
    return Inputs(splits, source, processor, features)


# -- 3. the run folder and its tracking ----------------------------------------------------------------------

@dataclass(frozen=True)
class RunFolder:
    path: Path
    files: RunDir
    tracking: RunTracking  # index, cost, energy / CO2, MLflow / TensorBoard
    unstarted: Unstarted


def open_run_folder(setup: Setup, inputs: Inputs, held: contextlib.ExitStack) -> RunFolder:
    from accelerate.utils import broadcast_object_list

    cfg, accelerator, main = setup.cfg, setup.accelerator, setup.accelerator.is_main_process
    if setup.resume is not None:
        path = setup.resume
    else:
        holder = [str(new_run_dir(cfg)) if main else None]
        if accelerator.num_processes > 1:
            broadcast_object_list(holder)
        path = Path(holder[0])
        if main:
            held.enter_context(guard.RunLock(path))
    unstarted = held.enter_context(Unstarted(path if setup.resume is None and main else None))
    files = RunDir(path, main=main)
    if main:
        atomic.clean_leftovers(path)  # and puts back a checkpoint a kill left half-renamed
    splits = inputs.splits
    meta = {**splits.meta, "task": cfg.task, "model_source": inputs.source.__dict__, "data_sources": splits.sources}
    if setup.resume is None:
        files.write_text("config.yaml", dump_config(cfg))
    files.write_json("meta.json", meta)
    files.write_json("data_report.json", {"warnings": splits.report.warnings, "stats": splits.report.stats,
                                          "sizes": {k: len(v) for k, v in inputs.features.items()}})
    tracking = RunTracking(cfg, files, accelerator, resumed=setup.resume is not None)
    return RunFolder(path, files, tracking, unstarted)


class Unstarted:
    """A new run folder that fails before training starts (a corrupt model, a full disk) is removed: it would hold
    no result and no summary, and `runs list` would never show it. `path = None` once training starts."""

    def __init__(self, path: Path | None):
        self.path = path

    def __enter__(self) -> Unstarted:
        return self

    def __exit__(self, exc_type, exc, tb) -> bool:
        if exc_type is not None and self.path is not None:
            shutil.rmtree(self.path, ignore_errors=True)
        return False


# -- 4. batches and step arithmetic --------------------------------------------------------------------------

@dataclass(frozen=True)
class Batches:
    sampler: LengthGroupedBatches
    loader: torch.utils.data.DataLoader
    collate: Callable  # evaluation batches (and training batches unless the task or a schedule says otherwise)
    shape: BatchShape  # what the schedules change while training (max length, image size) and the epoch
    plan: StepPlan
    eval_batch_size: int


def plan_batches(setup: Setup, inputs: Inputs, folder: RunFolder) -> Batches:
    cfg, task, accelerator = setup.cfg, setup.task, setup.accelerator
    train = inputs.features["train"]
    spread = cfg.train.group_by_length and cfg.train.spread_duplicates
    sampler = LengthGroupedBatches(lengths(train), cfg.train.batch_size, cfg.train.seed, cfg.train.group_by_length,
                                   accelerator.num_processes, accelerator.process_index,
                                   keys=content_keys(train) if spread else None)
    shape = sampler.shape = BatchShape()  # the sampler writes the epoch (image augmentations are drawn per epoch)
    collate = task.collate(inputs.processor)
    train_collate = task.train_collate(inputs.processor, shape)  # images: augmentation + progressive resizing
    if train_collate is None:
        train_collate = truncating_collate(collate, shape, task.spec.keep_last_token) \
            if cfg.train.seq_len_schedule else collate
    # its own generator: a DataLoader draws a base seed from the global RNG at each epoch, which would
    # shift the dropout stream of a resumed run
    loader = torch.utils.data.DataLoader(train, batch_sampler=sampler, collate_fn=train_collate,
                                         generator=torch.Generator())
    steps_per_epoch = math.ceil(sampler.per_rank() / cfg.train.grad_accum)
    total_steps = cfg.train.max_steps or max(1, math.ceil(cfg.train.epochs * steps_per_epoch))
    if setup.resume is not None:
        guard.record_extension(folder.files, setup.extension, total_steps)
    plan = StepPlan(total_steps=total_steps, steps_per_epoch=steps_per_epoch,
                    eval_every=cfg.eval.every_steps or max(1, round(cfg.eval.every_epochs * steps_per_epoch)),
                    warmup=warmup_steps(cfg.train.warmup, total_steps), grad_accum=cfg.train.grad_accum,
                    log_every=cfg.train.log_every)
    return Batches(sampler, loader, collate, shape, plan, cfg.eval.batch_size or 2 * cfg.train.batch_size)
