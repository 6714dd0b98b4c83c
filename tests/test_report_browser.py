"""report.html as a browser shows it: headless Chromium renders the page and decodes every figure."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest

from basestation.report import write_report
from test_report import synthetic_run

CHROMIUM = shutil.which("chromium") or ("/usr/bin/chromium" if Path("/usr/bin/chromium").exists() else None)
pytestmark = pytest.mark.skipif(CHROMIUM is None, reason="Chromium is not installed (Debian package 'chromium'); "
                                                         "scripts/bootstrap.sh --with-chromium installs it")

FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync", "--hide-scrollbars"]

# Added to a copy of the page only: the report itself carries no script. After load it writes, per
# image, whether it is a decoded PNG data URI and its natural size into the title.
PROBE = """<script>
window.addEventListener("load", () => {
  const parts = Array.from(document.images).map(img =>
    [img.src.startsWith("data:image/png;base64,") ? "png" : "other", img.complete ? "done" : "pending",
     img.naturalWidth, img.naturalHeight].join(":"));
  document.title = "IMAGES " + parts.join(" ");
});
</script>"""


def chromium(tmp_path: Path, *args: str) -> subprocess.CompletedProcess:
    profile = tmp_path / "profile"
    return subprocess.run([CHROMIUM, *FLAGS, f"--user-data-dir={profile}", *args], capture_output=True,
                          text=True, timeout=180)


@pytest.fixture(scope="module")
def report(tmp_path_factory: pytest.TempPathFactory):
    out = tmp_path_factory.mktemp("browser-report")
    runs = [synthetic_run("fp32", 11, bits=(32, 32)), synthetic_run("int8", 12, bits=(8, 8))]
    return write_report(runs, out, target_accuracy=0.8)


def test_screenshot_of_the_report_is_not_blank(report, tmp_path: Path) -> None:
    import matplotlib.image

    shot = tmp_path / "report.png"
    done = chromium(tmp_path, f"--screenshot={shot}", "--window-size=1280,2000", report.html.as_uri())
    assert shot.exists(), f"chromium wrote no screenshot (exit {done.returncode}): {done.stderr[-2000:]}"
    pixels = matplotlib.image.imread(shot)[..., :3]
    assert pixels.shape[:2] == (2000, 1280)
    not_white = np.any(pixels < 0.95, axis=-1).mean()
    dark = np.all(pixels < 0.35, axis=-1).mean()          # text, axes and dark-blue bars
    assert pixels.std() > 0.08
    assert not_white > 0.05, f"only {not_white:.1%} of the screenshot is not white"
    assert dark > 0.005, f"only {dark:.2%} of the screenshot is dark (text, axes, bars)"


def test_browser_decodes_every_embedded_figure(report, tmp_path: Path) -> None:
    probe = tmp_path / "probe.html"
    page = report.html.read_text(encoding="utf-8")
    probe.write_text(page.replace("</body>", PROBE + "</body>"), encoding="utf-8")
    done = chromium(tmp_path, "--virtual-time-budget=10000", "--dump-dom", probe.as_uri())
    title = re.search(r"<title>IMAGES ([^<]*)</title>", done.stdout)
    assert title, f"the probe did not run (exit {done.returncode}): {done.stderr[-2000:]}"
    images = [item.split(":") for item in title.group(1).split()]
    assert len(images) == len(report.figures) == 10
    for kind, state, width, height in images:
        assert (kind, state) == ("png", "done")
        assert int(width) >= 600 and int(height) >= 200
