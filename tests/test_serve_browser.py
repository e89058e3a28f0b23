"""`moee serve` in a real browser: headless Chromium uploads a portrait and a WAV, moves two palette
sliders, generates, downloads the MP4; a text file as the portrait shows the CLI's message; two
requests at once both finish, in order, on one compiled model."""

from __future__ import annotations

import json
import os
import pathlib
import shutil
import socket
import subprocess
import sys
import time
import urllib.request

import numpy as np
import pytest
import soundfile as sf
from PIL import Image

from moee_jax.data.audio import SAMPLE_RATE, num_video_frames
from moee_jax.data.synthetic import generate_clip

REPO = pathlib.Path(__file__).resolve().parent.parent
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
DRIVER = shutil.which("chromedriver")
INSTALL = "install Debian's chromium and chromium-driver (apt-get install chromium chromium-driver), as .ci/run does"

pytestmark = [
    pytest.mark.skipif(CHROMIUM is None or DRIVER is None, reason=f"no Chromium / chromedriver found: {INSTALL}"),
]


def test_the_page_turns_its_emotion_inputs_into_the_clis_emotion_specs():
    from moee_jax.inference.inputs import InputError
    from moee_jax.ui.app import MODE_LABEL, MODE_PALETTE, emotion_spec, palette_spec

    assert palette_spec([0.6, 0, 0, 0, 0, 0.4]) == "happy:0.6,surprised:0.4"
    assert emotion_spec(MODE_PALETTE, "happy", 1.0, [0.6, 0, 0, 0, 0, 0.4], "", None).kind == "palette"
    label = emotion_spec(MODE_LABEL, "sad", 0.5, [0] * 6, "", None)
    assert label.describe()["weights"] == {"sadness": 0.5}  # half way to neutral
    assert emotion_spec(MODE_LABEL, "sad", 1.0, [0] * 6, "", None).kind == "label"
    with pytest.raises(InputError, match="every slider is at 0"):
        palette_spec([0] * 6)
    with pytest.raises(InputError, match="intensity"):
        emotion_spec(MODE_LABEL, "sad", 0.0, [0] * 6, "", None)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def media(tmp_path_factory):
    d = tmp_path_factory.mktemp("serve_media")
    clip = generate_clip(3, "happy", num_frames=12, size=96)  # 0.48 s of speech
    Image.fromarray(clip.frames[0]).save(d / "face.png")
    sf.write(d / "speech.wav", clip.audio.astype(np.float32), SAMPLE_RATE)
    (d / "notes.txt").write_text("this is not a picture\n")
    (d / "notes.png").write_text("this is not a picture either\n")  # passes the page's file-type filter
    return {"dir": d, "frames": num_video_frames(clip.audio.size, SAMPLE_RATE, 25.0)}


@pytest.fixture(scope="module")
def server(tiny_run):
    pytest.importorskip("gradio", reason="moee serve needs Gradio: pip install 'moee_jax[ui]'")
    port = _free_port()
    env = {**os.environ, "PYTHONPATH": str(REPO), "JAX_PLATFORMS": "cpu"}
    proc = subprocess.Popen([sys.executable, "-m", "moee_jax.cli", "serve", f"--checkpoint={tiny_run}", f"--port={port}",
                             "--nowarmup"],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)  # fmt: skip
    lines = []
    deadline = time.time() + 300
    while time.time() < deadline:
        line = proc.stdout.readline()
        if not line and proc.poll() is not None:
            break
        lines.append(line)
        if line.startswith("moee serve: http://"):
            break
    else:
        proc.kill()
    if proc.poll() is not None:
        pytest.fail("moee serve did not start:\n" + "".join(lines[-40:]))
    yield {"url": f"http://127.0.0.1:{port}/", "proc": proc, "lines": lines}
    proc.terminate()
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        proc.kill()


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    webdriver = pytest.importorskip("selenium.webdriver", reason="the browser test drives Chromium through Selenium: pip install selenium")
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1280,1600", "--disable-gpu"):
        options.add_argument(arg)
    driver = webdriver.Chrome(service=Service(DRIVER), options=options)
    driver.set_page_load_timeout(60)
    yield driver
    driver.quit()


def _wait(driver, condition, timeout=240):
    from selenium.webdriver.support.ui import WebDriverWait

    return WebDriverWait(driver, timeout, poll_frequency=0.25).until(condition)


def _file_input(driver, elem_id):
    from selenium.webdriver.common.by import By

    return _wait(driver, lambda d: d.find_element(By.CSS_SELECTOR, f"#{elem_id} input[type=file]"))


