"""The figures of a preference study: win rates and Bradley-Terry scores with bootstrap intervals, agreement between
raters, and position bias.

- A vote is a win for one model or a tie (a tie counts half a win to each); skips count for nothing.
- Bradley-Terry: P(i beats j) = s_i / (s_i + s_j), fitted by Hunter's MM iterations (2004) on the wins matrix,
  with one virtual tie between every pair of models so that a model that wins every vote keeps a finite score.
  Scores are reported as log-strengths centred on zero; exp(score_i - score_j) is the odds that i beats j.
- Intervals are percentile bootstrap intervals that resample prompts (the video names), not single votes, since
  votes on one prompt are not independent: the interval says how the result would move with other prompts.
  With fewer than MIN_CLUSTERS prompts there are too few to resample, and single votes are resampled instead
  (the report says which).
- Agreement: over the comparisons rated by two raters or more, how often two raters gave the same verdict
  (observed), against chance from the verdicts' overall frequencies: Fleiss' kappa for varying rater counts.
- Position bias: of the votes that picked a side, the fraction that picked the left one, with a two-sided
  binomial test against one half.
"""

from __future__ import annotations

from collections import defaultdict

import numpy as np
from scipy.stats import binomtest

MIN_CLUSTERS = 10
LEVEL = 0.95


def decided(votes: list[dict], question: str | None = None) -> list[dict]:
    """The votes that say something, as {item, rater, a, b, outcome: 'a' | 'b' | 'tie', side}: the overall choice,
    or one question's answer. `side` is the side the rater picked (left, right or tie)."""
    out = []
    for v in votes:
        side = v["choice"] if question is None else v["answers"].get(question)
        if side not in ("left", "right", "tie"):
            continue
        model = {"left": v["left"], "right": v["right"]}.get(side)
        outcome = "tie" if side == "tie" else ("a" if model == v["a"] else "b")
        out.append({"item": v["item"], "rater": v["rater"], "a": v["a"], "b": v["b"], "outcome": outcome,
                    "side": side})
    return out


def unit_counts(rows: list[dict], models: list[str]) -> tuple[np.ndarray, str]:
    """W[u, i, j]: the wins of model i over model j in resampling unit u (a prompt, or a vote when there are too
    few prompts), a tie half a win each way; and which unit was used."""
    index = {m: k for k, m in enumerate(models)}
    by_item = len({r["item"] for r in rows}) >= MIN_CLUSTERS
    keys = sorted({r["item"] for r in rows}) if by_item else list(range(len(rows)))
    unit_of = {k: u for u, k in enumerate(keys)}
    w = np.zeros((max(len(keys), 1), len(models), len(models)))
    for n, r in enumerate(rows):
        u, a, b = unit_of[r["item"] if by_item else n], index[r["a"]], index[r["b"]]
        if r["outcome"] == "a":
            w[u, a, b] += 1
        elif r["outcome"] == "b":
            w[u, b, a] += 1
        else:
            w[u, a, b] += 0.5
            w[u, b, a] += 0.5
    return w, ("prompt" if by_item else "vote")


def bradley_terry(wins: np.ndarray, iterations: int = 2000, tol: float = 1e-10) -> np.ndarray:
    """Centred log-strengths from wins (..., K, K), batched over leading axes, by MM iterations with one virtual
    tie per pair of models."""
    k = wins.shape[-1]
    w = wins + 0.5 * (1 - np.eye(k))
    games = w + np.swapaxes(w, -1, -2)
    total = w.sum(-1)
    p = np.ones(wins.shape[:-1])
    for _ in range(iterations):
        denom = (games / (p[..., :, None] + p[..., None, :])).sum(-1)
        new = total / denom
        new /= np.exp(np.log(new).mean(-1, keepdims=True))
        done = np.max(np.abs(new - p)) < tol
        p = new
        if done:
            break
    return np.log(p)


def _interval(samples: np.ndarray) -> list[float]:
    lo, hi = np.nanquantile(samples, [(1 - LEVEL) / 2, (1 + LEVEL) / 2])
    return [float(lo), float(hi)]


