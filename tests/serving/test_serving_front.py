"""dfosd-serve's front (serving/gateway.py) and its page, against the session's real dfosd-serve.

Every attack of bench/serving_attacks.py is answered 4xx, tritonserver keeps running with flat
memory, the management endpoints need the admin key. The page at / in a real
headless Chromium (Debian's chromium + chromedriver, driven by selenium): upload a PNG, the
result is x4 and its pixels are the API's answer; a bad file and a refused image show the
reason. Runs before test_serving_server.py, whose last test stops the shared server.

Time on 2 CPU cores: ~10 s of attacks, ~5 s in the browser.
"""

from __future__ import annotations

import base64
import importlib.util
import io
import json
import os
import shutil
import time
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pytest
from serve_helpers import ADMIN_KEY, MAX_PIXELS, http_infer, image, status

HAVE_SERVER = importlib.util.find_spec("pytriton") is not None and importlib.util.find_spec("tritonclient") is not None
pytestmark = pytest.mark.skipif(not HAVE_SERVER, reason="needs tritonserver (PyPI nvidia-pytriton) and tritonclient: "
                                "pip install --no-deps nvidia-pytriton==0.7.0 && pip install 'tritonclient[http,grpc]'")

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMEDRIVER = shutil.which("chromedriver")
HAVE_BROWSER = bool(CHROMIUM and CHROMEDRIVER and importlib.util.find_spec("selenium"))
BROWSER_REASON = ("needs Debian's chromium and chromium-driver (apt-get install chromium chromium-driver; .ci/run does) "
                  "and selenium (in dfosd[dev])")


def _request(url, method="GET", body=None, headers=None):
    req = urllib.request.Request(url, data=body, method=method, headers=headers or {})
    try:
        with urllib.request.urlopen(req, timeout=60) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


def test_attacks_are_refused_and_memory_stays_flat(server, local):
    from dfosd.bench.serving_attacks import measure

    # smaller than the README's run (300 MB bodies, 32 at once, a 1 GiB bomb): refused from the header all the same
    result = measure(f"127.0.0.1:{server.http}", server.proc.pid, many=4, big=8 << 20, bomb_mib=64)
    for name, r in result["attacks"].items():
        assert r["answers"] and all(a[:3] in ("400", "403", "413", "415") for a in r["answers"]), (name, r)
        # nothing buffered: tritonserver never sees these bodies, the front holds at most a JSON header each
        assert r["peak_mb"]["tritonserver"] - result["before_mb"]["tritonserver"] < 20, (name, r)
        assert r["peak_mb"]["dfosd-serve"] - result["before_mb"]["dfosd-serve"] < 60, (name, r)
    assert result["tritonserver_kept_its_pid"], result
    assert "nested more than" in result["attacks"]["nested JSON, 300 KB"]["answers"][0]
    assert "more than this server's limit" in result["attacks"]["big binary body (10000x10000 declared)"]["answers"][0]
    assert "the header says" in result["attacks"]["big body behind a 16x16 header"]["answers"][0]
    img = image(20, 13, 70)
    np.testing.assert_array_equal(http_infer(server.http_url, img.permute(1, 2, 0).numpy()[None])[0],
                                  local(img).permute(1, 2, 0).numpy())
    server.watch()


def test_management_endpoints_need_the_admin_key(server):
    url = f"{server.http_url}/v2/logging"
    body = json.dumps({"log_verbose_level": 0}).encode()
    assert _request(url, "POST", body)[0] == 403
    code, text = _request(url, "POST", body, {"dfosd-admin-key": "wrong"})
    assert code == 403 and "dfosd-admin-key" in text
    for path in ("/v2/repository/index", "/v2/trace/setting", "/v2/systemsharedmemory/status",
                 "/v2/models/dfosd/trace/setting"):
        assert _request(server.http_url + path, "POST" if "index" in path else "GET", b"{}" if "index" in path
                        else None)[0] == 403, path
    code, text = _request(url, headers={"dfosd-admin-key": ADMIN_KEY})  # with the key, Triton answers
    assert code == 200 and "log_verbose_level" in json.loads(text), text
    code, text = _request(url, "POST", body, {"dfosd-admin-key": ADMIN_KEY, "Content-Type": "application/json"})
    assert code == 200, text
    assert _request(server.http_url + "/v2/models/other/infer", "POST", b"{}")[0] == 404
    assert status(f"{server.http_url}/v2/health/ready") == 200


