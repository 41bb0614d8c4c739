"""The HTML trace viewer in headless Chromium: loads without console errors, and the screenshot
shows the category-coloured tokens. Skipped (with the reason) where Chromium is not installed."""
import shutil
import struct
import subprocess
import zlib

import pytest

from hybridfast.report import PALETTE, trace_viewer_html

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync"]


def read_png(data: bytes):
    """Minimal PNG decoder (8-bit RGB/RGBA, non-interlaced) -> (w, h, channels, rows)."""
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    pos, idat, w = 8, b"", None
    while pos < len(data):
        n, kind = struct.unpack(">I4s", data[pos: pos + 8])
        body = data[pos + 8: pos + 8 + n]
        if kind == b"IHDR":
            w, h, depth, ctype = struct.unpack(">IIBB", body[:10])
            assert depth == 8 and ctype in (2, 6)
            ch = 3 if ctype == 2 else 4
        elif kind == b"IDAT":
            idat += body
        pos += 12 + n
    raw = zlib.decompress(idat)
    stride, rows, prev = w * ch, [], bytearray(w * ch)
    for y in range(h):
        f, line = raw[y * (stride + 1)], bytearray(raw[y * (stride + 1) + 1: (y + 1) * (stride + 1)])
        for i in range(stride):
            a = line[i - ch] if i >= ch else 0
            b, c = prev[i], prev[i - ch] if i >= ch else 0
            if f == 1:
                line[i] = (line[i] + a) & 255
            elif f == 2:
                line[i] = (line[i] + b) & 255
            elif f == 3:
                line[i] = (line[i] + (a + b) // 2) & 255
            elif f == 4:
                p = a + b - c
                pa, pb, pc = abs(p - a), abs(p - b), abs(p - c)
                line[i] = (line[i] + (a if pa <= pb and pa <= pc else b if pb <= pc else c)) & 255
        rows.append(bytes(line))
        prev = line
    return w, h, ch, rows


@pytest.mark.skipif(CHROMIUM is None, reason="Debian chromium not installed (apt-get install chromium)")
def test_trace_viewer_in_chromium(tmp_path):
    row = dict(problem="p0", question="What is 6 * 7?", output="The answer is 42.", extracted="42", gold="42",
               correct=True, pieces=["The", " answer", " is", " 42", "."], category=[0, 1, 1, 2, 0],
               steered=[True, True, False, True, True], category_names=["deduction", "check", "compute"])
    page = tmp_path / "traces.html"
    page.write_text(trace_viewer_html({"hybrid-paper": [row]}))
    shot = tmp_path / "shot.png"
    r = subprocess.run([CHROMIUM, *FLAGS, f"--user-data-dir={tmp_path / 'prof'}", "--enable-logging=stderr",
                        "--window-size=800,400", f"--screenshot={shot}", page.as_uri()],
                       capture_output=True, text=True, timeout=120)
    assert shot.exists(), r.stderr[-2000:]
    assert "Uncaught" not in r.stderr and "CONSOLE(" not in r.stderr, r.stderr[-2000:]
    w, h, ch, rows = read_png(shot.read_bytes())
    want = [tuple(int(c[i: i + 2], 16) for i in (1, 3, 5)) for c in PALETTE[:3]]
    found = set()
    for row in rows:
        for x in range(0, w * ch, ch):
            px = tuple(row[x: x + 3])
            for j, c in enumerate(want):
                if max(abs(px[k] - c[k]) for k in range(3)) <= 3:
                    found.add(j)
    assert found == {0, 1, 2}, f"category colours seen: {found}"
