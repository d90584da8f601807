"""The preference study without a browser: which pairs a study holds, the votes' database, and the report's
statistics against simulated raters whose preferences are known."""

from __future__ import annotations

import json
import shutil
import socket
import sqlite3

import numpy as np
import pytest

from tests.conftest import truncated_copy, write_sample_folders
from errors import InputError
from evaluation.preference.__main__ import main
from evaluation.preference.stats import analyse, bradley_terry
from evaluation.preference.store import Store, VoteRefused, read_votes
from evaluation.preference.study import Comparison, Model, Study, load_study


def test_a_study_compares_every_video_the_folders_share(sample_folders):
    a, b = sample_folders
    study = load_study([a, b], ("motion",))
    assert [m.name for m in study.models] == ["A", "B"] and len(study.comparisons) == 6 and not study.skipped
    assert {c.prompt for c in study.comparisons} == {"bikes ride past", "a man talks in a car", "a street at noon"}
    assert all(c.a == "A" and c.b == "B" for c in study.comparisons)


def test_folders_with_no_prompt_in_common_are_refused_with_their_counts(tmp_path, sample_folders):
    a, _ = sample_folders
    (c,) = write_sample_folders(tmp_path, ["a cat sleeps"], seeds=1)[:1]
    with pytest.raises(InputError, match=r"A \(6 videos\) and .*A \(1 videos\) share no prompt"):
        load_study([a, c])


def test_the_same_folder_twice_is_refused(tmp_path, sample_folders):
    a, _ = sample_folders
    (tmp_path / "link").symlink_to(a)
    with pytest.raises(InputError, match="are the same folder"):
        load_study([a, tmp_path / "link"])


def test_a_video_that_does_not_decode_is_skipped_and_listed(tmp_path, sample_folders):
    a, b = sample_folders
    broken = tmp_path / "B"
    shutil.copytree(b, broken)
    truncated_copy(b / "bikes_ride_past_0.mp4", broken / "bikes_ride_past_0.mp4", 0.3)
    (broken / "a_street_at_noon_1.mp4").write_bytes(b"")
    study = load_study([a, broken])
    assert len(study.comparisons) == 4
    assert sorted(p.rsplit("/", 1)[1] for p, _ in study.skipped) == ["a_street_at_noon_1.mp4", "bikes_ride_past_0.mp4"]


def test_bad_questions_and_captions_are_one_line_errors(tmp_path, sample_folders):
    a, b = sample_folders
    with pytest.raises(InputError, match="unknown question 'beauty'"):
        load_study([a, b], ("beauty",))
    other = tmp_path / "B"
    shutil.copytree(b, other)
    (other / "bikes_ride_past_0.txt").write_bytes(b"bikes \xff ride")
    with pytest.raises(InputError, match="is not UTF-8 text"):
        load_study([a, other])


def test_a_generator_report_folder_is_read_through_its_videos(tmp_path, sample_folders):
    a, b = sample_folders
    report = tmp_path / "report_b"
    shutil.copytree(b, report / "videos")
    (report / "report.json").write_text(json.dumps({"fvd": {"value": 123.4}, "motion": {"all": {"presence": 0.9}}}))
    study = load_study([a, report])
    assert study.models[1].folder == (report / "videos").resolve() and len(study.comparisons) == 6
    assert study.fingerprint()["reports"] == {"report_b": str((report / "report.json").resolve())}


def many_comparisons(n: int = 300, questions=()) -> Study:
    models = [Model(m, None, None, {}) for m in ("A", "B")]
    return Study(models, [Comparison(f"item_{i}", f"prompt {i}", "A", "B") for i in range(n)], tuple(questions))


def test_a_reload_shows_the_open_pair_again_and_sides_are_drawn_at_random(tmp_path):
    store = Store(tmp_path / "s.sqlite", many_comparisons())
    first = store.next_pair("alice")
    assert store.next_pair("alice") == first  # not voted on: the same pair, the same sides
    lefts = []
    for _ in range(300):
        pair = store.next_pair("alice")
        lefts.append(pair["left"])
        store.vote(pair["token"], "alice", "left")
    assert store.next_pair("alice") is None and 0.38 < lefts.count("A") / len(lefts) < 0.62
    recorded = sqlite3.connect(tmp_path / "s.sqlite").execute("SELECT left_model FROM shown ORDER BY id").fetchall()
    assert [r[0] for r in recorded] == lefts
    _, votes = read_votes(tmp_path / "s.sqlite")
    assert len({(v["item"], v["a"], v["b"]) for v in votes}) == 300 and all(v["winner"] == v["left"] for v in votes)


def test_a_second_rater_is_given_the_pairs_with_fewest_votes_and_nobody_sees_a_pair_twice(tmp_path):
    store = Store(tmp_path / "s.sqlite", many_comparisons(6))
    alice = []
    for _ in range(3):
        pair = store.next_pair("alice")
        alice.append(pair["item"])
        store.vote(pair["token"], "alice", "tie")
    bob = []
    for _ in range(6):
        pair = store.next_pair("bob")
        bob.append(pair["item"])
        store.vote(pair["token"], "bob", "skip")
    assert set(bob[:3]).isdisjoint(alice) and len(set(bob)) == 6 and store.next_pair("bob") is None
    assert store.progress("alice") == {"done": 3, "total": 6}


