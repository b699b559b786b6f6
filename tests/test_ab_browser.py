"""A real browser: headless Chromium (selenium) opens an annotator link on ``python -m evals.ab serve``, answers
three pairs with the keyboard only, and the votes are in the database; and a Prolific participant goes from the
crowd link through consent and the practice round to the completion code. Screenshots are kept in
``test-artifacts/ab/`` (ignored by git)."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import pytest
from ab_helpers import ROOT, SYSTEMS, require, write_system
from sqlalchemy import func, select

from evals.ab.db import Annotator, Pair, Vote, make_engine, make_sessions
from evals.ab.study import add_annotators, create_study

ARTIFACTS = ROOT / "test-artifacts" / "ab"
KEYS = {"left": "1", "tie": "\ue015", "right": "\ue014"}  # 1, ArrowDown, ArrowRight (selenium's key codes)


@contextmanager
def serving(db: str) -> Iterator[str]:
    """``python -m evals.ab serve`` on a free loopback port until the block ends; yields its base URL."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([sys.executable, "-m", "evals.ab", "serve", "--db", db, "--port", str(port)],
                            cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)}, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}"
    try:
        for _ in range(300):  # bounded wait for the server to answer
            try:
                if httpx.get(f"{base}/a/", timeout=2).status_code == 403:
                    break
            except httpx.TransportError:
                time.sleep(0.1)
        else:
            pytest.fail(f"serve did not start: {proc.stdout.read1().decode()[-500:]}")
        yield base
    finally:
        proc.terminate()
        proc.wait(timeout=30)


@pytest.fixture
def server(tmp_path: Path):
    a = write_system(tmp_path, SYSTEMS[0], 4, 1)
    b = write_system(tmp_path, SYSTEMS[1], 4, 1, shift=1)
    db = str(tmp_path / "s.sqlite")
    sessions = make_sessions(make_engine(db))
    create_study(sessions, "browser", a, b, "geneval", ["overall", "prompt_adherence", "visual_quality"], 1,
                 "alpha", "beta", seed=0)
    (_, token), = add_annotators(sessions, "browser", 1)
    with serving(db) as base:
        yield {"url": f"{base}/a/{token}", "sessions": sessions, "token": token}


@pytest.fixture
def browser():
    chromium = require(["chromium", "chromium-browser", "google-chrome"], "Chromium",
                       "apt-get install -y chromium chromium-driver")
    driver_path = require(["chromedriver"], "chromedriver", "apt-get install -y chromium chromium-driver")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    os.environ.setdefault("SE_OFFLINE", "true")  # never let selenium try to download a browser or driver
    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1280,1000",
                "--disable-gpu"):
        options.add_argument(arg)
    driver = webdriver.Chrome(service=Service(driver_path), options=options)
    driver.set_page_load_timeout(60)
    try:
        yield driver
    finally:
        driver.quit()


def test_keyboard_voting_in_chromium(server, browser) -> None:
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    browser.get(server["url"])
    plan = [("left", "tie", "right"), ("right", "right", "left"), ("tie", "left", "tie")]
    answered = []
    for n, picks in enumerate(plan, 1):
        pair = browser.find_element(By.NAME, "pair").get_attribute("value")
        assert browser.find_element(By.ID, "progress").text == f"{n} of 4"
        images = browser.find_elements(By.CSS_SELECTOR, "figure img")
        assert len(images) == 2 and all(browser.execute_script(
            "return arguments[0].complete && arguments[0].naturalWidth", img) == 64 for img in images)
        keys = ActionChains(browser)
        for pick in picks:
            keys.send_keys(KEYS[pick])
        keys.perform()
        checked = [browser.find_element(By.CSS_SELECTOR, f'input[name="choice_{a}"]:checked').get_attribute("value")
                   for a in ("overall", "prompt_adherence", "visual_quality")]
        assert checked == list(picks)
        if n == 1:
            ARTIFACTS.mkdir(parents=True, exist_ok=True)
            assert browser.save_screenshot(str(ARTIFACTS / "voting_page.png"))
        ActionChains(browser).send_keys("\ue007").perform()  # Enter submits
        WebDriverWait(browser, 30).until(
            lambda d, old=pair: d.find_elements(By.NAME, "pair") and
            d.find_element(By.NAME, "pair").get_attribute("value") != old)
        answered.append((pair, picks))
    with server["sessions"]() as s:
        stored = s.execute(select(Pair.public_id, Vote.aspect, Vote.choice).join(Pair, Pair.id == Vote.pair_id)
                           .join(Annotator, Annotator.id == Vote.annotator_id)
                           .where(Annotator.token == server["token"])).all()
    expected = {(pair, aspect, pick) for pair, picks in answered
                for aspect, pick in zip(("overall", "prompt_adherence", "visual_quality"), picks, strict=True)}
    assert set(stored) == expected and len(stored) == 9
    assert (ARTIFACTS / "voting_page.png").stat().st_size > 10_000


