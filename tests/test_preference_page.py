"""The rating page in a real headless browser (Debian's chromium and chromium-driver, driven by selenium) against
the server started as a user starts it, on a free localhost port. `.ci/run` installs the browser; a machine
without it fails here rather than skipping."""

from __future__ import annotations

import http.client
import json
import os
import shutil
import signal
import sqlite3
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def chromedriver() -> str:
    path = shutil.which("chromedriver") or "/usr/bin/chromedriver"
    if not os.path.exists(path) or not (shutil.which("chromium") or shutil.which("chromium-browser")):
        pytest.fail("the page tests need Debian's chromium and chromium-driver: apt-get install chromium "
                    "chromium-driver (.ci/run does)")
    return path


@pytest.fixture(scope="module")
def browser():
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                "--autoplay-policy=no-user-gesture-required", "--window-size=1280,800"):
        options.add_argument(arg)
    driver = webdriver.Chrome(options=options, service=Service(chromedriver()))
    yield driver
    driver.quit()


@contextmanager
def server(folders, db: Path, *extra: str):
    """`python -m evaluation.preference serve` on a free port, as a user runs it; yields (url, process)."""
    cmd = [sys.executable, "-m", "evaluation.preference", "serve", "--a", str(folders[0]), "--b", str(folders[1]),
           "--db", str(db), "--port", "0", *extra]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env=os.environ | {"PYTHONPATH": str(ROOT)})
    lines = []
    try:
        for line in proc.stdout:
            lines.append(line)
            if line.startswith("serving on "):
                break
        else:
            raise AssertionError(f"the server did not start: {''.join(lines)}")
        url = line.split()[-1].rstrip("/")
        for _ in range(50):  # uvicorn answers a moment after the socket is bound
            try:
                request(url, "GET", "/api/study")
                break
            except OSError:
                time.sleep(0.1)
        yield url, proc
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGINT)
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
        proc.stdout.close()


def request(url: str, method: str, path: str, body: dict | bytes | None = None) -> tuple[int, bytes]:
    """One raw request (the path sent as it is, dots and all, as a hostile client would)."""
    host = url.removeprefix("http://")
    conn = http.client.HTTPConnection(host, timeout=10)
    data = json.dumps(body).encode() if isinstance(body, dict) else body
    conn.request(method, path, body=data, headers={"content-type": "application/json"} if data else {})
    r = conn.getresponse()
    out = r.status, r.read()
    conn.close()
    return out


def wait(driver, condition, timeout: float = 15):
    from selenium.webdriver.support.ui import WebDriverWait

    return WebDriverWait(driver, timeout, poll_frequency=0.1).until(condition)


PLAYING = """return [...document.querySelectorAll('video')].map(v => [v.readyState, v.paused, v.currentTime])"""


def shown_token(driver) -> str:
    return wait(driver, lambda d: d.execute_script(
        "const s = document.getElementById('study'); return !s.hidden && s.dataset.token"))


def press(driver, key: str) -> None:
    from selenium.webdriver.common.by import By

    before = driver.find_element(By.ID, "progress").text
    driver.find_element(By.TAG_NAME, "body").send_keys(key)
    wait(driver, lambda d: d.find_element(By.ID, "progress").text != before)


def db_rows(db: Path, sql: str, *args) -> list[tuple]:
    with sqlite3.connect(db) as c:
        return c.execute(sql, args).fetchall()


@pytest.fixture(scope="module")
def study(sample_folders, tmp_path_factory):
    db = tmp_path_factory.mktemp("study") / "study.sqlite"
    with server(sample_folders, db, "--questions", "motion") as (url, _):
        yield url, db, sample_folders


def test_the_page_plays_two_videos_and_a_key_press_records_a_vote(browser, study):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys

    url, db, _ = study
    browser.get(f"{url}/?rater=alice")
    token = shown_token(browser)

    def playing(d):
        s = d.execute_script(PLAYING)
        return s if all(r >= 3 and not p and t > 0.2 for r, p, t in s) else None

    state = wait(browser, playing)
    assert len(state) == 2 and abs(state[0][2] - state[1][2]) < 0.3  # both playing, in step
    assert browser.find_element(By.ID, "progress").text == "0 of 6 rated"
    assert "A" not in browser.find_element(By.ID, "study").text.split()  # no model's name on the page
    browser.find_element(By.CSS_SELECTOR, "[data-question=motion][data-answer=right]").click()
    press(browser, Keys.ARROW_LEFT)
    (left, choice, winner, answers), = db_rows(db, "SELECT s.left_model, v.choice, v.winner, v.answers FROM votes v "
                                                   "JOIN shown s ON s.id = v.shown_id WHERE s.token = ?", token)
    assert (choice, winner, json.loads(answers)) == ("left", left, {"motion": "right"})
    assert browser.find_element(By.ID, "progress").text == "1 of 6 rated" and shown_token(browser) != token


