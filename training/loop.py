"""The training loop: one stage (tokenizer or DiT), one to many processes, exact resume.

    out = train(args)    # args from training.options.build_parser()

Every rank builds the stage's model from the same seed, wraps it with `parallelize` (sequence parallelism,
activation checkpointing, compile, DDP or FSDP2), and keeps an EMA of it for previews and export. Each step
runs --grad-accum micro-batches, clips the gradient, checks the loss is finite on every rank (one
collective), steps the optimiser, scheduler and EMA. Checkpoints hold everything a resumed run needs to take
the uninterrupted run's steps; SIGTERM, --exit-after and --max-minutes end a run with one.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import math
import shutil
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn as nn
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict, get_state_dict,
                                                     set_model_state_dict, set_state_dict)
from tqdm import tqdm

from checkpoint_io import recover_folder, replace_folder, write_json_atomic, write_text_atomic
from data import make_loader, write_video
from data.buckets import check_divisible, parse_buckets
from data.sources import video_name
from errors import InputError, Interrupted
from evaluation.peak_memory import PeakMemory
from parallel import Env, ParallelOptions, all_reduce_sum, barrier, parallelize, setup_distributed

from .checkpoint import Checkpoints, folder_bytes, mount_point, out_of_space, rng_state, set_rng_state
from .dit_stage import DiTStage
from .distill_stage import DistillStage
from .metrics import MetricsLog
from .optim import build_optimizer, ema_model
from .run_folder import RunLock, record_resume, resolve_run
from .stage import compute_dtype, cpu_has_native_bf16
from .tokenizer_stage import TokenizerStage

log = logging.getLogger("train")

STAGES = {"tokenizer": TokenizerStage, "dit": DiTStage, "distill": DistillStage}


@dataclass
class Run:
    """Everything a run's steps use, built once by `setup`: the stage and its model (plain, parallelized, EMA),
    the optimiser and schedule, the data, the checkpoints, and where the run is (step, samples seen)."""

    args: argparse.Namespace
    env: Env
    stage: object
    plain: nn.Module
    model: nn.Module
    ema: nn.Module
    opt: torch.optim.Optimizer
    sched: object
    loader: object
    ckpts: Checkpoints
    out: Path
    resolved: dict
    strategy: str
    bucket_index: dict
    trainable: set
    options: StateDictOptions | None  # with frozen weights (LoRA), checkpoints hold the trained ones alone
    latest: Path | None  # the newest complete checkpoint when the run started
    lock: RunLock | None  # rank 0's hold on the run folder
    resume_entry: dict | None  # what this resume changes, recorded in config.json once the checkpoint loads
    step: int = 0
    samples_seen: int = 0
    recent_losses: list = field(default_factory=list)  # the last DIVERGENCE_HISTORY steps' mean losses

    def tensor_state(self) -> dict:
        model_sd, optim_sd = get_state_dict(self.model, self.opt, options=self.options)
        ema_sd = get_model_state_dict(self.ema)
        if self.options is not None:
            ema_sd = {k: v for k, v in ema_sd.items() if k.removeprefix("module.") in self.trainable or k == "n_averaged"}
        return {"model": model_sd, "optim": optim_sd, "ema": ema_sd, "stage": self.stage.state_dict()}

    def state_record(self) -> dict:
        """What an export says of the run it came from (model/run.json)."""
        recent = self.recent_losses[-self.args.log_every:]
        return {"step": self.step, "steps": self.args.steps, "finished": self.step >= self.args.steps,
                "recent_loss": sum(recent) / len(recent) if recent else None, "losses_finite": True}

    def save_checkpoint(self) -> None:
        trainer_state = {"step": self.step, "samples_seen": self.samples_seen, "scheduler": self.sched.state_dict(),
                         "recent_losses": self.recent_losses}
        exported = self.out / "model"
        path = self.ckpts.save(self.step, self.tensor_state(), trainer_state,
                               {"rng": rng_state(self.env.device), "data": self.loader.state_dict()},
                               reserve_bytes=folder_bytes(exported) if exported.is_dir() else 0)
        full = get_model_state_dict(self.ema.module, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        if self.env.main:
            export_model(self.stage, self.ema.module, full, exported, self.step, self.state_record())
            log.info("checkpoint: %s", path)


def train(args) -> Path:
    """Train one stage to --steps (or until a stop), resuming from the run's last checkpoint; returns --out."""
    run = setup(args)
    try:
        if resume(run):
            run_steps(run)
    finally:
        if run.lock is not None:
            run.lock.release()
    return run.out


