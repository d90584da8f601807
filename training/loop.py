"""The training loop: one stage (tokenizer or DiT), one to many processes, exact resume.

    out = train(args)    # args from training.options.build_parser()

Every rank builds the stage's model from the same seed, wraps it with `parallelize` (sequence parallelism,
activation checkpointing, compile, DDP or FSDP2), and keeps an EMA of it for previews and export. Each step
runs --grad-accum micro-batches, clips the gradient, checks the loss is finite on every rank (one
collective), steps the optimiser, scheduler and EMA. Checkpoints hold everything a resumed run needs to take
the uninterrupted run's steps; SIGTERM, --exit-after and --max-minutes end a run with one.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import shutil
import signal
import time
from pathlib import Path

import torch
import torch.nn as nn
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict, get_state_dict,
                                                     set_model_state_dict, set_state_dict)
from tqdm import tqdm

from checkpoint_io import recover_folder, replace_folder, write_json_atomic, write_text_atomic
from data import make_loader, write_video
from data.buckets import check_divisible, parse_buckets
from errors import InputError
from evaluation.peak_memory import PeakMemory
from parallel import Env, ParallelOptions, all_reduce_sum, parallelize, setup_distributed

from .checkpoint import Checkpoints, folder_bytes, mount_point, out_of_space, rng_state, set_rng_state
from .dit_stage import DiTStage
from .metrics import MetricsLog
from .optim import build_optimizer, ema_model
from .options import build_parser
from .stage import compute_dtype, cpu_has_native_bf16
from .tokenizer_stage import TokenizerStage

log = logging.getLogger("train")

STAGES = {"tokenizer": TokenizerStage, "dit": DiTStage}
# options that change nothing a run computes: changing them on resume is not worth a warning
COSMETIC = {"no_progress", "wandb", "wandb_project", "wandb_run_name", "log_every", "preview_every", "num_workers"}


def resolve_run(args, stage, env: Env) -> tuple[dict, Path]:
    """Write (or check) OUT/config.json; a different stage or model in an existing run is an error."""
    out = Path(args.out)
    resolved = json.loads(json.dumps({"args": vars(args), "model": stage.config_dict(), "world_size": env.world},
                                     default=str))  # as it reads back from disk
    config_path = out / "config.json"
    if config_path.is_file():
        old = json.loads(config_path.read_text())
        if old["args"]["stage"] != args.stage or old["model"] != resolved["model"]:
            raise InputError(f"{out} holds a {old['args']['stage']} run with another model configuration; give "
                             f"another --out, or the same --stage, --preset and --override to resume it")
        parser = build_parser()  # an option newer than the run is unchanged where it keeps its default
        before = lambda k: old["args"][k] if k in old["args"] else json.loads(json.dumps(parser.get_default(k)))  # noqa: E731
        changed = sorted(k for k, v in resolved["args"].items() if before(k) != v and k not in COSMETIC)
        if changed and env.main:
            log.warning("options changed since %s was started: %s", out, ", ".join(changed))
    if env.main:
        write_json_atomic(config_path, resolved, sort_keys=False)
    return resolved, out


def train(args) -> Path:
    env = setup_distributed(args.device, args.sp_size)
    logging.basicConfig(level=logging.INFO if env.main else logging.WARNING, format="%(message)s", force=True)
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
    resolved, out = resolve_run(args, stage, env)
    plain = stage.model
    n_params = sum(p.numel() for p in plain.parameters() if p.requires_grad)
    ckpts = Checkpoints(out / "checkpoints", env, args.keep_checkpoints)
    if env.main:
        recover_folder(out / "model")  # a swap killed half-way
    latest = ckpts.latest()
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
    bucket_index = {b.name: i for i, b in enumerate(buckets or [])}

    # with frozen weights (LoRA), checkpoints hold the trained ones alone: the rest comes from --init on resume
    trainable = {name for name, p in plain.named_parameters() if p.requires_grad}
    partial = len(trainable) < sum(1 for _ in plain.parameters())
    options = StateDictOptions(ignore_frozen_params=True, strict=False) if partial else None

    def tensor_state() -> dict:
        model_sd, optim_sd = get_state_dict(model, opt, options=options)
        ema_sd = get_model_state_dict(ema)
        if partial:
            ema_sd = {k: v for k, v in ema_sd.items() if k.removeprefix("module.") in trainable or k == "n_averaged"}
        return {"model": model_sd, "optim": optim_sd, "ema": ema_sd, "stage": stage.state_dict()}

    step, samples_seen = 0, 0
    loaded = ckpts.load_newest(tensor_state) if latest is not None else None
    if loaded is not None:
        latest, state, trainer_state, rank_state = loaded
        set_state_dict(model, opt, model_state_dict=state["model"], optim_state_dict=state["optim"], options=options)
        set_model_state_dict(ema, state["ema"], options=options)
        stage.load_state_dict(state["stage"])
        sched.load_state_dict(trainer_state["scheduler"])
        step, samples_seen = trainer_state["step"], trainer_state["samples_seen"]
        set_rng_state(rank_state["rng"], env.device)
        exact = loader.load_state_dict(rank_state["data"])
        if env.main:
            log.info("resuming %s from %s (step %d of %d)%s", out, latest, step, args.steps,
                     "" if exact else "; the data layout changed, so the data stream starts afresh")
        if step >= args.steps:
            if env.main:
                log.info("%s is already trained to step %d; nothing to do (raise --steps to train on)", out, step)
            return out
    elif env.main:
        log.info("training the %s stage (%s preset, %.2fM parameters) on %d process(es)%s, %s, into %s", args.stage,
                 args.preset, n_params / 1e6, env.world,
                 f" ({env.dp_world} data-parallel x {env.sp} sequence-parallel)" if env.sp > 1 else "", env.device, out)

    def save_checkpoint() -> None:
        trainer_state = {"step": step, "samples_seen": samples_seen, "scheduler": sched.state_dict()}
        exported = out / "model"
        path = ckpts.save(step, tensor_state(), trainer_state, {"rng": rng_state(env.device), "data": loader.state_dict()},
                          reserve_bytes=folder_bytes(exported) if exported.is_dir() else 0)
        full = get_model_state_dict(ema.module, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        if env.main:
            export_model(stage, ema.module, full, exported, step)
            log.info("checkpoint: %s", path)

    metrics = MetricsLog(out / "metrics.jsonl", env, args, resolved, step)
    stop = {"signal": 0}
    previous_handler = signal.signal(signal.SIGTERM, lambda signum, frame: stop.update(signal=signum))
    stopped_at = args.exit_after and step + args.exit_after
    bar = tqdm(total=args.steps, initial=step, disable=not env.main or args.no_progress, dynamic_ncols=True, desc=args.stage)
    data = iter(loader)
    window = Window(env.device)
    last_batch, stopped = None, None  # stopped: why the run ends early with a checkpoint (SIGTERM, --exit-after)
    started = time.perf_counter()
    try:
        while step < args.steps:
            t0 = time.perf_counter()
            model.train()
            logs: dict = {}
            loss_sum, shape_code, step_samples = 0.0, 0.0, 0
            for micro in range(args.grad_accum):
                batch = next(data)
                last_batch = batch
                last = micro == args.grad_accum - 1
                sync = contextlib.nullcontext()
                if not last and isinstance(model, nn.parallel.DistributedDataParallel):
                    sync = model.no_sync()
                elif strategy == "fsdp":
                    model.set_requires_gradient_sync(last)
                with sync:
                    loss, micro_logs = stage.loss(model, batch, step)
                    (loss / args.grad_accum).backward()
                logs |= micro_logs | stage.after_backward(step, last, args.grad_accum)
                loss_sum += loss.item()
                shape_code += (micro + 1) * (1 + bucket_index.get(batch.get("bucket"), -1))
                step_samples += len(batch["key"])
                window.samples += len(batch["key"]) * env.dp_world
                window.tokens += stage.tokens(batch) * len(batch["key"]) * env.dp_world
            grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), args.grad_clip if args.grad_clip > 0 else float("inf"))
            if hasattr(grad_norm, "full_tensor"):
                grad_norm = grad_norm.full_tensor()
            time_up = bool(args.max_minutes) and time.perf_counter() - started > 60 * args.max_minutes
            total, nonfinite, stopping, time_up, codes, codes_sq, all_samples = all_reduce_sum(  # one collective: every rank decides alike
                [loss_sum / args.grad_accum, float(not math.isfinite(loss_sum)), float(stop["signal"] != 0), float(time_up),
                 shape_code, shape_code ** 2, float(step_samples)], env.device)
            if codes * codes != env.world * codes_sq:  # equal on every rank exactly when the sum of squares says so
                raise RuntimeError(f"step {step + 1}: the ranks trained different buckets (this rank's last: "
                                   f"{last_batch.get('bucket')}); the bucket schedule must be the same on every rank")
            mean_loss = total / env.world
            if nonfinite or not math.isfinite(float(grad_norm)):
                kept = ckpts.latest()
                raise InputError(f"the loss is {mean_loss} (grad norm {float(grad_norm)}) at step {step + 1}; stopped "
                                 f"before the update. The last good checkpoint is "
                                 f"{kept or 'none (no checkpoint was written yet)'}; lower --lr or raise --warmup, then "
                                 f"run the same command to resume from it")
            opt.step()
            sched.step()
            opt.zero_grad(set_to_none=True)
            ema.update_parameters(plain)
            step += 1
            samples_seen += round(all_samples) // env.sp  # the ranks of a sequence-parallel group share their clips
            window.add(time.perf_counter() - t0, mean_loss, float(grad_norm))
            bar.update(1)
            if step % args.log_every == 0 or step == args.steps:
                skipped, distinct, short = all_reduce_sum(
                    [loader.samples_skipped, len(loader.unique_skips), len(loader.short_files)], env.device)
                record = {"step": step, "lr": sched.get_last_lr()[0], "skipped_samples": int(skipped),
                          "skipped_distinct": int(distinct), "short_files": int(short)} | window.record() | logs
                record |= {f"bucket_samples/{name}": n * env.dp_world for name, n in sorted(loader.bucket_samples.items())}
                metrics.write(record)
                bar.set_postfix(loss=f"{record['loss']:.4f}", lr=f"{record['lr']:.2e}")
                window = Window(env.device)
            if args.preview_every and step % args.preview_every == 0 and step < args.steps:
                paths, logs = run_preview(stage, ema, step, out, last_batch, env)
                metrics.write({"step": step} | logs, paths)
            if time_up and step < args.steps:
                if env.main:
                    log.info("--max-minutes %g reached at step %d: finishing the run here", args.max_minutes, step)
                break
            if step < args.steps and (stopping or (stopped_at and step >= stopped_at)):
                stopped = "preempted (SIGTERM)" if stopping else f"--exit-after {args.exit_after}"
                break
            if args.checkpoint_every and step % args.checkpoint_every == 0 and step < args.steps:
                save_checkpoint()
    finally:
        bar.close()
        signal.signal(signal.SIGTERM, previous_handler)
    if stopped:
        save_checkpoint()
        if env.main:
            log.info("stopped at step %d (%s): checkpoint written; run the same command to resume", step, stopped)
    else:
        stats = stage.finish(ema.module)
        if stats and env.main:
            log.info("latent statistics measured on the data: mean %s, std %s",
                     [round(v, 3) for v in stats["latent_mean"]], [round(v, 3) for v in stats["latent_std"]])
        save_checkpoint()
        if last_batch is not None:
            paths, logs = run_preview(stage, ema, step, out, last_batch, env)
            metrics.write({"step": step} | logs, paths)
        if env.main:
            log.info("done: %d steps, %s. EMA weights for sampling: %s", step, loader.report(), out / "model")
    metrics.close()
    return out


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


def export_model(stage, ema: nn.Module, state: dict, target: Path, step: int) -> None:
    """OUT/model as a whole: the stage writes a sibling folder, which then takes model/'s place, so model/ is
    always one step's weights, complete (see checkpoint_io.replace_folder)."""
    staging = target.with_name(f".{target.name}.next")
    shutil.rmtree(staging, ignore_errors=True)
    try:
        stage.export(ema, state, staging, step, previous=target if target.is_dir() else None)
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
    for name, video, caption in items:
        paths.append(write_video(directory / f"{name}.mp4", video, fps=fps))
        if caption is not None:
            write_text_atomic(paths[-1].with_suffix(".txt"), caption + "\n")
    log.info("previews: %s%s", directory, "".join(f", {k} {v:.3f}" for k, v in logs.items()))
    return paths, logs