def _set_number(driver, elem_id, value):
    """Type a value into a Gradio slider's number box (what a user does to set it exactly)."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys

    box = _wait(driver, lambda d: d.find_element(By.CSS_SELECTOR, f"#{elem_id} input[type=number]"))  # rendered late under load
    box.send_keys(Keys.CONTROL, "a")
    box.send_keys(str(value), Keys.TAB)


def _errors(driver) -> str:
    """The text of every error toast on the page (read in one script call: toasts come and go)."""
    return driver.execute_script(
        "return Array.from(document.querySelectorAll(\".toast-body, [data-testid='toast-body']\")).map(e => e.innerText).join(' ')"
    ).strip()


def test_generate_from_the_page_then_a_bad_portrait_shows_the_clis_message(server, browser, media):
    from selenium.webdriver.common.by import By

    t0 = time.time()
    d = browser
    d.get(server["url"])
    _file_input(d, "portrait").send_keys(str(media["dir"] / "face.png"))
    _file_input(d, "speech").send_keys(str(media["dir"] / "speech.wav"))
    d.find_element(By.CSS_SELECTOR, "#detect input[type=checkbox]").click()  # the portrait is already a face crop
    d.find_element(By.XPATH, "//*[@id='mode']//label[.//span[text()='palette']]").click()
    _wait(d, lambda d: d.find_element(By.CSS_SELECTOR, "#palette_happiness input[type=number]").is_displayed())
    _set_number(d, "palette_happiness", 0.6)
    _set_number(d, "palette_surprise", 0.4)
    d.find_element(By.XPATH, "//button[contains(., 'sampling')]").click()
    _set_number(d, "steps", 2)
    d.find_element(By.ID, "generate").click()
    video = _wait(d, lambda d: d.find_elements(By.CSS_SELECTOR, "#result video[src]") or _fail_on_error(d))[0]
    src = video.get_attribute("src")
    out = media["dir"] / "downloaded.mp4"
    urllib.request.urlretrieve(src, out)
    import av

    with av.open(str(out)) as container:
        assert container.format.name.startswith("mov") and container.streams.audio, "an MP4 with its speech"
        frames = sum(1 for _ in container.decode(video=0))
    assert frames == media["frames"]
    settings = d.find_element(By.CSS_SELECTOR, "#settings a[href]").get_attribute("href")
    sidecar = json.loads(urllib.request.urlopen(settings).read())
    assert sidecar["emotion"]["kind"] == "palette" and sidecar["steps"] == 2, sidecar
    assert sidecar["emotion"]["weights"] == {"happiness": 0.6, "surprise": 0.4}, sidecar
    # MOEE_SCREENSHOT=docs/serve.png refreshes the README's picture of the page.
    d.save_screenshot(os.environ.get("MOEE_SCREENSHOT") or str(media["dir"] / "serve.png"))

    d.find_element(By.CSS_SELECTOR, "#portrait button[aria-label*='lear']").click()  # remove the portrait
    _file_input(d, "portrait").send_keys(str(media["dir"] / "notes.txt"))  # refused by the page itself, naming the file
    message = _wait(d, lambda d: _errors(d) or None, timeout=60)
    assert "notes.txt" in message and "image" in message, message
    _dismiss_errors(d)
    _file_input(d, "portrait").send_keys(str(media["dir"] / "notes.png"))  # an image by name only: the CLI's check
    d.find_element(By.ID, "generate").click()
    message = _wait(d, lambda d: _errors(d) or None, timeout=120)
    assert "notes.png" in message and "not an image" in message, message
    assert "Traceback" not in message
    assert time.time() - t0 < 180


def _dismiss_errors(d):
    from selenium.common.exceptions import StaleElementReferenceException
    from selenium.webdriver.common.by import By

    def gone(d):
        for close in d.find_elements(By.CSS_SELECTOR, ".toast-close, [data-testid='toast-close']"):
            try:
                close.click()
            except StaleElementReferenceException:  # it closed by itself meanwhile
                pass
        return not _errors(d)

    _wait(d, gone, timeout=30)


def _fail_on_error(d):
    shown = _errors(d)
    if shown:
        raise AssertionError(f"the page shows an error: {shown}")
    return False


def test_two_requests_at_once_finish_in_order_on_one_compiled_model(server, media):
    from gradio_client import Client, handle_file

    client = Client(server["url"], verbose=False)
    name = "/generate"
    args = dict(image=handle_file(str(media["dir"] / "face.png")), detect=False, audio=handle_file(str(media["dir"] / "speech.wav")),
                mode="label", label="happy", intensity=1.0, happiness=0, sadness=0, anger=0, disgust=0, fear=0, surprise=0,
                text="", video=None, steps=2, seed=0, cfg_reference=2.0, cfg_audio=3.5, cfg_emotion=3.5)  # fmt: skip
    # (the page's default scales for this run: the program the page test compiled serves these too)
    first = client.submit(**args, api_name=name)
    deadline = time.time() + 60
    while first.status().code.name in ("STARTING", "JOINING_QUEUE") and time.time() < deadline:
        time.sleep(0.05)  # the first is queued or running: the second arrives behind it
    second = client.submit(**args, api_name=name)
    results = [first.result(timeout=300), second.result(timeout=300)]
    settings = [json.loads(pathlib.Path(r[1]).read_text()) for r in results]
    assert settings[0]["finished"] < settings[1]["finished"], "served in the order they arrived"
    assert settings[0]["compiled_programs"] == settings[1]["compiled_programs"], "the second request compiled again"