def run_steps(run: Run) -> None:
    """The steps from where the run is to --steps, or to a stop, and the run's end."""
    args, env, stage = run.args, run.env, run.stage
    metrics = MetricsLog(run.out / "metrics.jsonl", env, args, run.resolved, run.step)
    stops = Stops(args, run.step)
    bar = tqdm(total=args.steps, initial=run.step, disable=not env.main or args.no_progress, dynamic_ncols=True,
               desc=args.stage)
    data, window = iter(run.loader), Window(env.device)
    last_batch, stopped = None, None  # stopped: why the run ends early with a checkpoint (SIGTERM, --exit-after)
    try:
        while run.step < args.steps:
            last_batch, logs, time_up, stopping = train_step(run, data, window, stops)
            bar.update(1)
            if run.step % args.log_every == 0 or run.step == args.steps:
                record = log_record(run, window, logs)
                metrics.write(record)
                bar.set_postfix(loss=f"{record['loss']:.4f}", lr=f"{record['lr']:.2e}")
                window = Window(env.device)
            if args.preview_every and run.step % args.preview_every == 0 and run.step < args.steps:
                paths, logs = run_preview(stage, run.ema, run.step, run.out, last_batch, env)
                metrics.write({"step": run.step} | logs, paths)
            if time_up and run.step < args.steps:
                if env.main:
                    log.info("--max-minutes %g reached at step %d: finishing the run here", args.max_minutes, run.step)
                break
            if (stopped := stops.early(run.step, stopping)):
                break
            if args.checkpoint_every and run.step % args.checkpoint_every == 0 and run.step < args.steps:
                run.save_checkpoint()
    finally:
        bar.close()
        stops.close()
    finish(run, metrics, last_batch, stopped)


def setup(args) -> Run:
    """The stage, its model parallelized with an EMA beside it, the optimiser, the data and the run folder."""
    env = setup_distributed(args.device, args.sp_size)
    logging.basicConfig(level=logging.INFO if env.main else logging.WARNING, format="%(message)s", force=True)
    lock = hold_run_folder(Path(args.out), env)
    try:
        return _setup(args, env, lock)
    except BaseException:
        if lock is not None:
            lock.release()
        raise


def hold_run_folder(out: Path, env: Env) -> RunLock | None:
    """Rank 0's lock on the run folder; every rank stops with one line when another train.py holds it."""
    lock, refusal = None, None
    if env.main:
        try:
            lock = RunLock(out)
        except InputError as e:
            refusal = e
    if all_reduce_sum([float(refusal is not None)], env.device)[0]:
        raise refusal or InputError(f"{out} is in use by another train.py")
    return lock


