"""The study's votes in SQLite, written as they are cast: a crash or a closed tab loses nothing, and a server
restarted on the same database goes on where it stopped.

Tables: `study` (the fingerprint of the study the database belongs to), `shown` (every pair put before a rater:
the rater, the comparison, which model was on the left, an unguessable token, the time) and `votes` (one per
shown pair at most: the choice as the rater saw it, the winning model, the optional questions' answers, the
time). A vote names its token; a token never shown, shown to another rater, or already voted on is refused.
"""

from __future__ import annotations

import json
import random
import secrets
import sqlite3
import threading
import time
from pathlib import Path

from errors import InputError
from evaluation.preference.study import Comparison, Study

CHOICES = ("left", "right", "tie", "skip")
ANSWERS = ("left", "right", "tie")
SCHEMA = """
CREATE TABLE IF NOT EXISTS study (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS shown (
    id INTEGER PRIMARY KEY, token TEXT UNIQUE NOT NULL, rater TEXT NOT NULL, item TEXT NOT NULL,
    model_a TEXT NOT NULL, model_b TEXT NOT NULL, left_model TEXT NOT NULL, shown_at REAL NOT NULL);
CREATE TABLE IF NOT EXISTS votes (
    shown_id INTEGER PRIMARY KEY REFERENCES shown(id), choice TEXT NOT NULL, winner TEXT,
    answers TEXT NOT NULL, voted_at REAL NOT NULL);
CREATE INDEX IF NOT EXISTS shown_by_rater ON shown (rater);
"""


class VoteRefused(Exception):
    """A vote the server does not store (never shown, another rater's, already cast, a choice not offered)."""


def check_rater(name: str) -> str:
    name = (name or "").strip()
    if not name or len(name) > 64 or any(not c.isprintable() for c in name):
        raise VoteRefused("a rater's name is 1 to 64 printable characters")
    return name


def open_db(path: str | Path) -> sqlite3.Connection:
    """The database at `path`, as a study database (made if new); anything else is refused."""
    path = Path(path)
    if path.is_dir():
        raise InputError(f"--db {path} is a folder: name a file, study.sqlite")
    if not path.parent.is_dir():
        raise InputError(f"--db {path}: its folder {path.parent} does not exist")
    try:
        db = sqlite3.connect(str(path), check_same_thread=False, isolation_level=None)
        db.execute("PRAGMA journal_mode=WAL")
        db.execute("PRAGMA synchronous=FULL")  # a vote that was answered is on disk
        tables = {r[0] for r in db.execute("SELECT name FROM sqlite_master WHERE type='table'")}
    except sqlite3.DatabaseError as e:
        raise InputError(f"--db {path} is not a SQLite database ({e}): name a new file for a new study") from None
    if tables and not {"study", "shown", "votes"} <= tables:
        raise InputError(f"--db {path} is a SQLite database of something else (tables {sorted(tables)}): "
                         f"name a new file for the study")
    db.executescript(SCHEMA)
    return db


def read_fingerprint(db: sqlite3.Connection) -> dict | None:
    row = db.execute("SELECT value FROM study WHERE key='fingerprint'").fetchone()
    return json.loads(row[0]) if row else None