def test_a_reload_continues_and_the_recorded_order_is_the_one_shown(browser, study):
    url, db, (a, b) = study
    browser.get(f"{url}/?rater=bob")
    token = shown_token(browser)
    browser.refresh()
    assert shown_token(browser) == token  # the open pair again, not a new one
    (item, left), = db_rows(db, "SELECT item, left_model FROM shown WHERE token = ?", token)
    status, body = request(url, "GET", f"/video/{token}/left")
    assert status == 200 and body == ((a if left == "A" else b) / f"{item}.mp4").read_bytes()
    status, body = request(url, "GET", f"/video/{token}/right")
    assert status == 200 and body == ((b if left == "A" else a) / f"{item}.mp4").read_bytes()


def test_two_raters_have_their_own_queues_and_never_see_a_pair_twice(browser, study):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys

    url, db, _ = study
    browser.get(f"{url}/?rater=carol")
    for key in [Keys.ARROW_RIGHT, Keys.ARROW_DOWN, "s", Keys.ARROW_LEFT, Keys.ARROW_RIGHT, Keys.ARROW_LEFT]:
        shown_token(browser)
        press(browser, key)
    wait(browser, lambda d: "All 6 pairs rated" in d.find_element(By.ID, "message").text)
    carol = db_rows(db, "SELECT s.item, v.choice FROM shown s JOIN votes v ON v.shown_id = s.id WHERE rater = 'carol'")
    assert len({i for i, _ in carol}) == 6 and [c for _, c in carol] == ["right", "tie", "skip", "left", "right", "left"]
    browser.get(f"{url}/?rater=dave")
    shown_token(browser)
    assert browser.find_element(By.ID, "progress").text == "0 of 6 rated"


def test_the_server_reads_nothing_outside_the_study_and_refuses_forged_votes(study):
    url, db, _ = study
    for path in ["/video/../../etc/passwd", "/../../../etc/passwd", "/video/%2e%2e/%2e%2e/etc/passwd",
                 "/video/x/..%2f..%2f..%2fetc%2fpasswd", "/etc/passwd", "/page.html", "/server.py", "/study.sqlite"]:
        status, body = request(url, "GET", path)
        assert status in (400, 404) and b"root:" not in body, path
    status, body = request(url, "GET", "/api/next?rater=erin")
    token = json.loads(body)["token"]
    before = db_rows(db, "SELECT COUNT(*) FROM votes")
    for vote in [{"token": "forged", "rater": "erin", "choice": "left"},
                 {"token": token, "rater": "mallory", "choice": "left"},
                 {"token": token, "rater": "erin", "choice": "../../x"},
                 {"token": token, "rater": "erin", "choice": "left", "answers": {"quality": "left"}}]:
        status, body = request(url, "POST", "/api/vote", vote)
        assert status == 400 and "error" in json.loads(body), vote
    assert request(url, "POST", "/api/vote", b"not json")[0] == 400
    assert request(url, "POST", "/api/vote", b"x" * 20_000)[0] == 413
    assert db_rows(db, "SELECT COUNT(*) FROM votes") == before


def test_a_server_killed_mid_study_restarts_with_every_vote_kept(browser, sample_folders, tmp_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys

    db = tmp_path / "study.sqlite"
    with server(sample_folders, db) as (url, proc):
        browser.get(f"{url}/?rater=frank")
        voted = []
        for key in (Keys.ARROW_LEFT, Keys.ARROW_RIGHT):
            voted.append(shown_token(browser))
            press(browser, key)
        open_token = shown_token(browser)
        proc.kill()  # no clean shutdown
        proc.wait()
    with server(sample_folders, db) as (url, _):
        browser.get(f"{url}/?rater=frank")
        assert shown_token(browser) == open_token  # the pair on screen when it died
        assert browser.find_element(By.ID, "progress").text == "2 of 6 rated"
        kept = db_rows(db, "SELECT s.token, v.choice FROM votes v JOIN shown s ON s.id = v.shown_id ORDER BY v.voted_at")
        assert kept == [(voted[0], "left"), (voted[1], "right")]