def test_a_prolific_participant_from_entry_link_to_completion_code(tmp_path: Path, browser) -> None:
    """A participant opens the crowd link with Prolific's ids, reads the instructions, agrees, does the practice
    round (one answer that matches the expected one, one that does not, each with its feedback and the second with
    its explanation), zooms an image to full resolution, answers "can't tell" once, goes back once to change an
    answer, finishes the quota and sees the completion code. The database holds exactly those votes, each with its
    server time and time-on-task, and the two practice answers apart from them.
    Screenshots: test-artifacts/ab/prolific_*.png."""
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    from evals.ab.db import PracticeAnswer
    from evals.ab.study import PracticeEntry, StudyText

    a = write_system(tmp_path, SYSTEMS[0], 4, 1, size=512)
    b = write_system(tmp_path, SYSTEMS[1], 4, 1, shift=1, size=512)
    db = str(tmp_path / "s.sqlite")
    sessions = make_sessions(make_engine(db))
    practice = (PracticeEntry(a / "00000/samples/00000.png", b / "00000/samples/00000.png", "left", "a red square",
                              "overall"),
                PracticeEntry(a / "00001/samples/00000.png", b / "00001/samples/00000.png", "right", "a green circle",
                              "visual_quality", "The right one has **cleaner** edges."))
    text = StudyText("# How to judge\n\nLook at **both** images.", "Your answers are stored for research.",
                     {"visual_quality": "Which image is sharper?"}, practice)
    made = create_study(sessions, "prolific", a, b, "geneval", ["overall", "visual_quality"], 1, "alpha", "beta",
                        seed=0, per_annotator=3, cant_tell=True, crowd=True, completion_code="DONE1234", text=text)
    ids = {"PROLIFIC_PID": "5f1e2d3c4b5a69788796a5b4", "STUDY_ID": "st42", "SESSION_ID": "se7"}
    ARTIFACTS.mkdir(parents=True, exist_ok=True)

    def keys(*pressed: str) -> None:
        chain = ActionChains(browser)
        for k in pressed:
            chain.send_keys(k)
        chain.perform()

    def pair_id() -> str:
        return browser.find_element(By.NAME, "pair").get_attribute("value")

    def wait_for(check) -> None:  # noqa: ANN001
        WebDriverWait(browser, 30).until(lambda d: check())

    def checked() -> list[str]:
        return [browser.find_element(By.CSS_SELECTOR, f'input[name="choice_{x}"]:checked').get_attribute("value")
                for x in ("overall", "visual_quality")]

    with serving(db) as base:
        browser.get(f"{base}/p/{made.crowd_token}?" + "&".join(f"{k}={v}" for k, v in ids.items()))
        assert browser.find_element(By.CSS_SELECTOR, "#instructions h2").text == "How to judge"
        assert "stored for research" in browser.find_element(By.ID, "consent").text
        assert browser.save_screenshot(str(ARTIFACTS / "prolific_consent.png"))
        browser.find_element(By.ID, "agree").click()
        # the practice round: two pairs with feedback before any real pair
        wait_for(lambda: browser.find_elements(By.NAME, "practice"))
        assert browser.find_element(By.ID, "progress").text == "Practice 1 of 2" and not browser.find_elements(
            By.NAME, "pair")
        assert "a red square" in browser.page_source
        assert browser.save_screenshot(str(ARTIFACTS / "prolific_practice.png"))
        keys("1", "\ue007")  # left (the expected answer), Enter
        wait_for(lambda: browser.find_elements(By.ID, "feedback"))
        assert "That matches." in browser.find_element(By.ID, "feedback").text
        assert not browser.find_elements(By.ID, "explanation")
        browser.find_element(By.ID, "continue").click()
        wait_for(lambda: browser.find_elements(By.ID, "progress")
                 and browser.find_element(By.ID, "progress").text == "Practice 2 of 2")
        assert "Which image is sharper?" in browser.page_source
        keys("2", "\ue007")  # about the same; the expected answer is right
        wait_for(lambda: browser.find_elements(By.ID, "feedback"))
        feedback = browser.find_element(By.ID, "feedback").text
        assert "That does not match." in feedback and "Expected answer: Right is better" in feedback
        assert browser.find_element(By.CSS_SELECTOR, "#explanation strong").text == "cleaner"
        assert browser.save_screenshot(str(ARTIFACTS / "prolific_practice_feedback.png"))
        browser.find_element(By.ID, "continue").click()
        wait_for(lambda: browser.find_elements(By.NAME, "pair"))
        assert browser.find_element(By.ID, "progress").text == "1 of 3"
        assert "Which image is sharper?" in browser.page_source
        # zoom: the pair fills the window (not capped at 440 px), no pixelation at this size; a click shows the
        # 512 px original pixel for pixel
        left = browser.find_element(By.CSS_SELECTOR, 'figure img[alt="left image"]')
        wait_for(lambda: browser.execute_script("return arguments[0].complete && arguments[0].naturalWidth", left))
        assert left.size["width"] > 440
        assert browser.execute_script("return getComputedStyle(arguments[0]).imageRendering", left) != "pixelated"
        left.click()
        zoom_img = browser.find_element(By.ID, "zoom-img")
        wait_for(lambda: browser.execute_script("return arguments[0].complete && arguments[0].naturalWidth",
                                                zoom_img) == 512)
        assert "open" in browser.find_element(By.ID, "zoom").get_attribute("class")
        assert zoom_img.size["width"] == 512
        assert browser.save_screenshot(str(ARTIFACTS / "prolific_zoom.png"))
        keys("\ue00c")  # Escape closes; keys typed while zoomed did not answer anything
        assert "open" not in browser.find_element(By.ID, "zoom").get_attribute("class")
        answers = {}
        first = pair_id()
        keys("1", "4")  # overall left, visual quality can't tell
        assert checked() == ["left", "cant_tell"]
        assert browser.save_screenshot(str(ARTIFACTS / "prolific_voting.png"))
        keys("\ue007")
        wait_for(lambda: browser.find_elements(By.NAME, "pair") and pair_id() != first)
        answers[first] = ["left", "cant_tell"]
        second = pair_id()
        keys("3", "2", "\ue007")
        wait_for(lambda: browser.find_elements(By.NAME, "pair") and pair_id() != second)
        third = pair_id()
        keys("\ue003")  # Backspace: back to the second pair, its stored answers selected
        wait_for(lambda: "Change your last answer" in browser.page_source)
        assert pair_id() == second and checked() == ["right", "tie"]
        keys("1", "2", "\ue007")  # overall changed to left
        wait_for(lambda: browser.find_elements(By.NAME, "pair") and pair_id() == third)
        answers[second] = ["left", "tie"]
        keys("2", "3", "\ue007")
        answers[third] = ["tie", "right"]
        wait_for(lambda: browser.find_elements(By.ID, "completion-code"))
        assert browser.find_element(By.ID, "completion-code").text == "DONE1234"
        assert browser.save_screenshot(str(ARTIFACTS / "prolific_done.png"))
    with sessions() as s:
        ann = s.scalar(select(Annotator).where(Annotator.platform_pid == ids["PROLIFIC_PID"]))
        assert (ann.platform_study, ann.platform_session) == ("st42", "se7") and ann.consented_at is not None
        stored = s.execute(select(Pair.public_id, Vote.aspect, Vote.choice, Vote.created_at, Vote.seconds,
                                  Vote.changed_at).join(Pair, Pair.id == Vote.pair_id)
                           .where(Vote.annotator_id == ann.id)).all()
        assert s.scalar(select(func.count()).select_from(Vote)) == 6  # nobody else voted, practice is no vote
        assert s.execute(select(PracticeAnswer.choice, PracticeAnswer.correct).where(
            PracticeAnswer.annotator_id == ann.id).order_by(PracticeAnswer.id)).all() == [("left", True),
                                                                                       ("tie", False)]
    assert sorted((p, asp, c) for p, asp, c, *_ in stored) == sorted(
        (p, asp, c) for p, picks in answers.items() for asp, c in zip(("overall", "visual_quality"), picks,
                                                                    strict=True))
    assert all(created is not None and seconds is not None and seconds > 0 for _, _, _, created, seconds, _ in stored)
    assert {p for p, _, _, _, _, changed in stored if changed is not None} == {second}
    for name in ("consent", "practice", "practice_feedback", "zoom", "voting", "done"):
        assert (ARTIFACTS / f"prolific_{name}.png").stat().st_size > 5_000
