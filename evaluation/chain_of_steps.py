"""The chain-of-steps study: where along the denoising steps each attribute of a generated video is decided.

At every solver step the sampler predicts the clean video (x0 = x_t - t v). Decoding that prediction and scoring
it with the motion scorer (`evaluation.motion_score`) against the caption shows, step by step, whether the video
already has the caption's colour, shape and direction, shows one object, moves on a straight line, and starts
where it will end up starting. The synthetic grammar carries the truth, so no judge is needed.

Per attribute and step, a video's state is right, wrong, or undetermined (no object found yet: colour and shape
need one frame with an object, direction two, linearity three):
- presence: right when an object is found in at least 95% of frames;
- colour, shape, direction: the scorer's verdict against the caption;
- linearity: the track along the caption's axis fits a straight line with R^2 >= 0.9;
- position: the object's first centre lies within 1/16 of the frame's width of the final video's.
Summarised over videos (all, seen and held-out captions):
- accuracy at every step (undetermined counts as not right);
- the decided step: the first step from which the state no longer changes (its final value, right or wrong);
- self-correction: of the videos wrong at some step, the share right at the end; loss: of the videos right at
  some step, the share not right at the end. Both with their counts.
"""

from __future__ import annotations

import numpy as np

from data import tensor_to_frames
from data.sources import video_name
from evaluation.motion_score import caption_groups, group_of, score_frames

ATTRIBUTES = ("presence", "color", "shape", "direction", "linearity", "position")
PRESENT, LINEAR, POSITION_TOLERANCE = 0.95, 0.9, 1 / 16
RIGHT, WRONG, UNDETERMINED = 1, 0, -1


def step_scores(videos, captions: list[str], names: list[str], groups: list[str]) -> list[dict]:
    """The motion scores of decoded videos (B, 3, T, H, W) in [-1, 1], one dict each (with `found`, `start`)."""
    out = []
    for video, caption, name, group in zip(videos, captions, names, groups):
        s = score_frames(tensor_to_frames(video), caption, name, group)
        out.append({"presence": s.presence, "color": s.color, "shape": s.shape, "direction": s.direction,
                    "linearity": s.linearity, "found": s.found, "start": s.start})
    return out


def states(steps: list[dict], attribute: str, width: int) -> list[int]:
    """RIGHT / WRONG / UNDETERMINED of one attribute of one video at every step (the last is the final video)."""
    final_start = steps[-1]["start"]
    out = []
    for s in steps:
        if attribute == "presence":
            out.append(RIGHT if s["presence"] >= PRESENT else WRONG)
        elif attribute == "position":
            if s["start"] is None or final_start is None:
                out.append(UNDETERMINED)
            else:
                far = np.hypot(s["start"][0] - final_start[0], s["start"][1] - final_start[1]) > POSITION_TOLERANCE * width
                out.append(WRONG if far else RIGHT)
        else:
            need = {"color": 1, "shape": 1, "direction": 2, "linearity": 3}[attribute]
            if s["found"] < need:
                out.append(UNDETERMINED)
            elif attribute == "linearity":
                out.append(RIGHT if s["linearity"] >= LINEAR else WRONG)
            else:
                out.append(RIGHT if s[attribute] >= 0.5 else WRONG)
    return out


def decided_step(seq: list[int]) -> int:
    """The first step from which the state equals the final one."""
    i = len(seq) - 1
    while i > 0 and seq[i - 1] == seq[-1]:
        i -= 1
    return i


def summarise(videos: list[dict], width: int) -> dict:
    """Curves, decided steps and correction rates of one group of videos [{"steps": [score dicts]}]."""
    n_steps = len(videos[0]["steps"])
    out: dict = {"videos": len(videos), "steps": n_steps}
    for a in ATTRIBUTES:
        seqs = [states(v["steps"], a, width) for v in videos]
        right = np.array([[st == RIGHT for st in seq] for seq in seqs], dtype=float)  # (videos, steps)
        decided = np.array([decided_step(seq) for seq in seqs])
        ever_wrong = [seq for seq in seqs if WRONG in seq]
        ever_right = [seq for seq in seqs if RIGHT in seq]
        corrected = sum(seq[-1] == RIGHT for seq in ever_wrong)
        lost = sum(seq[-1] != RIGHT for seq in ever_right)
        out[a] = {
            "accuracy": right.mean(0).tolist(),
            "final": float(right[:, -1].mean()),
            "decided_step_mean": float(decided.mean()),
            "decided_fraction_mean": float(((decided + 1) / n_steps).mean()),  # of the solver's steps, 1 = the last
            "decided_by_step": [float((decided <= i).mean()) for i in range(n_steps)],
            "ever_wrong": len(ever_wrong), "corrected": int(corrected),
            "self_correction": corrected / len(ever_wrong) if ever_wrong else float("nan"),
            "ever_right": len(ever_right), "lost": int(lost),
            "loss": lost / len(ever_right) if ever_right else float("nan"),
        }
    return out


