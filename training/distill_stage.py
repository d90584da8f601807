"""The distillation stage (train.py --stage distill --init TEACHER): a student that samples in a few steps
without classifier-free guidance, taught by a frozen teacher (a DiT run folder of ours, or Wan2.1).

The method is trajectory distillation on the student's own path. For each caption the step draws a step count
S from --distill-steps, a guidance scale w from --distill-guidance and a grid point k < S of S Euler steps on
the run's shifted grid; then
  1. the student (no gradient) takes its first k steps from the noise, reaching x_k at t_k, as it will when
     sampling, so it learns from the places its own steps lead to rather than from noised data;
  2. the teacher solves from x_k to t_{k+1} with --teacher-steps / S Euler steps of its guided velocity
     (cond + unconditional, scale w), the path 30-step guided sampling would take;
  3. the student, given (w, S) as inputs, predicts at (x_k, t_k) the mean velocity of that segment,
     (x_{k+1} - x_k) / (t_{k+1} - t_k), one pass, no guidance; the loss is the squared error.
One Euler step of the student then covers what --teacher-steps / S guided teacher steps cover. The student
starts as the teacher (its (w, S) embedding zero, DiTConfig.sampler_embed), so at initialisation it is the
teacher's conditional velocity. With --lora-rank the student is LoRA adapters on the teacher (the form Wan's
4-step LoRAs ship in): no extra inputs, so one step count and one guidance scale, sampled at guidance 1.
Data-free apart from the captions and the latent shapes of the batches (buckets give their shapes).
"""

from __future__ import annotations

import copy
import dataclasses
import json
import math
from pathlib import Path

import torch
import torch.nn as nn

from dit3d import DiT3D
from checkpoint_io import dit_folder
from dit3d.flow import FlowConfig, flow_loss, sampling_timesteps
from dit3d.lora import LoraSettings, add_lora
from errors import InputError
from parallel import Env
from pipeline import PIPELINE_FILE

from .dit_stage import DiTStage
from .stage import autocast, sample_generator