def preferences(rows: list[dict], models: list[str], resamples: int = 2000, seed: int = 0) -> dict:
    """Win rates per pair of models and Bradley-Terry scores, each with its bootstrap interval."""
    w, unit = unit_counts(rows, models)
    total = w.sum(0)
    rng = np.random.default_rng(seed)
    weights = rng.multinomial(len(w), np.full(len(w), 1 / len(w)), size=resamples)  # (R, U): units drawn
    boot = np.einsum("ru,uij->rij", weights, w)
    scores, boot_scores = bradley_terry(total), bradley_terry(boot)
    pairs = []
    for i, j in [(i, j) for i in range(len(models)) for j in range(i + 1, len(models))]:
        n = total[i, j] + total[j, i]
        with np.errstate(invalid="ignore", divide="ignore"):
            boot_rate = boot[:, i, j] / (boot[:, i, j] + boot[:, j, i])
        ties = sum(1 for r in rows if {r["a"], r["b"]} == {models[i], models[j]} and r["outcome"] == "tie")
        bt = 1 / (1 + np.exp(-(boot_scores[:, i] - boot_scores[:, j])))
        pairs.append({
            "a": models[i], "b": models[j], "votes": int(round(n)), "ties": ties,
            "wins_a": int(round(total[i, j] - ties / 2)), "wins_b": int(round(total[j, i] - ties / 2)),
            "win_rate_a": float(total[i, j] / n) if n else None,
            "interval": _interval(boot_rate) if n else None,
            "bt_p_a": float(1 / (1 + np.exp(-(scores[i] - scores[j])))), "bt_interval": _interval(bt)})
    bt = {m: {"score": float(scores[k]), "interval": _interval(boot_scores[:, k])} for k, m in enumerate(models)}
    return {"pairs": pairs, "bradley_terry": bt, "resampled": unit, "units": int(len(w)), "resamples": resamples,
            "level": LEVEL}


def agreement(rows: list[dict]) -> dict:
    """Observed agreement and Fleiss' kappa over the comparisons that two raters or more rated."""
    verdicts = defaultdict(list)
    for r in rows:
        verdicts[(r["item"], r["a"], r["b"])].append(r["outcome"])
    shared = [v for v in verdicts.values() if len(v) >= 2]
    if not shared:
        return {"comparisons": 0, "observed": None, "kappa": None}
    agree = sum(sum(c * (c - 1) for c in (v.count(o) for o in ("a", "b", "tie"))) for v in shared)
    possible = sum(len(v) * (len(v) - 1) for v in shared)
    pooled = np.array([sum(v.count(o) for v in shared) for o in ("a", "b", "tie")], dtype=float)
    p_e = float(((pooled / pooled.sum()) ** 2).sum())
    p_o = agree / possible
    kappa = (p_o - p_e) / (1 - p_e) if p_e < 1 else 1.0
    return {"comparisons": len(shared), "observed": float(p_o), "chance": p_e, "kappa": float(kappa)}


def position_bias(rows: list[dict]) -> dict:
    left = sum(r["side"] == "left" for r in rows)
    right = sum(r["side"] == "right" for r in rows)
    if not left + right:
        return {"left": 0, "right": 0, "left_fraction": None, "p_value": None}
    return {"left": left, "right": right, "left_fraction": left / (left + right),
            "p_value": float(binomtest(left, left + right, 0.5).pvalue)}


def analyse(votes: list[dict], models: list[str], questions: list[str], resamples: int = 2000, seed: int = 0) -> dict:
    """Every figure of the report, for the overall choice and for each question."""
    rows = decided(votes)
    raters = defaultdict(int)
    for v in votes:
        raters[v["rater"]] += 1
    out = {"votes": len(votes), "skips": sum(v["choice"] == "skip" for v in votes),
           "ties": sum(v["choice"] == "tie" for v in votes), "raters": dict(sorted(raters.items())),
           "overall": preferences(rows, models, resamples, seed) | {"agreement": agreement(rows),
                                                                    "position": position_bias(rows)}}
    out["questions"] = {}
    for q in questions:
        q_rows = decided(votes, q)
        out["questions"][q] = preferences(q_rows, models, resamples, seed) | {"answers": len(q_rows),
                                                                             "agreement": agreement(q_rows)}
    return out