class StepRecorder:
    """Collects the per-step scores of sampled batches: pass `add` as `evaluation.generator.sample_run`'s on_batch."""

    def __init__(self, pipe, manifest=None):
        self.pipe = pipe
        self.held, self.train = caption_groups(manifest)
        self.videos: list[dict] = []
        self.times: list[float] = []
        self.width = 0

    def add(self, jobs: list[tuple[str, int]], trajectory: list[tuple[int, float, "object"]]) -> None:
        captions = [c for c, _ in jobs]
        groups = [group_of(c, self.held, self.train) for c in captions]
        names = [video_name(c, s) for c, s in jobs]  # the names sample_run gives the videos
        per_step = []
        for _, _, x0 in trajectory:
            decoded = self.pipe.decode(x0)
            self.width = decoded.shape[-1]
            per_step.append(step_scores(decoded, captions, names, groups))
        self.times = [t for _, t, _ in trajectory]
        for j, (caption, seed) in enumerate(jobs):
            self.videos.append({"name": names[j], "caption": caption, "seed": seed, "group": groups[j],
                                "steps": [step[j] for step in per_step]})

    def summary(self) -> dict:
        return study_summary(self.videos, self.times, self.width)


def study_summary(videos: list[dict], times: list[float], width: int) -> dict:
    groups = {"all": videos, "seen": [v for v in videos if v["group"] == "seen"],
              "held_out": [v for v in videos if v["group"] == "held_out"]}
    return {"t": times, "seeds": sorted({v["seed"] for v in videos}),
            "groups": {g: summarise(members, width) for g, members in groups.items() if members},
            "videos": videos, "width": width}


def markdown(study: dict, label: str = "") -> str:
    head = ["captions", "attribute", "videos", "final", "decided at (step, mean)", "decided at (of steps)",
            "self-correction", "loss"]
    lines = [f"### Chain of steps{': ' + label if label else ''}", "",
             f"{len(study['t'])} solver steps, seeds {study['seeds']}.", "",
             "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for group, g in study["groups"].items():
        for a in ATTRIBUTES:
            s = g[a]
            lines.append(f"| {group} | {a} | {g['videos']} | {s['final']:.3f} | {s['decided_step_mean']:.1f} | "
                         f"{s['decided_fraction_mean']:.2f} | {s['corrected']}/{s['ever_wrong']} | {s['lost']}/{s['ever_right']} |")
    n = len(study["t"])
    shown = sorted({round(i * (n - 1) / 7) for i in range(8)}) if n > 8 else list(range(n))
    for group, g in study["groups"].items():
        lines += ["", f"Accuracy along the steps ({group} captions, {g['videos']} videos; t is the flow time the "
                      f"step starts from, 1 = noise):", "",
                  "| step | t | " + " | ".join(ATTRIBUTES) + " |", "|" + "---|" * (len(ATTRIBUTES) + 2)]
        for i in shown:
            lines.append(f"| {i + 1} | {study['t'][i]:.3f} | " + " | ".join(f"{g[a]['accuracy'][i]:.2f}" for a in ATTRIBUTES) + " |")
    return "\n".join(lines) + "\n"


def plot_curves(studies: dict[str, dict], path, group: str = "all", title: str = "") -> None:
    """Accuracy of each attribute along the steps (x: fraction of the solver's steps done), one line per study."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from checkpoint_io import save_figure

    fig, axes = plt.subplots(2, 3, figsize=(13, 7), sharex=True, sharey=True)
    if not all(group in study["groups"] for study in studies.values()):
        group = "all"
    for ax, a in zip(axes.flat, ATTRIBUTES):
        for label, study in studies.items():
            g = study["groups"][group]
            acc = g[a]["accuracy"]
            x = (np.arange(len(acc)) + 1) / len(acc)
            ax.plot(x, acc, marker="." if len(acc) <= 12 else None, label=label or None)
        ax.set_title(a)
        ax.set_ylim(-0.02, 1.02)
        ax.grid(alpha=0.3)
    for ax in axes[-1]:
        ax.set_xlabel("fraction of solver steps done")
    for ax in axes[:, 0]:
        ax.set_ylabel(f"accuracy ({group} captions)")
    if any(studies):
        axes.flat[0].legend(fontsize=8)
    fig.suptitle(title or "attributes of the clean-video prediction along the denoising steps")
    fig.tight_layout()
    save_figure(fig, path)