class DistillStage(DiTStage):
    name = "distill"

    def __init__(self, args, env: Env):
        if not args.init:
            raise InputError("--stage distill needs --init TEACHER: a DiT run folder (or its model/), or a Wan2.1 folder")
        if args.pack or args.condition or args.image_prob:
            raise InputError("--stage distill takes whole clips of one shape per batch: drop --pack, --condition and "
                             "--image-prob")
        self.student_steps = sorted(set(args.distill_steps))
        if min(self.student_steps) < 1 or any(args.teacher_steps % s for s in self.student_steps):
            raise InputError(f"--distill-steps {' '.join(map(str, self.student_steps))} must each divide "
                             f"--teacher-steps {args.teacher_steps} (the teacher's grid holds the student's)")
        lo, hi = args.distill_guidance or (args.guidance, args.guidance)
        if not 1 <= lo <= hi:
            raise InputError(f"--distill-guidance takes LO HI with 1 <= LO <= HI, got {lo:g} {hi:g}")
        self.guidance_range = (float(lo), float(hi))
        lora_rank, args.lora_rank = args.lora_rank, 0
        try:
            super().__init__(args, env)  # self.model: the teacher's weights, trainable
        finally:
            args.lora_rank = lora_rank
        record = dit_folder(args.init).parent / PIPELINE_FILE
        if args.shift is None and record.is_file():  # the teacher's own timestep shift, not the token rule's
            self.flow = FlowConfig(**json.loads(record.read_text())["flow"])
        self.teacher = copy.deepcopy(self.model).eval().requires_grad_(False)
        if self.model.text is not None:
            self.model.text.requires_grad_(False)  # the student reads the captions as its teacher does
        if lora_rank:
            if len(self.student_steps) > 1 or lo != hi:
                raise InputError("a LoRA student has no inputs for the step count or the guidance: give one "
                                 "--distill-steps value and one --distill-guidance scale (LO = HI)")
            self.lora = LoraSettings(lora_rank, args.lora_alpha, args.lora_dropout,
                                     tuple(t.strip() for t in args.lora_targets.split(",") if t.strip()))
            add_lora(self.model.dit, self.lora)
        else:
            teacher = self.model.dit
            student = DiT3D(dataclasses.replace(teacher.config, sampler_embed=True)).to(env.device)
            missing, unexpected = student.load_state_dict(teacher.state_dict(), strict=False)
            assert not unexpected and all(k.startswith("sampler_embed.") for k in missing), (missing, unexpected)
            student.time_scaling = teacher.time_scaling
            self.model.dit = student
        self.model.dit.null_text.requires_grad_(False)  # the student is never given a dropped caption

    @property
    def embedded(self) -> bool:
        return self.model.dit.config.sampler_embed

    def sampler_input(self, w: torch.Tensor, steps: int) -> torch.Tensor | None:
        return torch.stack([w, torch.full_like(w, float(steps))], 1) if self.embedded else None

    @torch.no_grad()
    def teacher_velocity(self, x, t, text, mask, drop, w) -> torch.Tensor:
        """The teacher's guided velocity (cond + unconditional in one batch, scale w (B,))."""
        cond, uncond = self.teacher(torch.cat([x, x]), torch.cat([t, t]), text, mask, drop).float().chunk(2)
        return uncond + w.view(-1, *([1] * (x.ndim - 1))) * (cond - uncond)

    def loss(self, model: nn.Module, batch: dict, step: int) -> tuple[torch.Tensor, dict]:
        if batch.get("packed"):
            raise InputError("--stage distill takes one shape per batch (buckets), not packed batches")
        device, seed, keys = self.env.device, self.args.seed, batch["key"]
        b = len(keys)
        gens = [sample_generator(seed, step, k, "distill") for k in keys]
        steps = self.student_steps[int(torch.randint(len(self.student_steps), (),
                                                     generator=sample_generator(seed, step, "", "distill-steps")))]
        k = torch.stack([torch.randint(steps, (), generator=g) for g in gens]).to(device)  # (B,) grid points
        lo, hi = self.guidance_range
        w = torch.stack([lo + (hi - lo) * torch.rand((), generator=g) for g in gens]).to(device)
        shape = batch["latents"].shape[1:] if "latents" in batch else self.vae.latent_shape(*batch["video"].shape[2:])
        noise = torch.stack([torch.randn(tuple(shape), generator=g) for g in gens]).to(device)
        shift = self.flow.shift_for(math.prod(self.model.dit.token_grid(tuple(noise.shape[2:]))))
        grid = sampling_timesteps(steps, shift, device)  # (S + 1,)
        fine = sampling_timesteps(self.args.teacher_steps, shift, device)
        per = self.args.teacher_steps // steps
        text2, mask2 = self.encode_text(self.teacher, list(batch["caption"]) + [""] * b)  # captions, then null twins
        text, mask = text2[:b], mask2[:b]
        drop2 = None if self.text_padding == "wan" else torch.arange(2 * b, device=device) >= b
        sampler = self.sampler_input(w, steps)
        view = lambda v: v.view(-1, *([1] * (noise.ndim - 1)))  # noqa: E731
        with torch.no_grad(), autocast(device, self.args.precision):
            x = noise
            for j in range(steps - 1):  # 1. the student's own first k steps (as many calls on every rank: FSDP)
                t = grid[j].expand(b)
                v = model(x, t, text, mask, None, None, sampler=sampler).float()
                x = torch.where(view(j < k), x + (grid[j + 1] - grid[j]) * v, x)
            start = x
            for i in range(per):  # 2. the teacher's guided steps from t_k to t_{k+1}
                t, t_next = fine[k * per + i], fine[k * per + i + 1]
                x = x + view(t_next - t) * self.teacher_velocity(x, t, text2, mask2, drop2, w)
            target = (x - start) / view(grid[k + 1] - grid[k])
        with autocast(device, self.args.precision):  # 3. one student pass at (x_k, t_k)
            v = model(start, grid[k], text, mask, None, None, sampler=sampler)
        return flow_loss(v, target), {"distill/steps": steps, "distill/guidance": w.mean().item()}

    def sampler_record(self) -> dict:
        steps = 4 if 4 in self.student_steps else max(self.student_steps)
        lo, hi = self.guidance_range
        return {"steps": steps, "guidance": round((lo + hi) / 2, 4) if self.embedded else 1.0, "solver": "euler",
                "student": {"steps": self.student_steps, "guidance": [lo, hi], "teacher_steps": self.args.teacher_steps,
                            "teacher": str(Path(self.args.init).resolve())}}

    def generate(self, ema, prompts, frames, size, steps, guidance, seed=0) -> torch.Tensor:
        """Previews as sample.py gives them: the student's own steps and guidance, one pass a step."""
        record = self.sampler_record()
        return super().generate(ema, prompts, frames, size, record["steps"], record["guidance"], seed)
