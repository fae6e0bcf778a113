"""Open a page in real headless Chromium and read back what it rendered (no driver, no mocks).

A copy of the page gets a small script that, once every image has loaded or failed, writes a JSON
summary into the DOM; ``chromium --dump-dom`` prints the DOM after the load event.
"""

from __future__ import annotations

import html
import json
import re
import shutil
import subprocess
import tempfile
from pathlib import Path

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")

_PROBE = """<script>
window.addEventListener("load", () => {
  const images = Array.from(document.images);
  const out = {
    images: images.map(i => ({alt: i.alt, loaded: i.complete && i.naturalWidth > 0, width: i.naturalWidth})),
    tables: Array.from(document.querySelectorAll("table")).map(t => ({
      cls: t.className, rows: t.tBodies.length ? t.tBodies[0].rows.length : 0,
      header: Array.from(t.querySelectorAll("th")).map(th => th.textContent)})),
    title: document.title,
  };
  const pre = document.createElement("pre");
  pre.id = "probe";
  pre.textContent = JSON.stringify(out);
  document.body.appendChild(pre);
});
</script>"""


def render_in_chromium(page: Path, timeout: int = 60) -> dict:
    """What Chromium made of ``page``: per image whether it decoded (naturalWidth > 0), the tables, the title."""
    assert CHROMIUM, "chromium is not installed (apt-get install chromium chromium-driver)"
    with tempfile.TemporaryDirectory() as tmp:
        probe = Path(tmp) / "probe.html"
        probe.write_text(page.read_text(encoding="utf-8").replace("</body>", _PROBE + "</body>"), encoding="utf-8")
        result = subprocess.run(
            [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
             "--disable-component-update", "--disable-sync", "--no-first-run", f"--user-data-dir={tmp}/profile",
             "--virtual-time-budget=10000", "--dump-dom", probe.as_uri()],
            capture_output=True, text=True, timeout=timeout)  # fmt: skip
    match = re.search(r'<pre id="probe">(.*?)</pre>', result.stdout, re.S)
    assert match, f"chromium printed no probe result (rc {result.returncode}):\n{result.stderr[-2000:]}"
    return json.loads(html.unescape(match.group(1)))