def _setup(args, env: Env, lock: RunLock | None) -> Run:
    torch.manual_seed(args.seed)  # the same initial weights on every rank
    stage = STAGES[args.stage](args, env)
    if args.precision == "bf16" and env.device.type == "cpu" and env.main and not cpu_has_native_bf16():
        log.warning("--precision bf16: this CPU has no AMX or AVX512-BF16, so bf16 runs emulated and slower than "
                    "float32; --precision auto trains faster here")
    buckets = None
    if args.buckets:
        buckets = parse_buckets(args.buckets, args.batch_size)
        check_divisible(buckets, stage.shape_multiple(), stage.check_frames)
        stage.crop = fixed_crop(buckets)
    out = Path(args.out)
    ckpts = Checkpoints(out / "checkpoints", env, args.keep_checkpoints)
    latest = ckpts.latest()
    resolved, resume_entry = resolve_run(args, stage, env, resuming=latest is not None)
    plain = stage.model
    if env.main:
        recover_folder(out / "model")  # a swap killed half-way
    if latest is None:
        stage.initialize()

    ema = ema_model(plain, args.ema_decay)
    strategy = args.parallel if env.world > 1 else "none"
    # FSDP2 gathers parameters in the forward's dtype on CUDA; on the CPU they stay float32 (autocast alone)
    param_dtype = compute_dtype(env.device, args.precision) if env.device.type == "cuda" else None
    model = parallelize(plain, env, ParallelOptions(stage.block_types, strategy, args.checkpoint_activations, args.compile,
                                                    param_dtype))
    # the EMA runs previews under the same token split per rank, and is sharded like the model under FSDP2
    parallelize(ema.module, env, ParallelOptions(stage.block_types, "fsdp" if strategy == "fsdp" else "none",
                                                 param_dtype=param_dtype))
    opt, sched = build_optimizer(model, args, env.device)
    loader = make_loader(args.data, args.batch_size, None if args.latents else args.frames,
                         None if args.latents else args.size, mode="train", num_workers=args.num_workers,
                         fps=args.fps, seed=args.seed, zoom=args.zoom, hflip=args.hflip, shuffle_buffer=args.shuffle_buffer,
                         rank=env.dp_rank, world_size=env.dp_world, buckets=buckets, backlog=args.bucket_backlog,
                         packing=stage.packing(args.pack, args.pack_pool) if args.pack else None)
    stage.buckets, stage.schedule = buckets, loader.dataset.schedule  # the buckets, and how much of the data each holds
    trainable = {name for name, p in plain.named_parameters() if p.requires_grad}
    partial = len(trainable) < sum(1 for _ in plain.parameters())
    options = StateDictOptions(ignore_frozen_params=True, strict=False) if partial else None
    return Run(args, env, stage, plain, model, ema, opt, sched, loader, ckpts, out, resolved, strategy,
               {b.name: i for i, b in enumerate(buckets or [])}, trainable, options, latest, lock, resume_entry)


def resume(run: Run) -> bool:
    """Continue from the newest intact checkpoint, if any; False when the run is already trained to --steps."""
    args, env = run.args, run.env
    loaded = run.ckpts.load_newest(run.tensor_state) if run.latest is not None else None
    if loaded is None:
        if env.main:
            n_params = sum(p.numel() for p in run.plain.parameters() if p.requires_grad)
            log.info("training the %s stage (%s preset, %.2fM parameters) on %d process(es)%s, %s, into %s", args.stage,
                     args.preset, n_params / 1e6, env.world,
                     f" ({env.dp_world} data-parallel x {env.sp} sequence-parallel)" if env.sp > 1 else "", env.device,
                     run.out)
        return True
    latest, state, trainer_state, rank_state = loaded
    set_state_dict(run.model, run.opt, model_state_dict=state["model"], optim_state_dict=state["optim"],
                   options=run.options)
    set_model_state_dict(run.ema, state["ema"], options=run.options)
    run.stage.load_state_dict(state["stage"])
    run.sched.load_state_dict(trainer_state["scheduler"])
    run.step, run.samples_seen = trainer_state["step"], trainer_state["samples_seen"]
    run.recent_losses = list(trainer_state.get("recent_losses", []))
    run.resolved = record_resume(run.resolved, run.resume_entry, run.step, run.out, env.main)
    set_rng_state(rank_state["rng"], env.device)
    exact = run.loader.load_state_dict(rank_state["data"])
    if env.main:
        log.info("resuming %s from %s (step %d of %d)%s", run.out, latest, run.step, args.steps,
                 "" if exact else "; the data layout changed, so the data stream starts afresh")
    if run.step >= args.steps:
        if env.main:
            log.info("%s is already trained to step %d; nothing to do (raise --steps to train on)", run.out, run.step)
        return False
    return True


