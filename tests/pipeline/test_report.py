"""The run report (pipeline.report) rendered by headless Chromium (Debian's ``chromium`` package).

Checked: the screenshot is not blank (many colours), the DOM holds every
query id, and a document holding ``<script>`` tags shows as text and runs
nothing (its script would set ``document.title``). Once on a crafted report
(a unit test: no Ray) and once on a real demo run's report (integration).
Skipped, saying so, only when the ``chromium`` binary is missing
(``apt-get install -y chromium``).
"""

from __future__ import annotations

import os
import shutil
import struct
import subprocess
import zlib

import pyarrow as pa
import pytest

from pipeline.report import render_report
from pipeline.tables import ATTRIBUTION, LAYERS, QUERIES, SCHEMAS, TABLES, TOKENS
from tests.pipeline.demo_runs import UNCUT, XSS_ID, XSS_PREFIX, demo_runs

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
needs_chromium = pytest.mark.skipif(CHROMIUM is None, reason="chromium not installed (apt-get install -y chromium)")
ESCAPED_SCRIPT = "&lt;script&gt;document.title='pwned'&lt;/script&gt;"


def chromium(tmp_path, *args: str) -> str:
    profile = tmp_path / "chromium-profile"
    out = subprocess.run(
        [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", f"--user-data-dir={profile}", *args],
        capture_output=True, text=True, timeout=180, check=True,
    )
    return out.stdout


def png_colours(path: str) -> int:
    """Distinct pixel colours of an 8-bit RGB/RGBA, non-interlaced PNG (Chromium's screenshots)."""
    data = open(path, "rb").read()
    assert data[:8] == b"\x89PNG\r\n\x1a\n", "not a PNG"
    pos, idat, header = 8, b"", None
    while pos < len(data):
        length, kind = struct.unpack(">I4s", data[pos : pos + 8])
        body = data[pos + 8 : pos + 8 + length]
        if kind == b"IHDR":
            header = struct.unpack(">IIBBBBB", body)
        elif kind == b"IDAT":
            idat += body
        pos += 12 + length
    width, height, depth, colour, _, _, interlace = header
    assert depth == 8 and colour in (2, 6) and interlace == 0, header
    bpp = 3 if colour == 2 else 4
    raw, stride = zlib.decompress(idat), width * bpp
    prev, colours = bytearray(stride), set()
    for y in range(height):
        kind, line = raw[y * (stride + 1)], bytearray(raw[y * (stride + 1) + 1 : (y + 1) * (stride + 1)])
        for i in range(stride):
            left = line[i - bpp] if i >= bpp else 0
            up, corner = prev[i], prev[i - bpp] if i >= bpp else 0
            if kind == 1:
                line[i] = (line[i] + left) & 255
            elif kind == 2:
                line[i] = (line[i] + up) & 255
            elif kind == 3:
                line[i] = (line[i] + (left + up) // 2) & 255
            elif kind == 4:
                p = left + up - corner
                pa_, pb, pc = abs(p - left), abs(p - up), abs(p - corner)
                line[i] = (line[i] + (left if pa_ <= pb and pa_ <= pc else up if pb <= pc else corner)) & 255
        colours.update(bytes(line[i : i + bpp]) for i in range(0, stride, bpp * 4))  # every 4th pixel
        prev = line
    return len(colours)


def check_in_browser(tmp_path, html_path: str, query_ids: list[str], title: str) -> str:
    """Screenshot not blank, every query id in the DOM, the page's own title kept; returns the DOM."""
    shot = str(tmp_path / "report.png")
    chromium(tmp_path, f"--screenshot={shot}", "--window-size=1200,1600", f"file://{html_path}")
    assert png_colours(shot) > 20, "the screenshot is (nearly) one colour: blank page"
    dom = chromium(tmp_path, "--dump-dom", f"file://{html_path}")
    for q in query_ids:
        assert f"data-query-id=\"{q}\"" in dom, q
    assert f"<title>{title}</title>" in dom and "pwned" not in dom.split("</title>")[0]
    return dom


def crafted_tables() -> dict[str, pa.Table]:
    """One query with a proponent whose text is script tags, U+FFFD and a special token; tokens and layers."""
    text = XSS_PREFIX + "caf\ufffd and <|endoftext|>"
    base = dict(query_id="q<1>", polarity="proponent", rank=1, doc_id="doc<b>", window=0, run_id="r")
    tables = {name: SCHEMAS[name].empty_table() for name in TABLES}
    tables[ATTRIBUTION] = pa.Table.from_pylist([base | dict(score=3.0, text=text, char_start=0, char_end=len(text))],
                                               SCHEMAS[ATTRIBUTION])
    pieces = [XSS_PREFIX, "caf", "\ufffd", " and ", "<|endoftext|>"]
    tables[TOKENS] = pa.Table.from_pylist(
        [base | dict(position=i, token_id=i, token_text=p, special=p.startswith("<|"), char_start=None, char_end=None,
                     score=[2.0, 1.5, -1.0, 0.25, 0.25][i]) for i, p in enumerate(pieces)], SCHEMAS[TOKENS])
    tables[LAYERS] = pa.Table.from_pylist(
        [base | dict(layer_index=i, layer=f"h.{i}.mlp", score=s) for i, s in enumerate([4.0, -1.0])], SCHEMAS[LAYERS])
    tables[QUERIES] = pa.Table.from_pylist(
        [dict(query_id="q<1>", prompt="<i>prompt</i>", completion=" done", log_prob=-1.5, num_completion_tokens=1,
              run_id="r")], SCHEMAS[QUERIES])
    return tables


@needs_chromium
def test_crafted_report_escapes_every_text_and_runs_nothing(tmp_path):
    html = render_report("r<x>", crafted_tables(), {"timings": {"fit_s": 1.0, "score_s": 2.5}}, {})
    assert "<script>" not in html and "<i>prompt" not in html and "doc<b>" not in html and "q<1>" not in html
    path = tmp_path / "report.html"
    path.write_text(html, encoding="utf-8")
    dom = check_in_browser(tmp_path, str(path), ["q&lt;1&gt;"], "Attribution report: r&lt;x&gt;")
    assert ESCAPED_SCRIPT in dom and "&lt;|endoftext|&gt;" in dom
    assert "class=\"bad\"" in dom and "class=\"tok special\"" in dom


@pytest.mark.integration
@needs_chromium
def test_demo_run_report_renders_with_every_query(tmp_path, small_demo, shared_tmp):
    runs = demo_runs(small_demo, shared_tmp)
    path = os.path.join(runs.root, "runs", UNCUT, "report.html")
    dom = check_in_browser(tmp_path, path, [q["id"] for q in runs.queries], f"Attribution report: {UNCUT}")
    assert f"data-doc-id=\"{XSS_ID}\"" in dom, "the <script> document is not among the report's rows"
    assert ESCAPED_SCRIPT in dom
    assert "<svg" in dom and "Stage times" in dom and runs.manifests[UNCUT]["factors_id"] in dom