def test_votes_the_server_never_offered_are_refused_and_not_stored(tmp_path):
    store = Store(tmp_path / "s.sqlite", many_comparisons(4, ["motion"]))
    pair = store.next_pair("alice")
    for token, rater, choice, answers, why in [
            ("forged-token", "alice", "left", {}, "no such pair"),
            (pair["token"], "mallory", "left", {}, "another rater"),
            (pair["token"], "alice", "both", {}, "the choice is one of"),
            (pair["token"], "alice", "left", {"beauty": "left"}, "answers are"),
            (pair["token"], "alice", "left", {"motion": "up"}, "answers are"),
            (pair["token"], "", "left", {}, "a rater's name")]:
        with pytest.raises(VoteRefused, match=why):
            store.vote(token, rater, choice, answers)
    store.vote(pair["token"], "alice", "right", {"motion": "left"})
    with pytest.raises(VoteRefused, match="has its vote already"):
        store.vote(pair["token"], "alice", "left")
    _, votes = read_votes(tmp_path / "s.sqlite")
    assert len(votes) == 1 and votes[0]["answers"] == {"motion": "left"} and votes[0]["winner"] == pair["right"]
    assert store.video(pair["token"], "../../etc/passwd") is None and store.video("forged", "left") is None


def test_a_database_of_another_study_or_of_something_else_is_refused(tmp_path, sample_folders):
    a, b = sample_folders
    Store(tmp_path / "s.sqlite", load_study([a, b]))
    Store(tmp_path / "s.sqlite", load_study([a, b]))  # the same study again: continues
    with pytest.raises(InputError, match=r"belongs to another study \(questions none\)"):
        Store(tmp_path / "s.sqlite", load_study([a, b], ("motion",)))
    with pytest.raises(InputError, match="belongs to another study"):
        Store(tmp_path / "s.sqlite", many_comparisons())
    (tmp_path / "text.sqlite").write_text("not a database, just words" * 40)
    with pytest.raises(InputError, match="is not a SQLite database"):
        Store(tmp_path / "text.sqlite", many_comparisons())
    sqlite3.connect(tmp_path / "other.sqlite").execute("CREATE TABLE songs (title TEXT)")
    with pytest.raises(InputError, match=r"of something else \(tables \['songs'\]\)"):
        Store(tmp_path / "other.sqlite", many_comparisons())


# -- the statistics against simulated raters -------------------------------------------------------------------

def simulate(strengths: dict[str, float], prompts: int, raters: int, seed: int, left_bias: float = 0.5,
             ties: float = 0.0) -> list[dict]:
    """Votes of raters who, on every prompt and pair of models, prefer i over j with the Bradley-Terry
    probability of the given log-strengths; with probability `ties` they call it a tie, and with `left_bias`
    above one half they pick the left side instead of judging, that share of the time beyond a half."""
    rng = np.random.default_rng(seed)
    models, votes = list(strengths), []
    for item in range(prompts):
        for i, a in enumerate(models):
            for b in models[i + 1:]:
                for r in range(raters):
                    left, right = (a, b) if rng.random() < 0.5 else (b, a)
                    if rng.random() < ties:
                        choice = "tie"
                    elif rng.random() < 2 * (left_bias - 0.5):
                        choice = "left"
                    else:
                        p_a = 1 / (1 + np.exp(strengths[b] - strengths[a]))
                        winner = a if rng.random() < p_a else b
                        choice = "left" if winner == left else "right"
                    votes.append({"rater": f"r{r}", "item": f"p{item}", "a": a, "b": b, "left": left, "right": right,
                                  "choice": choice, "winner": {"left": left, "right": right}.get(choice),
                                  "answers": {}, "time": 0.0})
    return votes


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_raters_who_prefer_a_seven_times_in_ten_are_recovered_within_the_interval(seed):
    strength = np.log(0.7 / 0.3)
    o = analyse(simulate({"A": strength, "B": 0.0}, prompts=80, raters=3, seed=seed), ["A", "B"], [],
                resamples=1000, seed=seed)["overall"]
    (pair,) = o["pairs"]
    assert pair["interval"][0] <= 0.7 <= pair["interval"][1] and pair["bt_interval"][0] <= 0.7 <= pair["bt_interval"][1]
    assert pair["interval"][1] - pair["interval"][0] < 0.15 and abs(pair["win_rate_a"] - pair["bt_p_a"]) < 0.01


def test_the_intervals_cover_the_true_preference_about_as_often_as_they_claim():
    strength = np.log(0.7 / 0.3)
    hits = 0
    for seed in range(60):
        pair = analyse(simulate({"A": strength, "B": 0.0}, prompts=40, raters=2, seed=100 + seed), ["A", "B"], [],
                       resamples=500, seed=seed)["overall"]["pairs"][0]
        hits += pair["interval"][0] <= 0.7 <= pair["interval"][1]
    assert 0.85 <= hits / 60 <= 1.0