def test_progress_of_a_request_is_served_while_it_runs(server):
    """The page's progress: a request with a KServe id (4 images of 96x96: 64 tiles) is reported at
    /progress/<id> by the model while its tiles run, and gone once it is answered."""
    import threading

    import tritonclient.http as th

    images = np.stack([image(96, 96, 80 + k).permute(1, 2, 0).numpy() for k in range(4)])
    done = {}

    def send():
        client = th.InferenceServerClient(f"127.0.0.1:{server.http}", network_timeout=300)
        x = th.InferInput("lr_image", list(images.shape), "UINT8")
        x.set_data_from_numpy(images)
        done["shape"] = client.infer("dfosd", [x], request_id="test-progress-1").as_numpy("sr_image").shape
        client.close()

    worker = threading.Thread(target=send)
    worker.start()
    seen = []
    while worker.is_alive():
        code, text = _request(f"{server.http_url}/progress/test-progress-1")
        if code == 200:
            seen.append(json.loads(text))
        time.sleep(0.02)
    worker.join()
    assert done["shape"] == (4, 384, 384, 3)
    assert seen and all(s["total"] == 64 and 0 < s["done"] < 64 for s in seen), seen
    assert _request(f"{server.http_url}/progress/test-progress-1")[0] == 404
    assert _request(f"{server.http_url}/progress/..%2Fetc")[0] == 404


def test_closed_without_admin_key_and_no_ui(tmp_path):
    """In-process front without --admin-key and with --no-ui; nothing behind it (503, not a crash)."""
    from dfosd.serving.gateway import Gateway, GatewayLimits
    from dfosd.serving.serve import free_port

    port, dead = free_port(), free_port()
    front = Gateway(GatewayLimits(model="dfosd", max_pixels=32, max_batch=1), f"http://127.0.0.1:{dead}",
                    "127.0.0.1", port, ui=False).start()
    try:
        base = f"http://127.0.0.1:{port}"
        code, text = _request(f"{base}/v2/logging", "POST", b"{}")
        assert code == 403 and "closed: start dfosd-serve with --admin-key" in text
        assert _request(f"{base}/")[0] == 404
        code, text = _request(f"{base}/v2/health/ready")
        assert code == 503 and "not reachable" in text
        head = json.dumps({"inputs": [{"name": "lr_image", "shape": [1, 8, 8, 3], "datatype": "UINT8",
                                       "parameters": {"binary_data_size": 192}}]}).encode()
        code, text = _request(f"{base}/v2/models/dfosd/infer", "POST", head + bytes(100),
                              {"Inference-Header-Content-Length": str(len(head))})
        assert code == 400 and "more than this server's limit of 32" in text, text
        small = head.replace(b"[1, 8, 8, 3]", b"[1, 4, 4, 3]").replace(b"192", b"48")
        code, text = _request(f"{base}/v2/models/dfosd/infer", "POST", small + bytes(40),
                              {"Inference-Header-Content-Length": str(len(small))})
        assert code == 400 and "the header says" in text, text
        code, text = _request(f"{base}/v2/models/dfosd/infer", "POST", head + bytes(192),
                              {"Inference-Header-Content-Length": str(len(head))})
        assert code == 400 and "more than this server's limit of 32" in text, text
    finally:
        front.stop()


# ---------------------------------------------------------------- the page, in a real browser


