"""What a preference study compares: the models' sample folders, the prompts they share, and the pairs to rate.

Each model is a folder of NAME.mp4 + NAME.txt (`sample.py --out DIR`, or an `evaluation.generator` report folder,
whose videos/ is used and whose scores the preference report shows beside the votes). A comparison is one video
name (prompt and seed) in two models' folders with the same prompt; every pair of models is compared on every
name they share. Videos that do not decode are skipped and listed, never shown.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from itertools import combinations
from pathlib import Path

import av

from errors import InputError
from evaluation.sample_folder import find_generated

# The optional questions a study may ask beside the overall one (`--questions`), with the words the page shows.
QUESTIONS = {
    "motion": "Which one moves more naturally?",
    "prompt": "Which one follows the prompt better?",
    "quality": "Which one looks better, frame by frame?",
}
OVERALL = "Which video is better overall?"


@dataclass(frozen=True)
class Model:
    name: str
    folder: Path  # the folder of NAME.mp4 + NAME.txt
    report: Path | None  # the evaluation.generator report.json beside it, where there is one
    videos: dict  # name -> (prompt, path) of the videos that decode


@dataclass(frozen=True)
class Comparison:
    item: str  # the video name both models share (prompt words and seed)
    prompt: str
    a: str  # the two models, in the study's order (a before b)
    b: str

    @property
    def key(self) -> str:
        return f"{self.item}\t{self.a}\t{self.b}"


@dataclass
class Study:
    models: list[Model]
    comparisons: list[Comparison]
    questions: tuple[str, ...] = ()
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (video, why) of every video left out

    def model(self, name: str) -> Model:
        return next(m for m in self.models if m.name == name)

    def path(self, model: str, item: str) -> Path:
        return self.model(model).videos[item][1]

    def fingerprint(self) -> dict:
        """What makes two runs of the server the same study: the models (names and folders), the questions and
        the comparisons. A database made for another fingerprint is refused."""
        digest = hashlib.sha256("\n".join(sorted(c.key for c in self.comparisons)).encode()).hexdigest()
        return {"models": [[m.name, str(m.folder)] for m in self.models], "questions": list(self.questions),
                "reports": {m.name: str(m.report) for m in self.models if m.report},
                "comparisons": len(self.comparisons), "comparisons_sha256": digest}


def _video_folder(folder: Path) -> tuple[Path, Path | None]:
    """The videos' folder of a sample folder, or of an evaluation.generator report folder (its videos/, or the
    --videos folder it names as its source), with the report where there is one."""
    if not folder.is_dir():
        raise InputError(f"{folder} is not a folder: give a folder of NAME.mp4 + NAME.txt samples (sample.py --out)")
    report = folder / "report.json"
    if not report.is_file():
        return folder.resolve(), None
    if not any(folder.glob("*.mp4")):
        try:
            source = Path(str(json.loads(report.read_text()).get("source", "")))
        except (OSError, ValueError, AttributeError):
            source = Path("")
        for videos in (folder / "videos", source):
            if str(videos) and videos.is_dir() and any(videos.glob("*.mp4")):
                return videos.resolve(), report.resolve()
    return folder.resolve(), report.resolve()


def model_names(folders: list[Path]) -> list[str]:
    """Each folder's name, with as many parent folders as it takes to tell them apart (runs/a/samples and
    runs/b/samples are a/samples and b/samples)."""
    for depth in range(1, max(len(f.parts) for f in folders) + 1):
        names = ["/".join(f.parts[-depth:]) for f in folders]
        if len(set(names)) == len(names):
            return names
    return [str(f) for f in folders]


def decode_error(path: Path) -> str | None:
    """Why a video cannot be shown (it does not open, has no video stream, or no frame decodes), or None. Every
    frame is decoded: a file cut short mid-stream opens and probes fine."""
    try:
        with av.open(str(path)) as container:
            if not container.streams.video:
                return "no video stream"
            frames = sum(1 for _ in container.decode(video=0))
    except (av.FFmpegError, OSError, UnicodeDecodeError, ValueError) as e:
        return f"does not decode ({type(e).__name__}: {e})"
    return None if frames else "no frame decodes"


def load_study(folders: list[str | os.PathLike], questions: tuple[str, ...] = ()) -> Study:
    """The study of these sample folders (two or more), or a one-line InputError naming what is wrong."""
    if len(folders) < 2:
        raise InputError("a preference study needs two sample folders at least: --a DIR_A --b DIR_B")
    unknown = [q for q in questions if q not in QUESTIONS]
    if unknown:
        raise InputError(f"unknown question {unknown[0]!r}: --questions takes {', '.join(QUESTIONS)}")
    located = [_video_folder(Path(f)) for f in folders]
    for (i, (fi, _)), (j, (fj, _)) in combinations(enumerate(located), 2):
        if fi == fj or os.path.samefile(fi, fj):
            raise InputError(f"{folders[i]} and {folders[j]} are the same folder ({fi}): compare two models' samples")
    names = model_names([Path(f).resolve() for f in folders])  # the folders as given, not their videos/
    models, skipped = [], []
    for name, (folder, report) in zip(names, located):
        videos = {}
        for g in find_generated(folder):
            why = decode_error(g.path)
            if why:
                skipped.append((str(g.path), why))
            else:
                videos[g.name] = (g.caption, g.path)
        models.append(Model(name, folder, report, videos))
    comparisons = []
    for ma, mb in combinations(models, 2):
        before = len(comparisons)
        for item in sorted(set(ma.videos) & set(mb.videos)):
            if ma.videos[item][0] != mb.videos[item][0]:
                skipped.append((f"{item} in {mb.name}", f"its prompt differs from {ma.name}'s"))
            else:
                comparisons.append(Comparison(item, ma.videos[item][0], ma.name, mb.name))
        if len(comparisons) == before:
            raise InputError(f"{ma.name} ({len(ma.videos)} videos) and {mb.name} ({len(mb.videos)} videos) share no "
                             f"prompt: sample the same prompts and seeds into both (sample.py --prompts P --seed S)")
    return Study(models, comparisons, tuple(questions), skipped)


def generator_scores(path: str | os.PathLike) -> dict:
    """The headline figures of the evaluation.generator report beside a model's videos (FVD, mean motion
    scores, CLIPSIM), so the preference report can set people's judgement beside the metrics."""
    try:
        report = json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return {}
    out = {}
    if isinstance((report.get("fvd") or {}).get("value"), (int, float)):
        out["FVD"] = report["fvd"]["value"]
    means = (report.get("motion") or {}).get("all") or {}
    for key in ("presence", "color", "shape", "direction", "linearity"):
        if isinstance(means.get(key), (int, float)) and means[key] == means[key]:  # NaN: not measured
            out[key] = means[key]
    if isinstance((report.get("clipsim") or {}).get("mean"), (int, float)):
        out["CLIPSIM"] = report["clipsim"]["mean"]
    return out
