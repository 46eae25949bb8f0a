"""Renders a local HTML file in headless Chromium (Debian's `chromium`) the way a person opens
it: prints JSON with the rendered DOM (after layout, `--dump-dom`) and, from a screenshot, how
many distinct colours the page shows and the share of pixels that are not the background.

Usage: render_page.py FILE.html OUT.png
Fails with a message naming the package when Chromium is missing."""

import json
import shutil
import struct
import subprocess
import sys
import tempfile
import zlib
from collections import Counter


def chromium() -> str:
    for name in ("chromium", "chromium-browser", "google-chrome"):
        path = shutil.which(name)
        if path:
            return path
    sys.exit("chromium is missing: sudo apt-get install -y chromium")


def run(args: list[str]) -> str:
    with tempfile.TemporaryDirectory(prefix="tg-chromium") as profile:
        cmd = [chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
               "--disable-dev-shm-usage", f"--user-data-dir={profile}", *args]
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
        if out.returncode != 0:
            sys.exit(f"chromium failed ({out.returncode}): {out.stderr[-2000:]}")
        return out.stdout


def pixels(path: str):
    """Decodes an 8-bit, non-interlaced RGB/RGBA PNG (what Chromium writes) with the stdlib."""
    data = open(path, "rb").read()
    assert data[:8] == b"\x89PNG\r\n\x1a\n", "not a PNG"
    pos, idat, width = 8, b"", 0
    while pos < len(data):
        (length,) = struct.unpack(">I", data[pos:pos + 4])
        kind, body = data[pos + 4:pos + 8], data[pos + 8:pos + 8 + length]
        if kind == b"IHDR":
            width, height, depth, color, _, _, interlace = struct.unpack(">IIBBBBB", body)
            assert depth == 8 and color in (2, 6) and interlace == 0, (depth, color, interlace)
            bpp = 4 if color == 6 else 3
        elif kind == b"IDAT":
            idat += body
        pos += 12 + length
    raw, stride = zlib.decompress(idat), width * bpp
    prev, rows = bytearray(stride), []
    for y in range(height):
        f, line = raw[y * (stride + 1)], bytearray(raw[y * (stride + 1) + 1:(y + 1) * (stride + 1)])
        for i in range(stride):
            a = line[i - bpp] if i >= bpp else 0
            b, c = prev[i], prev[i - bpp] if i >= bpp else 0
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
        rows.append(line)
        prev = line
    for line in rows:
        for x in range(0, stride, bpp):
            yield bytes(line[x:x + 3])


def main() -> None:
    page, png = sys.argv[1], sys.argv[2]
    dom = run(["--dump-dom", f"file://{page}"])
    run([f"--screenshot={png}", "--window-size=1200,1600", "--hide-scrollbars", f"file://{page}"])
    counts = Counter(pixels(png))
    total = sum(counts.values())
    background = counts.most_common(1)[0][1]
    print(json.dumps({"dom": dom, "colors": len(counts),
                      "ink": (total - background) / total, "pixels": total}))


if __name__ == "__main__":
    main()