class Store:
    """The votes of one study. Thread-safe (one lock round every statement), as the server may call it from
    several threads."""

    def __init__(self, path: str | Path, study: Study, seed: int = 0):
        self.path, self.study, self.seed = Path(path), study, seed
        self.db = open_db(path)
        self.lock = threading.Lock()
        mine, theirs = study.fingerprint(), read_fingerprint(self.db)
        if theirs is None:
            self.db.execute("INSERT INTO study VALUES ('fingerprint', ?)", (json.dumps(mine),))
        elif theirs != mine:
            what = ("models " + ", ".join(n for n, _ in theirs["models"]) + " from " +
                    ", ".join(f for _, f in theirs["models"])) if theirs["models"] != mine["models"] else (
                "questions " + (",".join(theirs["questions"]) or "none")) if theirs["questions"] != mine["questions"] \
                else f"{theirs['comparisons']} other comparisons"
            raise InputError(f"--db {self.path} belongs to another study ({what}): pass the same folders and "
                             f"--questions as when it was made, or a new --db")
        self.by_key = {c.key: c for c in study.comparisons}

    # -- the rater's queue -------------------------------------------------------------------------------------

    def _order(self, rater: str) -> list[Comparison]:
        """The rater's own shuffle of every comparison (seeded by the study's seed and the name)."""
        order = list(self.study.comparisons)
        random.Random(f"{self.seed}:order:{rater}").shuffle(order)
        return order

    def progress(self, rater: str) -> dict:
        with self.lock:
            done = self.db.execute("SELECT COUNT(*) FROM shown JOIN votes ON votes.shown_id = shown.id "
                                   "WHERE rater = ?", (rater,)).fetchone()[0]
        return {"done": done, "total": len(self.study.comparisons)}

    def next_pair(self, rater: str) -> dict | None:
        """The pair to show `rater`: the one shown and not yet voted on (a reload shows it again, in the same
        order), else the comparison with the fewest votes so far among those the rater has not seen (in the
        rater's own shuffle), its sides drawn at random and recorded; None when the rater has seen them all."""
        rater = check_rater(rater)
        with self.lock:
            open_row = self.db.execute(
                "SELECT token, item, model_a, model_b, left_model FROM shown WHERE rater = ? AND id NOT IN "
                "(SELECT shown_id FROM votes) ORDER BY id LIMIT 1", (rater,)).fetchone()
            if open_row is None:
                seen = {f"{i}\t{a}\t{b}" for i, a, b in self.db.execute(
                    "SELECT item, model_a, model_b FROM shown WHERE rater = ?", (rater,))}
                counts = {f"{i}\t{a}\t{b}": n for i, a, b, n in self.db.execute(
                    "SELECT item, model_a, model_b, COUNT(*) FROM shown GROUP BY item, model_a, model_b")}
                todo = [c for c in self._order(rater) if c.key not in seen]
                if not todo:
                    return None
                c = min(todo, key=lambda c: counts.get(c.key, 0))  # min keeps the shuffle's order among equals
                left = c.a if secrets.randbelow(2) == 0 else c.b
                token = secrets.token_urlsafe(16)
                self.db.execute("INSERT INTO shown (token, rater, item, model_a, model_b, left_model, shown_at) "
                                "VALUES (?, ?, ?, ?, ?, ?, ?)", (token, rater, c.item, c.a, c.b, left, time.time()))
                open_row = (token, c.item, c.a, c.b, left)
        token, item, a, b, left = open_row
        return {"token": token, "item": item, "prompt": self.by_key[f"{item}\t{a}\t{b}"].prompt,
                "left": left, "right": b if left == a else a}

    def video(self, token: str, side: str) -> Path | None:
        """The file behind one side of a shown pair; None for any token or side that is not one."""
        if side not in ("left", "right"):
            return None
        with self.lock:
            row = self.db.execute("SELECT item, model_a, model_b, left_model FROM shown WHERE token = ?",
                                  (token,)).fetchone()
        if row is None:
            return None
        item, a, b, left = row
        return self.study.path(left if side == "left" else (b if left == a else a), item)

    # -- votes -------------------------------------------------------------------------------------------------

    def vote(self, token: str, rater: str, choice: str, answers: dict | None = None) -> dict:
        """Store one vote, or raise VoteRefused and store nothing."""
        rater = check_rater(rater)
        if choice not in CHOICES:
            raise VoteRefused(f"the choice is one of {', '.join(CHOICES)}")
        answers = dict(answers or {})
        bad = [k for k, v in answers.items() if k not in self.study.questions or v not in ANSWERS]
        if bad or choice == "skip" and answers:
            raise VoteRefused(f"answers are {{question: left|right|tie}} for the study's questions "
                              f"({', '.join(self.study.questions) or 'none'}), and none with a skip")
        with self.lock:
            row = self.db.execute("SELECT id, rater, model_a, model_b, left_model FROM shown WHERE token = ?",
                                  (str(token),)).fetchone()
            if row is None:
                raise VoteRefused("no such pair was shown")
            shown_id, owner, a, b, left = row
            if owner != rater:
                raise VoteRefused("this pair was shown to another rater")
            right = b if left == a else a
            winner = {"left": left, "right": right}.get(choice)
            try:
                self.db.execute("INSERT INTO votes (shown_id, choice, winner, answers, voted_at) VALUES (?, ?, ?, ?, ?)",
                                (shown_id, choice, winner, json.dumps(answers, sort_keys=True), time.time()))
            except sqlite3.IntegrityError:
                raise VoteRefused("this pair has its vote already") from None
        return self.progress(rater)


def read_votes(path: str | Path) -> tuple[dict, list[dict]]:
    """The study's fingerprint and every vote (skips included), each with the models, who won, the shown order,
    the answers and the rater, for the report."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"--db {path} does not exist: it is the file `serve --db` wrote the votes to")
    db = open_db(path)
    fingerprint = read_fingerprint(db)
    if fingerprint is None:
        raise InputError(f"--db {path} holds no study: `serve --db {path}` makes one")
    rows = db.execute("SELECT s.rater, s.item, s.model_a, s.model_b, s.left_model, v.choice, v.winner, v.answers, "
                      "v.voted_at FROM votes v JOIN shown s ON s.id = v.shown_id ORDER BY v.voted_at").fetchall()
    db.close()
    votes = [{"rater": r, "item": i, "a": a, "b": b, "left": lm, "right": b if lm == a else a, "choice": c,
              "winner": w, "answers": json.loads(ans), "time": t} for r, i, a, b, lm, c, w, ans, t in rows]
    return fingerprint, votes