def test_bradley_terry_recovers_the_strengths_of_three_models_and_ties_count_half():
    truth = {"A": 0.8, "B": 0.0, "C": -0.8}
    result = analyse(simulate(truth, prompts=150, raters=2, seed=3, ties=0.2), list(truth), [], resamples=500)
    bt = result["overall"]["bradley_terry"]
    for m, s in truth.items():
        assert bt[m]["interval"][0] <= s * 0.8 <= bt[m]["interval"][1] or abs(bt[m]["score"] - s * 0.8) < 0.12, (m, bt)
    assert bt["A"]["score"] > bt["B"]["score"] > bt["C"]["score"] and result["ties"] > 0
    # two models that always tie, and one that always wins: finite scores, in the right order
    wins = np.array([[0, 10, 5], [0, 0, 5], [5, 5, 0]], dtype=float)
    s = bradley_terry(wins)
    assert np.isfinite(s).all() and abs(s.sum()) < 1e-9 and s[0] > s[2] > s[1]


def test_position_bias_is_measured_and_moves_no_models_score():
    result = analyse(simulate({"A": 0.0, "B": 0.0}, prompts=100, raters=2, seed=4, left_bias=0.8), ["A", "B"], [],
                     resamples=500)["overall"]
    assert 0.72 < result["position"]["left_fraction"] < 0.88 and result["position"]["p_value"] < 1e-6
    assert result["pairs"][0]["interval"][0] < 0.5 < result["pairs"][0]["interval"][1]


def test_agreement_is_one_when_raters_agree_and_near_zero_when_they_judge_independently():
    votes = simulate({"A": 0.0, "B": 0.0}, prompts=100, raters=3, seed=5)
    loose = analyse(votes, ["A", "B"], [], resamples=200)["overall"]["agreement"]
    assert loose["comparisons"] == 100 and abs(loose["kappa"]) < 0.15
    for v in votes:  # every rater copies rater r0's verdict on the prompt
        first = next(w for w in votes if w["item"] == v["item"] and w["rater"] == "r0")
        v["choice"] = "left" if first["winner"] == v["left"] else "right"
        v["winner"] = first["winner"]
    tight = analyse(votes, ["A", "B"], [], resamples=200)["overall"]["agreement"]
    assert tight["observed"] == 1.0 and tight["kappa"] == pytest.approx(1.0)


# -- the commands --------------------------------------------------------------------------------------------

def test_the_report_writes_its_tables_figure_and_json_and_the_generators_scores(tmp_path, sample_folders, capsys):
    a, b = sample_folders
    report_b = tmp_path / "report_b"
    shutil.copytree(b, report_b / "videos")
    (report_b / "report.json").write_text(json.dumps({"fvd": {"value": 321.0}, "motion": {"all": {"presence": 0.5}}}))
    db = tmp_path / "s.sqlite"
    assert main(["report", "--db", str(tmp_path / "none.sqlite"), "--out", str(tmp_path / "r")]) == 2
    assert "does not exist" in capsys.readouterr().err
    store = Store(db, load_study([a, report_b], ("motion",)))
    assert main(["report", "--db", str(db), "--out", str(tmp_path / "r")]) == 2
    assert "holds no vote yet" in capsys.readouterr().err
    for rater in ("alice", "bob"):
        while (pair := store.next_pair(rater)) is not None:
            choice = "left" if pair["left"] == "A" else "right"
            store.vote(pair["token"], rater, choice if rater == "alice" else "tie", {"motion": choice})
    assert main(["report", "--db", str(db), "--out", str(tmp_path / "r"), "--resamples", "300"]) == 0
    out = json.loads((tmp_path / "r" / "report.json").read_text())
    pair = out["overall"]["pairs"][0]
    assert (pair["votes"], pair["wins_a"], pair["ties"], pair["win_rate_a"]) == (12, 6, 6, 0.75)
    assert out["questions"]["motion"]["pairs"][0]["win_rate_a"] == 1.0 and out["metrics"]["report_b"]["FVD"] == 321.0
    text = (tmp_path / "r" / "report.md").read_text()
    assert "| A | report_b | 12 | 6 | 0 | 6 | 75.0%" in text and "Fleiss' kappa" in text and "321.000" in text
    assert (tmp_path / "r" / "preference.png").read_bytes()[:4] == b"\x89PNG"


def test_serve_says_when_its_port_is_taken(tmp_path, sample_folders, capsys):
    a, b = sample_folders
    taken = socket.socket()
    taken.bind(("127.0.0.1", 0))
    taken.listen(1)
    port = taken.getsockname()[1]
    try:
        assert main(["serve", "--a", str(a), "--b", str(b), "--db", str(tmp_path / "s.sqlite"),
                     "--port", str(port)]) == 2
    finally:
        taken.close()
    err = capsys.readouterr().err
    assert err == f"error: port {port} on 127.0.0.1 is in use: pass another --port (0 picks a free one)\n"