@pytest.fixture(scope="session")
def browser(tmp_path_factory):
    if not HAVE_BROWSER:
        pytest.skip(BROWSER_REASON)
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    opts = webdriver.ChromeOptions()
    opts.binary_location = CHROMIUM
    for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--disable-dev-shm-usage", "--window-size=1100,900",
                 f"--user-data-dir={tmp_path_factory.mktemp('chromium-profile')}"):
        opts.add_argument(flag)
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=opts)
    driver.set_script_timeout(60)
    try:
        yield driver
    finally:
        driver.quit()


def _upload(driver, path: Path, timeout: float = 120.0) -> str:
    """Pick ``path`` in the page; wait until the page says done or failed; return that state."""
    driver.execute_script("document.getElementById('result').dataset.state = ''")
    driver.find_element("id", "file").send_keys(str(path))
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        state = driver.execute_script("return document.getElementById('result').dataset.state")
        if state in ("done", "failed"):
            return state
        time.sleep(0.1)
    raise AssertionError(f"the page did not finish: {driver.find_element('id', 'status').text}")


def _shown(driver) -> np.ndarray:
    """The result canvas's pixels as the page's PNG download has them."""
    from PIL import Image

    url = driver.execute_script("return document.getElementById('after').toDataURL('image/png')")
    return np.array(Image.open(io.BytesIO(base64.b64decode(url.split(",", 1)[1]))).convert("RGB"))


def test_page_upscales_in_headless_chromium(server, browser, tmp_path):
    from PIL import Image
    from selenium.webdriver.support.ui import Select

    browser.get(server.http_url + "/")
    deadline = time.monotonic() + 30
    while "engines" not in browser.find_element("id", "model").text and time.monotonic() < deadline:
        time.sleep(0.1)
    assert "default colour fix: none" in browser.find_element("id", "model").text
    yy, xx = np.mgrid[0:72, 0:96]  # a picture with shapes, not noise: the screenshot shows something
    picture = np.stack([(xx * 2.6) % 256, (yy * 3.5) % 256, 128 + 100 * np.sin((xx + yy) / 9)], -1)
    picture[20:50, 30:60] = (230, 200, 40)
    picture = picture.clip(0, 255).astype(np.uint8)
    Image.fromarray(picture).save(tmp_path / "picture.png")
    assert _upload(browser, tmp_path / "picture.png") == "done", browser.find_element("id", "error").text
    result = browser.find_element("id", "result")
    assert (result.get_attribute("data-width"), result.get_attribute("data-height")) == ("384", "288")
    np.testing.assert_array_equal(_shown(browser), http_infer(server.http_url, picture[None])[0])
    assert browser.find_element("id", "download").get_attribute("href").startswith("blob:")
    # the colour fix chosen in the page is the request's
    Select(browser.find_element("id", "colorfix")).select_by_value("wavelet")
    Image.fromarray(picture).save(tmp_path / "picture-wavelet.png")
    assert _upload(browser, tmp_path / "picture-wavelet.png") == "done"
    np.testing.assert_array_equal(_shown(browser), http_infer(server.http_url, picture[None], {"color_fix": "wavelet"})[0])
    shot = Path(os.environ.get("DFOSD_SCREENSHOT", tmp_path / "page.png"))  # the README's: DFOSD_SCREENSHOT=docs/...
    browser.save_screenshot(str(shot))
    assert shot.stat().st_size > 10_000
    # a file that is not an image, and one the server refuses: the reason in plain words
    (tmp_path / "broken.png").write_bytes(b"this is not a PNG")
    assert _upload(browser, tmp_path / "broken.png") == "failed"
    assert "broken.png could not be read as an image" in browser.find_element("id", "error").text
    Image.fromarray(np.zeros((100, 100, 3), np.uint8)).save(tmp_path / "big.png")
    assert _upload(browser, tmp_path / "big.png") == "failed"
    assert f"more than this server's limit of {MAX_PIXELS}" in browser.find_element("id", "error").text
