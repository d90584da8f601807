"""The shape benchmark: where a text-to-video run of the synthetic set loses the object's shape, one cause at a
time, and several runs side by side.

    python bench/shape.py --ckpt runs/quickstart/dit [OTHER_RUN ...] [--clips 8] [--out bench/results/shape]

Every measure uses clips rendered here from the synthetic grammar (the run's frames and size; every colour,
shape and direction; seeds the training set never used), so it needs no shards:

- tokenizer: the shape of the tokenizer's reconstructions (the ceiling for the DiT), and of reconstructions
  whose latents had Gaussian noise of 0.1 and 0.3 added (whether the decoder needs exact latents);
- word effect: at noise levels t, how far the DiT's clean-video prediction from the noisy latents of a clip
  moves when the caption's shape word is swapped for each other shape, as a fraction of how far the clean
  latents of the same clip with those shapes are apart (the same measure for the colour word beside it):
  1 is a model that draws whatever the caption says, 0 one that ignores the word;
- recovery: the clean latents noised to t and solved back to 0 with the true caption (the run's sampler,
  guidance 1 and the run's guidance): the shape that survives from each noise level;
- guidance: videos sampled from noise at several guidance scales, the shape right.

Prints a table per measure with a column per run, and writes OUT.json and OUT.md.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from bench.common import markdown_table  # noqa: E402
from errors import InputError  # noqa: E402

NOISE_LEVELS = (0.2, 0.4, 0.6, 0.8, 0.95)
RECOVERY_LEVELS = (0.1, 0.3, 0.5, 0.7, 0.9)
DIRECTIONS = ("left", "right", "up", "down")


def rendered(pipe, clips: int, seed: int = 1234):
    """Clips in groups that differ only in one word: (captions, videos (N, 3, T, H, W), group index, the word
    that varies within the group). For group g, the same geometry is drawn with each shape, then each colour."""
    from data import frames_to_tensor
    from data.synthetic import COLORS, SHAPES, SyntheticSpec, make_caption, render_sample

    frames = pipe.trained_frames
    spec = SyntheticSpec(frames=frames, size=pipe.size)
    captions, videos, groups, kinds = [], [], [], []
    for g in range(clips):
        colour, shape, direction = list(COLORS)[g % len(COLORS)], SHAPES[g % len(SHAPES)], DIRECTIONS[g % len(DIRECTIONS)]
        for kind, words in (("shape", [(colour, s) for s in SHAPES]), ("colour", [(c, shape) for c in COLORS])):
            for c, s in words:
                caption = make_caption(c, s, direction)
                video, _ = render_sample(caption, spec, np.random.default_rng([seed, g]))  # same place, size, speed
                captions.append(caption)
                videos.append(frames_to_tensor(video))
                groups.append(g)
                kinds.append(kind)
    return captions, torch.stack(videos), np.array(groups), np.array(kinds)


def shape_right(pipe, latents: torch.Tensor, captions: list[str]) -> float:
    from data import tensor_to_frames
    from evaluation.motion_score import score_frames

    return float(np.mean([score_frames(tensor_to_frames(v), c).shape for v, c in zip(pipe.decode(latents), captions)]))


def prediction(pipe, x: torch.Tensor, t: float, captions: list[str]) -> torch.Tensor:
    """The clean-latent prediction x - t v (no guidance) for noisy latents x at time t."""
    from pipeline import text_inputs

    text, mask = text_inputs(pipe.model, pipe.frozen_text, captions, pipe.device, fixed=True)
    v = pipe.model(x, torch.full((x.shape[0],), t, device=pipe.device), text, mask, None, None).float()
    return x - t * v


def word_effect(pipe, z: torch.Tensor, captions: list[str], groups, kinds, noise: torch.Tensor) -> dict:
    """For each word kind and noise level: the spread of the predictions across the group's captions, over the
    spread of the group's clean latents (each clip's prediction made with every caption of its group)."""
    out = {}
    for kind in ("shape", "colour"):
        rows = np.flatnonzero(kinds == kind)
        members = [rows[groups[rows] == g] for g in np.unique(groups[rows])]  # each group's clips
        clean = torch.stack([z[m] for m in members])  # (G, n, C, t, h, w)
        data_spread = (clean - clean.mean(1, keepdim=True)).pow(2).mean().sqrt()
        for t in NOISE_LEVELS:
            spreads = []
            for m in members:
                x = (1 - t) * z[m] + t * noise[m]  # (n, ...): each of the group's clips, noised
                preds = torch.stack([prediction(pipe, x, t, [captions[j]] * len(m)) for j in m])  # (captions, clips, ...)
                spreads.append((preds - preds.mean(0, keepdim=True)).pow(2).mean())
            out[f"{kind}@{t}"] = float(torch.stack(spreads).mean().sqrt() / data_spread)
    return out


def solve_from(pipe, x: torch.Tensor, t0: float, captions: list[str], guidance: float) -> torch.Tensor:
    """Euler steps of the run's schedule from time t0 to 0 (its share of the run's steps, at least 4)."""
    from dit3d.flow import sampling_timesteps
    from pipeline import text_inputs

    shift = pipe.flow.shift_for(pipe.tokens(tuple(x.shape[1:])))
    ts = sampling_timesteps(pipe.defaults["sampler"]["steps"], shift)
    ts = torch.cat([torch.tensor([t0]), ts[ts < t0]])
    n = len(captions)
    text, mask = text_inputs(pipe.model, pipe.frozen_text, captions + [""] * n, pipe.device, fixed=True)
    drop = torch.arange(2 * n, device=pipe.device) >= n
    for i in range(len(ts) - 1):
        t = ts[i].expand(n).to(pipe.device)
        cond, uncond = pipe.model(torch.cat([x, x]), torch.cat([t, t]), text, mask, drop, None).float().chunk(2)
        x = x + (ts[i + 1] - ts[i]) * (uncond + guidance * (cond - uncond))
    return x


@torch.no_grad()
def study(ckpt: str, clips: int, guidances: list[float]) -> dict:
    from pipeline import Pipeline

    pipe = Pipeline.load(ckpt)
    captions, videos, groups, kinds = rendered(pipe, clips)
    z = pipe.encode(videos)
    noise = torch.randn(z.shape, generator=torch.Generator().manual_seed(7)).to(z)
    one = np.flatnonzero(kinds == "shape")  # every shape, each colour and direction: the clips the scores use
    caps = [captions[i] for i in one]
    gen = torch.Generator().manual_seed(11)
    result = {"ckpt": ckpt, "clips": len(one), "tokenizer": shape_right(pipe, z[one], caps)}
    for sigma in (0.1, 0.3):
        result[f"tokenizer, latent noise {sigma}"] = shape_right(pipe, z[one] + sigma * torch.randn(z[one].shape, generator=gen), caps)
    result["word effect"] = word_effect(pipe, z, captions, groups, kinds, noise)
    own = float(pipe.defaults["sampler"]["guidance"])
    result["recovery"] = {f"from {t0}, guidance {g:g}": shape_right(pipe, solve_from(
        pipe, (1 - t0) * z[one] + t0 * noise[one], t0, caps, g), caps) for t0 in RECOVERY_LEVELS for g in (1.0, own)}
    shape = tuple(z.shape[1:])
    result["guidance"] = {f"{g:g}": shape_right(pipe, pipe.generate_latents(caps, shape, steps=pipe.defaults["sampler"]["steps"],
                                                                              guidance=g, seeds=list(range(len(caps)))), caps)
                          for g in guidances}
    return result


def tables(results: list[dict]) -> str:
    names = [Path(r["ckpt"]).parent.name if Path(r["ckpt"]).name in ("dit", "model") else Path(r["ckpt"]).name
             for r in results]  # runs/quickstart/dit: quickstart
    out = []
    rows = [[k] + [f"{r[k]:.2f}" for r in results] for k in ("tokenizer", "tokenizer, latent noise 0.1", "tokenizer, latent noise 0.3")]
    out.append(markdown_table(["shape right in reconstructions", *names], rows))
    keys = list(results[0]["word effect"])
    out.append(markdown_table(["word effect (prediction spread / data spread)", *names],
                              [[k] + [f"{r['word effect'][k]:.2f}" for r in results] for k in keys]))
    keys = list(results[0]["recovery"])
    out.append(markdown_table(["shape right after re-noising", *names], [[k] + [f"{r['recovery'][k]:.2f}" for r in results] for k in keys]))
    keys = list(results[0]["guidance"])
    out.append(markdown_table(["shape right from noise, guidance", *names], [[k] + [f"{r['guidance'][k]:.2f}" for r in results] for k in keys]))
    return "\n\n".join(out)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--ckpt", "--runs", dest="runs", nargs="+", required=True, help="train.py DiT run folders")
    p.add_argument("--clips", type=int, default=8, help="clip geometries (each drawn with every shape and colour)")
    p.add_argument("--guidance", type=float, nargs="+", default=[1.0, 5.0, 10.0], help="guidance scales from noise")
    p.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "shape")
    args = p.parse_args(argv)
    try:
        results = [study(run, args.clips, args.guidance) for run in args.runs]
    except InputError as e:
        raise SystemExit(f"error: {e}") from None
    text = tables(results)
    print(text)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps(results, indent=1))
    args.out.with_suffix(".md").write_text(text + "\n")
    print(f"wrote {args.out.with_suffix('.json')} and .md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