def train_step(run: Run, data, window: "Window", stops: "Stops") -> tuple[dict, dict, bool, bool]:
    """One optimiser step of --grad-accum micro-batches; returns (the last batch, the stage's logs, whether
    --max-minutes is up, whether SIGTERM came), decided alike on every rank. Host syncs: loss.item() per
    micro-batch and the one collective per step, which every rank needs anyway."""
    args, env, model, stage = run.args, run.env, run.model, run.stage
    t0 = time.perf_counter()
    model.train()
    logs: dict = {}
    loss_sum, shape_code, step_samples = 0.0, 0.0, 0
    for micro in range(args.grad_accum):
        batch = next(data)
        last = micro == args.grad_accum - 1
        sync = contextlib.nullcontext()
        if not last and isinstance(model, nn.parallel.DistributedDataParallel):
            sync = model.no_sync()
        elif run.strategy == "fsdp":
            model.set_requires_gradient_sync(last)
        with sync:
            loss, micro_logs = stage.loss(model, batch, run.step)
            (loss / args.grad_accum).backward()
        logs |= micro_logs | stage.after_backward(run.step, last, args.grad_accum)
        loss_sum += loss.item()
        shape_code += (micro + 1) * (1 + run.bucket_index.get(batch.get("bucket"), -1))
        step_samples += len(batch["key"])
        window.samples += len(batch["key"]) * env.dp_world
        window.tokens += stage.tokens(batch) * len(batch["key"]) * env.dp_world
    grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), args.grad_clip if args.grad_clip > 0 else float("inf"))
    if hasattr(grad_norm, "full_tensor"):
        grad_norm = grad_norm.full_tensor()
    total, nonfinite, stopping, time_up, codes, codes_sq, all_samples = all_reduce_sum(  # one collective: every rank decides alike
        [loss_sum / args.grad_accum, float(not math.isfinite(loss_sum)), float(stops.signal != 0),
         float(stops.time_up()), shape_code, shape_code ** 2, float(step_samples)], env.device)
    if codes * codes != env.world * codes_sq:  # equal on every rank exactly when the sum of squares says so
        raise RuntimeError(f"step {run.step + 1}: the ranks trained different buckets (this rank's last: "
                           f"{batch.get('bucket')}); the bucket schedule must be the same on every rank")
    mean_loss = total / env.world
    why = divergence(mean_loss, float(grad_norm), bool(nonfinite), run.recent_losses, args.divergence_factor)
    if why:
        stop_diverged(run, why)
    run.recent_losses = (run.recent_losses + [mean_loss])[-DIVERGENCE_HISTORY:]
    run.opt.step()
    run.sched.step()
    run.opt.zero_grad(set_to_none=True)
    run.ema.update_parameters(run.plain)
    run.step += 1
    run.samples_seen += round(all_samples) // env.sp  # the ranks of a sequence-parallel group share their clips
    window.add(time.perf_counter() - t0, mean_loss, float(grad_norm))
    return batch, logs, bool(time_up), bool(stopping)


DIVERGENCE_HISTORY = 50  # steps whose median loss an exploding one is measured against


