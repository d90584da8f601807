"""Few-step sampling: a teacher run's sampler against fewer steps, higher-order solvers, step caching and its
distilled students, on the same captions and seeds.

    python bench/few_step.py --teacher runs/quickstart/dit --manifest runs/quickstart/shards/manifest.json
                             [--captions holdout] [--student runs/student ...] [--k 4] [--cache 0.05 0.1] [--i3d I3D.pt]
                             [--out bench/results/few_step_quickstart]
    python bench/few_step.py --wan [--out bench/results/few_step_wan]

Rows: the teacher with its own sampler (the reference: its steps, guidance and solver), the teacher with Euler
at 4 and 8 steps and UniPC at 8 and 20 (the undistilled baselines), the reference with step caching at each
--cache threshold, and each student at each step count it was distilled for (one pass a step, no guidance).
Columns, over K videos per held-out caption (seeds 0..K-1, the same for every row): the DiT's passes per
video (counted at the model, so guidance counts twice; a step whose blocks caching skipped does not count, though
its embedding and output layers still run), wall seconds per video
of sampling (the row's videos in one batch, the fastest of three runs, nothing else running) and how many
times faster than the reference that is, and of decoding (the same for every row), the motion scores from the
pixels (presence, colour, shape, direction, R² of the trajectory), the gap to the reference (RMS of the
latent difference from the reference's video of the same caption and seed, over the reference's RMS) and,
with a local I3D (--i3d), FVD against the reference's own videos.

--wan: our sampler against diffusers' WanPipeline on one tiny random Wan2.1 (built here from configs, saved
with save_pretrained) with UniPC, the scheduler Wan2.1 ships: the same steps and seed, the largest pixel
difference and the time of each, as a ratio.

Writes OUT.json and OUT.md.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from bench.common import markdown_table  # noqa: E402
from errors import InputError  # noqa: E402

METRICS = ("presence", "color", "shape", "direction", "linearity")


class PassCounter:
    """Counts the batch rows the DiT sees (one pass of one video per row), around Pipeline.model."""

    def __init__(self, pipe):
        self.rows, self.forward = 0, pipe.model.forward

        def counted(x, *args, **kwargs):
            self.rows += x.shape[0] if torch.is_tensor(x) else len(x)
            return self.forward(x, *args, **kwargs)

        pipe.model.forward = counted


def row(pipe, name: str, jobs: list[tuple[str, int]], sampler: dict, held: set, train: set, reference=None,
        repeats: int = 3) -> dict:
    from data import tensor_to_frames
    from evaluation.motion_score import group_of, score_frames, summarise

    times = []
    for repeat in range(repeats):  # the fastest of a few: the tiny model's runs are short and the machine's noise is not
        counter = PassCounter(pipe) if repeat == 0 else None  # passes counted on the first run
        pipe.cache_reports.clear()
        t0 = time.perf_counter()
        z = pipe.generate([c for c, _ in jobs], pipe.defaults["frames"], *pipe.size, seeds=[s for _, s in jobs], **sampler)
        times.append(time.perf_counter() - t0)
        if counter is not None:
            pipe.model.forward = counter.forward
            skipped = sum(r["passes"] - r["passes_run"] for r in pipe.cache_reports)  # calls whose blocks were skipped
            passes = (counter.rows - skipped) / len(jobs)
    t0 = time.perf_counter()
    videos = pipe.decode(z)
    decode = time.perf_counter() - t0
    scores = [score_frames(tensor_to_frames(v), c, seen=group_of(c, held, train)) for v, (c, _) in zip(videos, jobs)]
    out = {"row": name, "sampler": dict(sampler), "passes": passes, "s_per_video": min(times) / len(jobs),
           "decode_s_per_video": decode / len(jobs), "summary": summarise(scores)["all"], "latents": z, "videos": videos}
    if reference is not None:
        ref = reference["latents"]
        out["gap"] = float(((z - ref).pow(2).mean() / ref.pow(2).mean()).sqrt())
    return out


def fvd_against(i3d: str, reference: torch.Tensor, videos: torch.Tensor) -> float:
    from evaluation.fvd import FrechetVideoDistance

    fvd = FrechetVideoDistance.from_local(i3d)
    fvd.update(reference, videos)
    return float(fvd.compute())


def quality(args) -> list[dict]:
    from evaluation.generator import captions_for
    from evaluation.motion_score import caption_groups
    from pipeline import Pipeline

    captions = captions_for(args.captions, args.manifest)
    held, train = caption_groups(args.manifest)
    teacher = Pipeline.load(args.teacher)
    d = teacher.defaults["sampler"]
    own = dict(steps=d["steps"], guidance=d["guidance"], solver=d.get("solver", "euler"))
    jobs = [(c, s) for c in captions for s in range(args.k)]
    ref = row(teacher, f"teacher, {own['solver']} {own['steps']} steps (reference)", jobs, own, held, train)
    ref["gap"] = 0.0
    rows = [ref]
    for solver, steps in (("euler", 4), ("euler", 8), ("unipc", 8), ("unipc", 20)):
        rows.append(row(teacher, f"teacher, {solver} {steps} steps", jobs, own | dict(steps=steps, solver=solver),
                        held, train, ref))
    for threshold in args.cache:
        rows.append(row(teacher, f"teacher, {own['solver']} {own['steps']} steps, cache {threshold:g}", jobs,
                        own | dict(cache=threshold), held, train, ref))
    for path in args.student:
        student = Pipeline.load(path)
        record = student.defaults["sampler"]
        trained = record.get("student", {}).get("steps", [record["steps"]])
        for steps in trained:
            rows.append(row(student, f"student {Path(path).name}, {steps} steps", jobs,
                            dict(steps=steps, guidance=record["guidance"], solver="euler"), held, train, ref))
    for r in rows:
        if args.i3d:
            r["fvd"] = fvd_against(args.i3d, ref["videos"], r["videos"])
        del r["latents"], r["videos"]
    return rows


def wan_rows() -> list[dict]:
    """Ours against diffusers' WanPipeline (UniPC, flow shift 3) on a tiny random Wan2.1 folder."""
    import diffusers
    import transformers
    from pipeline import Pipeline
    from tests.conftest import write_word_tokenizer

    words = ["a", "red", "circle", "moving", "left", "blurry", "static"]
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / "wan"
        tokenizer, vocab = write_word_tokenizer(Path(tmp) / "tok", words)
        torch.manual_seed(0)
        text = transformers.UMT5EncoderModel(transformers.UMT5Config(
            vocab_size=vocab, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4, pad_token_id=0, eos_token_id=1,
            decoder_start_token_id=0)).eval()
        transformer = diffusers.WanTransformer3DModel(
            patch_size=(1, 2, 2), num_attention_heads=4, attention_head_dim=32, in_channels=16, out_channels=16,
            text_dim=32, freq_dim=256, ffn_dim=256, num_layers=4, cross_attn_norm=True,
            qk_norm="rms_norm_across_heads", eps=1e-6, rope_max_seq_len=64).eval()
        with torch.no_grad():
            for p in transformer.parameters():
                p.add_(0.05 * torch.randn_like(p))
        vae = diffusers.AutoencoderKLWan(base_dim=16, z_dim=16, dim_mult=[1, 2, 2, 2], num_res_blocks=1,
                                         temperal_downsample=[False, True, True]).eval()
        scheduler = diffusers.UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True,
                                                      flow_shift=3.0, solver_order=2)
        diffusers.WanPipeline(tokenizer=tokenizer, text_encoder=text, transformer=transformer, vae=vae,
                              scheduler=scheduler).save_pretrained(root)
        theirs_pipe = diffusers.WanPipeline.from_pretrained(root)
        ours_pipe = Pipeline.load(root)
        frames, height, width, seed = 17, 64, 96, 3
        out = []
        for steps in (8, 20):
            noise = torch.randn(ours_pipe.latent_shape(frames, height, width), generator=torch.Generator().manual_seed(seed))
            ours_s, theirs_s = [], []
            for _ in range(3):  # alternated, the fastest of each
                t0 = time.perf_counter()
                z = ours_pipe.generate(["a red circle moving left"], frames, height, width, steps=steps, guidance=5.0,
                                       seeds=[seed], negative="blurry static")
                ours = ((ours_pipe.decode(z)[0] + 1) / 2).permute(1, 2, 3, 0).numpy()
                ours_s.append(time.perf_counter() - t0)
                t0 = time.perf_counter()
                theirs = theirs_pipe(prompt="a red circle moving left", negative_prompt="blurry static", height=height,
                                     width=width, num_frames=frames, num_inference_steps=steps, guidance_scale=5.0,
                                     latents=noise[None], output_type="np").frames[0]
                theirs_s.append(time.perf_counter() - t0)
            ours_s, theirs_s = min(ours_s), min(theirs_s)
            out.append({"steps": steps, "max_abs_difference": float(np.abs(ours - theirs).max()), "ours_s": ours_s,
                        "diffusers_s": theirs_s, "ratio": theirs_s / ours_s})
    return out


