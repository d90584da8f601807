"""The preference report: REPORT/report.json, REPORT/report.md and REPORT/preference.png (Bradley-Terry scores
and win rates with their intervals), written atomically like the other reports."""

from __future__ import annotations

from pathlib import Path

from checkpoint_io import check_writable, save_figure, write_json_atomic, write_text_atomic


def _pct(x) -> str:
    return "-" if x is None else f"{100 * x:.1f}%"


def _span(iv) -> str:
    return "-" if iv is None else f"{100 * iv[0]:.1f}-{100 * iv[1]:.1f}%"


def pair_table(fig: dict) -> list[str]:
    lines = ["| A | B | votes | A wins | B wins | ties | A's win rate | interval | BT P(A beats B) | interval |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for p in fig["pairs"]:
        lines.append(f"| {p['a']} | {p['b']} | {p['votes']} | {p['wins_a']} | {p['wins_b']} | {p['ties']} | "
                     f"{_pct(p['win_rate_a'])} | {_span(p['interval'])} | {_pct(p['bt_p_a'])} | "
                     f"{_span(p['bt_interval'])} |")
    return lines


def score_table(fig: dict, metrics: dict[str, dict]) -> list[str]:
    extra = sorted({k for m in metrics.values() for k in m})
    lines = ["| model | Bradley-Terry score | interval | " + " | ".join(extra) + (" |" if extra else ""),
             "|---|---|---|" + "---|" * len(extra)]
    ranked = sorted(fig["bradley_terry"].items(), key=lambda kv: -kv[1]["score"])
    for m, s in ranked:
        cells = [f"{metrics.get(m, {})[k]:.3f}" if k in metrics.get(m, {}) else "-" for k in extra]
        lines.append(f"| {m} | {s['score']:+.3f} | {s['interval'][0]:+.3f} to {s['interval'][1]:+.3f} | "
                     + " | ".join(cells) + (" |" if extra else ""))
    return lines


def markdown(result: dict, fingerprint: dict, metrics: dict[str, dict], source: str) -> str:
    o = result["overall"]
    raters = ", ".join(f"{r} ({n})" for r, n in result["raters"].items()) or "none"
    lines = [f"# Preference study: `{source}`", "",
             f"{result['votes']} votes ({result['skips']} skipped, {result['ties']} ties) by {len(result['raters'])} "
             f"raters: {raters}. Models: " + ", ".join(f"{n} (`{f}`)" for n, f in fingerprint["models"]) + ".", "",
             "## Which video is better overall", "", *pair_table(o), "", *score_table(o, metrics), "",
             f"Intervals: {100 * o['level']:.0f}% percentile bootstrap over {o['resamples']} resamples of the "
             f"{o['units']} {o['resampled']}s" + (" (too few prompts to resample prompts)" if o["resampled"] == "vote"
                                                  else "") + ". A Bradley-Terry score is a log-strength centred on "
             "zero: exp(difference) is the odds that one model beats the other.", ""]
    a, pos = o["agreement"], o["position"]
    if a["comparisons"]:
        lines += [f"**Agreement**: on the {a['comparisons']} comparisons rated by two raters or more, two raters "
                  f"agreed {_pct(a['observed'])} of the time against {_pct(a['chance'])} by chance "
                  f"(Fleiss' kappa {a['kappa']:.2f}).", ""]
    else:
        lines += ["**Agreement**: no comparison was rated by two raters, so there is none to measure.", ""]
    if pos["left_fraction"] is not None:
        lines += [f"**Position bias**: of {pos['left'] + pos['right']} votes that picked a side, "
                  f"{_pct(pos['left_fraction'])} picked the left one (binomial test against one half: "
                  f"p = {pos['p_value']:.3g}). The sides were drawn at random, so bias moves no model's score.", ""]
    for q, fig in result["questions"].items():
        lines += [f"## Question: {q}", "", f"{fig['answers']} answers.", "", *pair_table(fig), "",
                  *score_table(fig, {}), ""]
    if metrics:
        lines += ["The metric columns come from each folder's `evaluation.generator` report (FVD: lower is "
                  "better; the motion scores and CLIPSIM: higher is better).", ""]
    return "\n".join(lines)


def figure(result: dict, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = {"overall": result["overall"], **result["questions"]}
    fig, axes = plt.subplots(1, 2, figsize=(11, 0.6 * max(3, len(result["overall"]["bradley_terry"])) + 1.6))
    models = sorted(result["overall"]["bradley_terry"], key=lambda m: result["overall"]["bradley_terry"][m]["score"])
    for k, (name, f) in enumerate(panels.items()):
        y = [i + 0.15 * (k - (len(panels) - 1) / 2) for i in range(len(models))]
        s = [f["bradley_terry"][m]["score"] for m in models]
        lo = [s[i] - f["bradley_terry"][m]["interval"][0] for i, m in enumerate(models)]
        hi = [f["bradley_terry"][m]["interval"][1] - s[i] for i, m in enumerate(models)]
        axes[0].errorbar(s, y, xerr=[lo, hi], fmt="o", capsize=3, label=name)
    axes[0].set_yticks(range(len(models)), models)
    axes[0].axvline(0, color="grey", lw=0.8)
    axes[0].set_xlabel("Bradley-Terry score (log-strength)")
    axes[0].legend(fontsize=8)
    pairs = result["overall"]["pairs"]
    labels = [f"{p['a']} vs {p['b']}" for p in pairs]
    for i, p in enumerate(pairs):
        if p["win_rate_a"] is not None:
            axes[1].errorbar(p["win_rate_a"], i, xerr=[[p["win_rate_a"] - p["interval"][0]],
                                                        [p["interval"][1] - p["win_rate_a"]]], fmt="s", capsize=3)
    axes[1].set_yticks(range(len(pairs)), labels)
    axes[1].axvline(0.5, color="grey", lw=0.8)
    axes[1].set_xlim(0, 1)
    axes[1].set_xlabel("win rate of the first model (ties count half)")
    level = int(100 * result["overall"]["level"])
    fig.suptitle(f"{result['votes'] - result['skips']} votes; bars: {level}% bootstrap intervals")
    fig.tight_layout()
    save_figure(fig, out, dpi=110)


def write_report(result: dict, fingerprint: dict, metrics: dict[str, dict], out: Path, source: str) -> str:
    """Write the three files; returns the markdown, for the command to print."""
    check_writable(out)
    text = markdown(result, fingerprint, metrics, source)
    write_json_atomic(out / "report.json", {"study": fingerprint, "metrics": metrics} | result)
    write_text_atomic(out / "report.md", text)
    figure(result, out / "preference.png")
    return text