def divergence(loss: float, grad_norm: float, nonfinite: bool, recent: list[float], factor: float) -> str | None:
    """Why this step's loss says the run has diverged, or None: a loss or gradient that is not finite, or (with
    factor > 0) a loss above factor times the median of the recent steps', long before it overflows (lr 1e6
    went from 2 to 1.9e15 in one step, and to NaN in the next)."""
    if nonfinite or not math.isfinite(loss) or not math.isfinite(grad_norm):
        return f"the loss is {loss:g} (grad norm {grad_norm:g})"
    if factor > 0 and recent:
        median = sorted(recent)[len(recent) // 2]
        if median > 0 and loss > factor * median:
            return (f"the loss is {loss:.4g}, {loss / median:.3g} times the median of the last {len(recent)} steps' "
                    f"({median:.4g}; --divergence-factor {factor:g})")
    return None


def stop_diverged(run: Run, why: str) -> None:
    """Stop before the update. The weights that gave this loss are the current step's: a checkpoint of this step
    and an export of it are set aside (renamed diverged_*, kept for a look, never resumed or sampled from), so the
    run resumes from the last checkpoint before it and nothing exported from diverged weights is left in model/."""
    bad_step, aside = run.step, []
    if run.env.main:
        aside = run.ckpts.set_aside(bad_step)
        exported = run.out / "model"
        record = exported / "run.json"
        step = json.loads(record.read_text()).get("step") if record.is_file() else None
        if exported.is_dir() and (step is None or step >= bad_step):
            target = run.out / f"model.diverged_step_{bad_step:08d}"
            shutil.rmtree(target, ignore_errors=True)
            aside.append(exported.rename(target))
    barrier()
    kept = run.ckpts.latest()
    raise InputError(f"{why} at step {run.step + 1}: the run has diverged; stopped before the update"
                     + (f", and set aside what holds step {bad_step}'s weights ({', '.join(p.name for p in aside)})"
                        if aside else "")
                     + f". The last good checkpoint is {kept or 'none (no checkpoint before it)'}; lower --lr or raise "
                     f"--warmup, then run the same command to resume from it")


def log_record(run: Run, window: "Window", logs: dict) -> dict:
    """The metrics line of a logging window, with the skip counts summed over the ranks."""
    loader, env = run.loader, run.env
    skipped, distinct, short = all_reduce_sum(
        [loader.samples_skipped, len(loader.unique_skips), len(loader.short_files)], env.device)
    record = {"step": run.step, "lr": run.sched.get_last_lr()[0], "skipped_samples": int(skipped),
              "skipped_distinct": int(distinct), "short_files": int(short)} | window.record() | logs
    return record | {f"bucket_samples/{name}": n * env.dp_world for name, n in sorted(loader.bucket_samples.items())}


class Stops:
    """What ends a run before --steps: SIGTERM (preemption), Ctrl-C (SIGINT), --exit-after N steps, --max-minutes.
    Either signal ends the run at the end of the step with a checkpoint; a second Ctrl-C stops it at once."""

    def __init__(self, args, step: int):
        self.args, self.signal = args, 0
        self.previous = {s: signal.signal(s, self._on_signal) for s in (signal.SIGTERM, signal.SIGINT)}
        self.stop_at = args.exit_after and step + args.exit_after
        self.started = time.perf_counter()

    def _on_signal(self, signum, frame) -> None:
        self.signal = signum
        if signum == signal.SIGINT:
            signal.signal(signal.SIGINT, signal.default_int_handler)  # the second Ctrl-C: KeyboardInterrupt

    def time_up(self) -> bool:
        return bool(self.args.max_minutes) and time.perf_counter() - self.started > 60 * self.args.max_minutes

    def early(self, step: int, signalled: bool) -> str | None:
        """Why the run stops here with a checkpoint, or None to go on."""
        if step < self.args.steps and (signalled or (self.stop_at and step >= self.stop_at)):
            if not signalled:
                return f"--exit-after {self.args.exit_after}"
            return INTERRUPTED if self.signal == signal.SIGINT else "preempted (SIGTERM)"
        return None

    def close(self) -> None:
        for s, handler in self.previous.items():
            signal.signal(s, handler)


INTERRUPTED = "interrupted (Ctrl-C)"


def finish(run: Run, metrics: MetricsLog, last_batch: dict | None, stopped: str | None) -> None:
    """The run's end: a checkpoint; when it ran to its end, the stage's last measurements and a preview too."""
    env = run.env
    if stopped:
        run.save_checkpoint()
        if stopped == INTERRUPTED:
            metrics.close()
            raise Interrupted(f"interrupted at step {run.step} (Ctrl-C): checkpoint written; run the same command to "
                              f"resume")
        if env.main:
            log.info("stopped at step %d (%s): checkpoint written; run the same command to resume", run.step, stopped)
    else:
        stats = run.stage.finish(run.ema.module)
        if stats and env.main:
            log.info("latent statistics measured on the data: mean %s, std %s",
                     [round(v, 3) for v in stats["latent_mean"]], [round(v, 3) for v in stats["latent_std"]])
        run.save_checkpoint()
        if last_batch is not None:
            paths, logs = run_preview(run.stage, run.ema, run.step, run.out, last_batch, env)
            metrics.write({"step": run.step} | logs, paths)
        if env.main:
            log.info("done: %d steps, %s. EMA weights for sampling: %s", run.step, run.loader.report(), run.out / "model")
    metrics.close()


def fixed_crop(buckets) -> tuple[int, tuple[int, int]]:
    """With buckets, the one shape of what reads clips outside the stream (the tokenizer's linear start and latent
    statistics): the shortest, smallest video bucket, which the most clips fill."""
    videos = [b for b in buckets if b.frames > 1] or list(buckets)
    b = min(videos, key=lambda b: (b.frames, b.height * b.width))
    return b.frames, (b.height, b.width)


class Window:
    """What one logging window averages: loss, grad norm, samples/s and tokens/s, and its peak memory."""

    def __init__(self, device: torch.device):
        self.loss = self.grad_norm = self.time = 0.0
        self.n = self.samples = self.tokens = 0
        self.memory = PeakMemory(device, collect_garbage=False).start()  # no gc pass on the training loop

    def add(self, seconds: float, loss: float, grad_norm: float) -> None:
        self.time += seconds
        self.loss += loss
        self.grad_norm += grad_norm
        self.n += 1

    def record(self) -> dict:
        self.memory.stop()
        return {"loss": self.loss / self.n, "grad_norm": self.grad_norm / self.n, "samples_per_s": self.samples / self.time,
                "tokens_per_s": self.tokens / self.time, "memory_held_gb": self.memory.held_mb / 1024,
                "memory_peak_gb": self.memory.peak_mb / 1024}


def export_model(stage, ema: nn.Module, state: dict, target: Path, step: int, record: dict | None = None) -> None:
    """OUT/model as a whole: the stage writes a sibling folder, which then takes model/'s place, so model/ is
    always one step's weights, complete (see checkpoint_io.replace_folder); `record` (the run's state: step,
    whether it finished, its recent loss) goes beside them as run.json."""
    staging = target.with_name(f".{target.name}.next")
    shutil.rmtree(staging, ignore_errors=True)
    try:
        stage.export(ema, state, staging, step, previous=target if target.is_dir() else None)
        write_json_atomic(staging / "run.json", record or {"step": step})
        replace_folder(staging, target)
    except BaseException as e:
        shutil.rmtree(staging, ignore_errors=True)
        if out_of_space(e):
            raise InputError(f"no space left on {mount_point(target.parent)} while writing {staging}; {target} is "
                             f"still the last complete export") from None
        raise


def run_preview(stage, ema, step: int, out: Path, batch: dict, env: Env) -> tuple[list[Path], dict]:
    """Preview videos by the EMA weights and their scores (every rank runs the model, as FSDP needs; rank 0
    writes): reconstruction PSNR for the tokenizer, the motion benchmark for synthetic-grammar prompts."""
    ema.module.eval()
    items, logs = stage.preview(ema.module, batch)
    if not env.main:
        return [], {}
    directory = out / "previews" / f"step_{step:08d}"
    fps = float(stage.args.fps or batch["fps"][0].item() or 8.0)  # the training --fps, else the clips' own, else 8
    paths = []
    for i, (name, video, caption) in enumerate(items):  # names are shard keys and captions: made safe, never a path
        paths.append(write_video(directory / f"{i:02d}_{video_name(name)}.mp4", video, fps=fps))
        if caption is not None:
            write_text_atomic(paths[-1].with_suffix(".txt"), caption + "\n")
    log.info("previews: %s%s", directory, "".join(f", {k} {v:.3f}" for k, v in logs.items()))
    return paths, logs
