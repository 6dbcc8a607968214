"""The quantization picker in a real browser: Voilà runs a notebook with the picker on a live kernel, headless
Chromium (Debian's ``chromium`` and ``chromium-driver``, installed by ``make test``) renders it, a click on a
checkbox goes through the kernel and back, and a screenshot is saved for people to look at.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import nbformat
import pytest

from unsloth_nb import widgets

ARTIFACTS = Path(os.environ.get("UNSLOTH_NB_ARTIFACTS", Path(__file__).parents[1] / "test-artifacts"))
CHROMIUM, CHROMEDRIVER = "/usr/bin/chromium", "/usr/bin/chromedriver"


def css_rgb(short_hex: str) -> str:
    """"#b00" -> "rgba(187, 0, 0, 1)", as the browser reports a computed colour."""
    r, g, b = (int(c * 2, 16) for c in short_hex.lstrip("#"))
    return f"rgba({r}, {g}, {b}, 1)"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def voila(llama3_dir, tmpfs, tmp_path):
    """Voilà serving a one-cell notebook that shows the picker; stopped afterwards. The output folder is a
    real 100 MB filesystem, so that the 16- and 32-bit files show as too big."""
    small_disk = tmpfs(100 * 2**20)
    notebook = nbformat.v4.new_notebook()
    notebook.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    notebook.cells = [nbformat.v4.new_code_cell(
        "from unsloth_nb import widgets\n"
        f"picker = widgets.QuantPicker({str(llama3_dir)!r}, {str(small_disk / 'gguf')!r}, ['q4_k_m'])\n"
        "picker")]
    path = tmp_path / "picker.ipynb"
    nbformat.write(notebook, path)
    port = free_port()
    log = tmp_path / "voila.log"
    with open(log, "w") as out:
        proc = subprocess.Popen([sys.executable, "-m", "voila", str(path), "--no-browser", f"--port={port}",
                                 "--Voila.ip=127.0.0.1"], stdout=out, stderr=subprocess.STDOUT, cwd=tmp_path)
    try:
        deadline = time.monotonic() + 120
        while True:
            assert proc.poll() is None, log.read_text()
            try:
                socket.create_connection(("127.0.0.1", port), 1).close()
                break
            except OSError:
                assert time.monotonic() < deadline, log.read_text()
                time.sleep(0.5)
        yield f"http://127.0.0.1:{port}/", log
    finally:
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@pytest.fixture
def browser():
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1400,1000"):
        options.add_argument(arg)
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    yield driver
    driver.quit()


def test_picker_renders_and_a_click_changes_the_selection(voila, browser):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    url, log = voila
    browser.get(url)
    body = lambda: browser.find_element(By.TAG_NAME, "body").text  # noqa: E731
    try:
        WebDriverWait(browser, 180).until(lambda _: "selected: q4_k_m;" in body())
    except Exception:
        pytest.fail(f"the picker did not render; page text: {body()!r}; Voilà log: {log.read_text()[-2000:]}")
    boxes = {b.text.strip(): b for b in browser.find_elements(By.CSS_SELECTOR, ".widget-checkbox")}
    assert {"q2_k", "q4_k_m", "q8_0", "bf16", "f32"} <= set(boxes)
    assert boxes["q4_k_m"].find_element(By.TAG_NAME, "input").is_selected()
    assert "f32" in body() and "too big" in body() and "fits" in body()

    boxes["f32"].find_element(By.TAG_NAME, "input").click()  # the kernel's observer recomputes the total
    WebDriverWait(browser, 60).until(lambda _: "selected: q4_k_m, f32;" in body())
    assert "does NOT fit" in body()
    total = browser.find_elements(By.XPATH, "//span[contains(., 'does NOT fit')]")[-1]
    assert total.value_of_css_property("color") == css_rgb(widgets.RED)

    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    shot = ARTIFACTS / "quant_picker.png"
    browser.save_screenshot(str(shot))
    assert shot.stat().st_size > 10_000
    print(f"screenshot: {shot}")