def tables(rows: list[dict], wan: list[dict]) -> str:
    parts = []
    if rows:
        fvd = any("fvd" in r for r in rows)
        base = rows[0]["s_per_video"]
        body = [[r["row"], f"{r['passes']:.1f}", f"{r['s_per_video']:.4f}", f"{base / r['s_per_video']:.1f}x",
                 f"{r['decode_s_per_video']:.4f}", *(f"{r['summary'][m]:.3f}" for m in METRICS),
                 f"{r['gap']:.3f}", *([f"{r.get('fvd', float('nan')):.1f}"] if fvd else [])] for r in rows]
        parts.append(markdown_table(["sampler", "DiT passes / video", "sampling s / video", "faster",
                                     "decoding s / video", "presence", "colour", "shape",
                                     "direction", "R²", "gap to reference", *(["FVD"] if fvd else [])], body))
    if wan:
        parts.append(markdown_table(["UniPC steps", "largest pixel difference", "ours s", "diffusers s",
                                     "diffusers / ours"],
                                    [[w["steps"], f"{w['max_abs_difference']:.1e}", f"{w['ours_s']:.2f}",
                                      f"{w['diffusers_s']:.2f}", f"{w['ratio']:.2f}x"] for w in wan]))
    return "\n\n".join(parts)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--teacher", help="a DiT run folder: the reference sampler and the baselines")
    p.add_argument("--manifest", help="the training shards' manifest.json (its held-out captions are sampled)")
    p.add_argument("--captions", default="holdout", help="holdout, train, all (the synthetic set's) or a file of captions")
    p.add_argument("--student", nargs="*", default=[], help="distilled students of the teacher (train.py --stage distill)")
    p.add_argument("--videos-per-prompt", "--k", dest="k", type=int, default=4, help="videos per caption, seeds 0..K-1")
    p.add_argument("--cache", type=float, nargs="*", default=[0.05, 0.1], help="step caching thresholds")
    p.add_argument("--i3d", help="a local TorchScript I3D: FVD of each row against the reference's videos")
    p.add_argument("--wan", action="store_true", help="also: our sampler against WanPipeline on a tiny random Wan2.1")
    p.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "few_step")
    args = p.parse_args(argv)
    if not args.teacher and not args.wan:
        p.error("give --teacher RUN (with --manifest), --wan, or both")
    try:
        rows = quality(args) if args.teacher else []
    except InputError as e:
        raise SystemExit(f"error: {e}") from None
    wan = wan_rows() if args.wan else []
    text = tables(rows, wan)
    print(text)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps({"teacher": args.teacher, "students": args.student, "k": args.k,
                                                         "rows": rows, "wan": wan}, indent=1))
    args.out.with_suffix(".md").write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
