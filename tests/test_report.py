"""HTML reports: self-contained, escaped, z-scores as the model gives them, and (when
Debian's Chromium is installed) rendered offline by a headless browser."""

import base64
import dataclasses
import io
import re
import shutil
import subprocess

import numpy as np
import pytest

from alsiron.cli import main
from alsiron.cohort.normative import NO_MODEL_MESSAGE, build_normative_model
from alsiron.cohort.records import HEADLINE_INDEX
from alsiron.cohort.report import (
    BAND_RGB,
    esc,
    render_cohort_report,
    render_subject_report,
    write_report,
)
from alsiron.sim.cohort import simulate_index_cohort

HOSTILE = "sub-<script>alert(1)</script>"


@pytest.fixture(scope="module")
def cohort():
    records, _ = simulate_index_cohort(80, 3, seed=7, als_effect_ppm=0.004)
    model = build_normative_model(records)
    return records, model


def _png(colour=(255, 0, 0)) -> bytes:
    from matplotlib.figure import Figure

    fig = Figure(figsize=(1, 1))
    fig.patch.set_facecolor(np.array(colour) / 255)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=20)
    return buf.getvalue()


def _hostile_records(records):
    rows = [r for r in records if r.subject == "sub-02"]
    return [dataclasses.replace(r, subject=HOSTILE, site="<b>site</b>",
                                qc_notes={"note": "<i>x</i>"}) for r in rows]


def _assert_self_contained(page: str) -> None:
    lowered = page.lower()
    for forbidden in ("<script", "<link", "@import", "url(", "href=", "<iframe", "<object",
                      "http://", "https://"):
        assert forbidden not in lowered, forbidden
    sources = re.findall(r'src="([^"]*)"', page)
    assert sources
    for src in sources:
        assert src.startswith("data:image/png;base64,")
        assert base64.b64decode(src.split(",", 1)[1]).startswith(b"\x89PNG\r\n\x1a\n")


def test_subject_page_is_self_contained_and_escapes_ids_and_file_names(cohort, tmp_path):
    records, model = cohort
    qc_ok = tmp_path / "qc_<img src=x onerror=alert(2)>.png"
    qc_ok.write_bytes(_png())
    not_png = tmp_path / "notes.png"
    not_png.write_text("plain text")
    missing = tmp_path / "absent&.png"
    page = render_subject_report(_hostile_records(records), model=model,
                                 qc_images=[qc_ok, not_png, missing])
    _assert_self_contained(page)
    assert HOSTILE not in page and esc(HOSTILE) in page
    assert "<b>site</b>" not in page and "<i>x</i>" not in page
    assert "<img src=x onerror" not in page
    assert esc("<img src=x onerror=alert(2)>") in page
    assert esc(qc_ok.name) in page and esc(missing.name) in page
    assert base64.b64encode(_png()).decode() in page  # the montage is inline
    assert page.count("<img ") == 1 + 1  # one trajectory plot, one montage


def test_table_shows_the_model_zscores(cohort):
    records, model = cohort
    rows = [r for r in records if r.subject == "sub-04"]
    page = render_subject_report(rows, model=model)
    for r in rows:
        z = model.z_scores(r)[HEADLINE_INDEX].z
        assert f">{z:.2f}<" in page
        assert f">{r.indices[HEADLINE_INDEX] * 1000:.2f}<" in page
    without = render_subject_report(rows, model=None)
    assert esc(NO_MODEL_MESSAGE) in without
    _assert_self_contained(without)


def test_cohort_page_counts_groups(cohort):
    records, model = cohort
    page = render_cohort_report(records, model=model)
    _assert_self_contained(page)
    assert page.count("<tr><td class=\"l\">sub-") == 80
    assert re.search(r">ALS</td><td>40</td>", page)
    assert re.search(r">control</td><td>40</td>", page)


@pytest.mark.skipif(shutil.which("chromium") is None,
                    reason="Debian's chromium is not installed (apt-get install chromium)")
def test_pages_render_offline_in_headless_chromium(cohort, tmp_path):
    from matplotlib.image import imread

    records, model = cohort
    html_path = write_report(tmp_path / "hostile.html",
                             render_subject_report(_hostile_records(records), model=model))
    shot = tmp_path / "shot.png"
    # No network: every request goes to a closed local port and no name resolves.
    offline = ["--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
               "--disable-background-networking", "--proxy-server=127.0.0.1:9",
               "--host-resolver-rules=MAP * ~NOTFOUND", "--window-size=1000,1200"]
    subprocess.run(["chromium", *offline, f"--screenshot={shot}", html_path.as_uri()],
                   check=True, capture_output=True, timeout=120)
    pixels = (imread(shot)[..., :3] * 255).round().astype(int)
    band = np.all(np.abs(pixels - np.array(BAND_RGB)) <= 2, axis=-1)
    # the inline trajectory PNG was decoded and drawn: its band colour fills thousands
    # of screen pixels (the page's own CSS uses no such colour)
    assert band.sum() > 5000
    dom = subprocess.run(["chromium", *offline, "--dump-dom", html_path.as_uri()],
                         check=True, capture_output=True, timeout=120, text=True).stdout
    assert "<script>alert(1)" not in dom and "&lt;script&gt;alert(1)" in dom


def test_cli_builds_the_model_and_writes_both_reports(cohort, tmp_path, capsys):
    from alsiron.cohort.registry import Registry

    records, _ = cohort
    reg_path = tmp_path / "reg.sqlite"
    with Registry.open(reg_path) as reg:
        reg.record_sessions(records)
    model_path = tmp_path / "model.json"
    assert main(["normative", "build", "--registry", str(reg_path),
                 "--out", str(model_path)]) == 0
    assert "40 control sessions" in capsys.readouterr().out
    assert main(["normative", "build", "--registry", str(reg_path),
                 "--out", str(model_path)]) != 0  # refuses to overwrite
    qc = tmp_path / "qc.png"
    qc.write_bytes(_png())
    out = tmp_path / "sub-03.html"
    assert main(["report", str(tmp_path / "sub-03"), "--registry", str(reg_path),
                 "--normative", str(model_path), "--qc", str(qc), "--out", str(out)]) == 0
    page = out.read_text()
    _assert_self_contained(page)
    assert "sub-03" in page and "SHA-256" in page
    cohort_out = tmp_path / "cohort.html"
    assert main(["report", "--cohort", "--registry", str(reg_path), "--out",
                 str(cohort_out)]) == 0
    assert "alsiron normative build" in capsys.readouterr().err
    assert main(["report", str(tmp_path / "sub-99"), "--registry", str(reg_path),
                 "--out", str(tmp_path / "x.html")]) != 0
