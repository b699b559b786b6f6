"""A real browser: headless Chromium (selenium) opens an annotator link on ``python -m evals.ab serve``, answers
three pairs with the keyboard only, and the votes are in the database. The voting page's screenshot is kept as
``test-artifacts/ab/voting_page.png``."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
from ab_helpers import ROOT, SYSTEMS, require, write_system
from sqlalchemy import select

from evals.ab.db import Annotator, Pair, Vote, make_engine, make_sessions
from evals.ab.study import add_annotators, create_study

ARTIFACTS = ROOT / "test-artifacts" / "ab"
KEYS = {"left": "1", "tie": "\ue015", "right": "\ue014"}  # 1, ArrowDown, ArrowRight (selenium's key codes)


@pytest.fixture
def server(tmp_path: Path):
    a = write_system(tmp_path, SYSTEMS[0], 4, 1)
    b = write_system(tmp_path, SYSTEMS[1], 4, 1, shift=1)
    db = str(tmp_path / "s.sqlite")
    sessions = make_sessions(make_engine(db))
    create_study(sessions, "browser", a, b, "geneval", ["overall", "prompt_adherence", "visual_quality"], 1,
                 "alpha", "beta", seed=0)
    (_, token), = add_annotators(sessions, "browser", 1)
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
        yield {"url": f"{base}/a/{token}", "sessions": sessions, "token": token}
    finally:
        proc.terminate()
        proc.wait(timeout=30)


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
