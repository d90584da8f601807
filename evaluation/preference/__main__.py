"""Human preference between models' samples: a blind side-by-side rating page, and its report.

    python -m evaluation.preference serve --a SAMPLES_A --b SAMPLES_B [--c SAMPLES_C ...] --db study.sqlite
                                          [--questions motion,prompt,quality] [--port 8765]
    python -m evaluation.preference report --db study.sqlite --out REPORT

`serve` puts one prompt and two models' videos of it (the same NAME.mp4, prompt and seed, in two folders that
`sample.py --out` or `evaluation.generator` wrote) side by side, in a random order that is recorded, names hidden,
looping in step. Raters give their name, then vote with the keys (left, right, down for a tie, S to skip) or the
buttons; nobody sees a pair twice, and each vote is in the database as it is cast, so a server restarted on the
same database goes on where it stopped. `report` gives win rates and Bradley-Terry scores with bootstrap
intervals, agreement between raters and position bias, as REPORT/report.md, report.json and preference.png.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from errors import InputError

LETTERS = "abcdefgh"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m evaluation.preference", description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="command", required=True)
    s = sub.add_parser("serve", help="the rating page for two or more sample folders")
    for letter in LETTERS:
        s.add_argument(f"--{letter}", type=Path, metavar=f"DIR_{letter.upper()}", required=letter in "ab",
                       help=f"model {letter.upper()}'s folder of NAME.mp4 + NAME.txt (or its evaluation.generator "
                            f"report folder)" + ("" if letter in "ab" else ", optional"))
    s.add_argument("--db", type=Path, required=True, help="the SQLite file the votes go to (made if new)")
    s.add_argument("--questions", default="", help="questions asked beside the overall one, comma-separated: "
                                                   "motion, prompt, quality")
    s.add_argument("--host", default="127.0.0.1", help="address to listen on (default: this machine only)")
    s.add_argument("--port", type=int, default=8765, help="port to listen on; 0 picks a free one")
    s.add_argument("--seed", type=int, default=0, help="seed of each rater's order of the pairs")
    r = sub.add_parser("report", help="win rates, Bradley-Terry scores, agreement and position bias of a study")
    r.add_argument("--db", type=Path, required=True, help="the study's SQLite file")
    r.add_argument("--out", type=Path, required=True, help="folder for report.md, report.json and preference.png")
    r.add_argument("--resamples", type=int, default=2000, help="bootstrap resamples of each interval")
    r.add_argument("--seed", type=int, default=0, help="seed of the bootstrap")
    return p


def serve(args) -> None:
    from evaluation.preference.server import bind, serve as run_server
    from evaluation.preference.store import Store
    from evaluation.preference.study import load_study

    folders = [getattr(args, letter) for letter in LETTERS if getattr(args, letter) is not None]
    questions = tuple(q.strip() for q in args.questions.split(",") if q.strip())
    study = load_study(folders, questions)
    store = Store(args.db, study, seed=args.seed)
    sock = bind(args.host, args.port)
    for path, why in study.skipped:
        print(f"skipped {path}: {why}", file=sys.stderr)
    host, port = sock.getsockname()[:2]
    shown = f"[{host}]" if ":" in host else host
    counts = ", ".join(f"{m.name} {len(m.videos)}" for m in study.models)
    print(f"{len(study.comparisons)} comparisons of {len(study.models)} models (videos: {counts}); "
          f"{len(study.skipped)} skipped; votes in {args.db}", flush=True)
    if host not in ("127.0.0.1", "::1", "localhost"):
        print(f"listening on {host}: anyone who can reach this machine can rate", file=sys.stderr)
    print(f"serving on http://{shown}:{port}/", flush=True)
    run_server(store, sock)


def report(args) -> dict:
    from evaluation.preference.report import write_report
    from evaluation.preference.stats import analyse
    from evaluation.preference.store import read_votes
    from evaluation.preference.study import generator_scores

    if args.resamples < 100:
        raise InputError(f"--resamples {args.resamples} is too few for a 95% interval: give 100 or more")
    fingerprint, votes = read_votes(args.db)
    if not votes:
        raise InputError(f"{args.db} holds no vote yet: rate some pairs on the `serve` page first")
    models = [name for name, _ in fingerprint["models"]]
    result = analyse(votes, models, fingerprint["questions"], args.resamples, args.seed)
    metrics = {m: s for m, path in fingerprint.get("reports", {}).items() if (s := generator_scores(path))}
    print(write_report(result, fingerprint, metrics, args.out, str(args.db)))
    return result


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        serve(args) if args.command == "serve" else report(args)
    except InputError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("stopped; every vote cast is in the database", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
