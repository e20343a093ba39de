"""The HTML report: content, escaping, self-containment, missing sections, and rendering in headless Chromium."""

from __future__ import annotations

import json
import math
import os
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
from study_results import NASTY, synthetic_results

from em_interp.errors import ReportError
from em_interp.report import SECTIONS, figures, load_results, plain, write_report

FIGURE_IDS = [s.div_id for s in SECTIONS]
CHROMIUM, CHROMEDRIVER = "/usr/bin/chromium", "/usr/bin/chromedriver"


@pytest.fixture
def results():
    return synthetic_results()


@pytest.fixture
def synthetic_report(tmp_path, results) -> Path:
    return write_report(results, tmp_path / "report.html")


# --- content ---------------------------------------------------------------------------------------
def test_every_figure_and_verdict_is_in_the_report(synthetic_report):
    html = synthetic_report.read_text()
    for div_id in FIGURE_IDS:
        assert f'id="{div_id}"' in html, div_id
    for word in ("CONFIRMED", "REFUTED", "UNCLEAR"):
        assert f">{word}</div>" in html
    for claim in ("efficiency", "stability", "reversion", "influence"):
        assert f'id="verdict-{claim}"' in html
    assert "95% t-interval [+0.09, +0.13], n=3 seeds" in html and "Narrowness gate passed" in html
    assert "[0.04, 0.17]" in html and "[0.61, 0.93]" in html  # the gate ratios' bootstrap intervals over seeds
    assert "antibiotics 2" in html and "finance 2" in html  # what each set holds, from the results
    assert "random direction" in html
    assert "tiny-llama" in html and "Timings" in html and "Generations" in html
    assert 'class="note"' not in html  # nothing skipped


def test_report_is_self_contained(synthetic_report):
    html = synthetic_report.read_text()
    assert html.count("<script type=\"text/javascript\">") == 2  # PlotlyConfig + plotly.js, once
    assert not re.search(r"<script[^>]+src=", html, re.I)
    assert not re.search(r"<link[^>]+stylesheet", html, re.I)
    assert not re.search(r"@import|url\(\s*['\"]?https?:", html.split("<script", 1)[0], re.I)
    assert html.count("Plotly.newPlot(") == len(FIGURE_IDS)


def test_generations_are_escaped(synthetic_report):
    html = synthetic_report.read_text()
    assert NASTY not in html
    assert "&lt;script&gt;alert(&#x27;x&#x27;)&lt;/script&gt; &amp; &lt;b&gt;bold&lt;/b&gt;" in html
    assert "a &lt; b" in html and "&quot;quoted&quot; &amp; &#x27;single&#x27;" in html


def test_missing_sections_and_none_values(tmp_path, results):
    for key in ("stability", "kl_vs_norm", "generations", "verdicts", "timings"):
        del results[key]
    results["efficiency"]["general"]["losses"][2] = None
    results["direction"]["loss_general_ablated"] = None
    results["contrastive"]["narrow"]["medical"]["ci_low"] = None
    results["training"]["general"]["losses"][0]["kl"] = float("nan")
    html = write_report(results, tmp_path / "r.html").read_text()
    assert html.count('class="note"') == 5
    assert 'id="fig-stability"' not in html and 'id="fig-kl-norm"' not in html
    for div_id in set(FIGURE_IDS) - {"fig-stability", "fig-kl-norm"}:
        assert f'id="{div_id}"' in html
    assert "NaN" not in re.sub(r"<script type=\"text/javascript\">.*?</script>", "", html, flags=re.S)


def test_malformed_section_becomes_a_note(tmp_path, results):
    results["pca"] = {"paths": 5}
    html = write_report(results, tmp_path / "r.html").read_text()
    assert "Could not draw this figure" in html
    assert 'id="fig-efficiency"' in html


def test_numpy_input_and_atomic_write(tmp_path, results):
    results["efficiency"]["general"]["losses"] = np.array(results["efficiency"]["general"]["losses"])
    results["cosine"]["general_narrow"] = np.float32(math.nan)
    path = write_report(results, tmp_path / "sub" / "report.html")
    assert path.is_file() and [p.name for p in path.parent.iterdir()] == ["report.html"]
    with pytest.raises(ReportError):
        write_report(["not", "a", "dict"], tmp_path / "bad.html")  # type: ignore[arg-type]
    assert not (tmp_path / "bad.html").exists()


def test_plain_converts_arrays_and_nan():
    assert plain({"a": np.arange(3), "b": (np.float64("nan"), 1.5), "c": np.int64(4)}) == {
        "a": [0, 1, 2], "b": [None, 1.5], "c": 4}


def test_load_results(tmp_path, results):
    (tmp_path / "results.json").write_text(json.dumps(results))
    assert load_results(tmp_path)["layer"] == 2
    assert load_results(tmp_path / "results.json")["layer"] == 2
    with pytest.raises(ReportError, match="not found"):
        load_results(tmp_path / "nope")
    (tmp_path / "bad.json").write_text('{"a": 1,\n oops}')
    with pytest.raises(ReportError, match="line 2"):
        load_results(tmp_path / "bad.json")


def test_each_figure_function_returns_traces(results):
    for s in SECTIONS:
        fig = s.figure(results)
        assert len(fig.data) > 0, s.key
    assert figures.color("general") != figures.color("narrow")


# --- browser -------------------------------------------------------------------------------------
def _browser_available() -> bool:
    return Path(CHROMIUM).exists() and Path(CHROMEDRIVER).exists()


def _install_browser() -> None:
    if _browser_available() or os.geteuid() != 0 or shutil.which("apt-get") is None:
        return
    import subprocess

    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    subprocess.run("apt-get update -qq && apt-get install -y -qq chromium chromium-driver", shell=True, env=env,
                   capture_output=True, timeout=900)


@pytest.fixture(scope="session")
def chromium_ready():
    """Chromium + chromedriver; installed with apt when missing. Skips outside CI only, fails in CI."""
    _install_browser()
    if not _browser_available():
        reason = f"headless Chromium not available ({CHROMIUM} / {CHROMEDRIVER}); run `make browser`"
        if os.environ.get("CI"):
            pytest.fail(reason)
        pytest.skip(reason)


@pytest.fixture
def browser(chromium_ready, tmp_path):
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    opts = webdriver.ChromeOptions()
    opts.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                "--disable-background-networking", "--disable-component-update", "--disable-sync", "--no-first-run",
                "--window-size=1280,2400", f"--user-data-dir={tmp_path / 'chromium-profile'}"):
        opts.add_argument(arg)
    opts.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=opts)
    try:
        yield driver
    finally:
        driver.quit()


def check_in_browser(driver, report: Path, shot: Path) -> None:
    """Open `report`, wait for every figure to render, check the JS log, and save a screenshot to `shot`."""
    from selenium.webdriver.support.ui import WebDriverWait

    driver.get(report.resolve().as_uri())
    html = report.read_text()
    ids = [i for i in FIGURE_IDS if f'id="{i}"' in html]
    assert ids, "no figures in the report"
    script = "return arguments[0].every(id => { const d = document.getElementById(id);"
    script += " return d && d.querySelector('.main-svg') && d.querySelector('.plot-container'); });"
    WebDriverWait(driver, 60).until(lambda d: d.execute_script(script, ids))
    assert driver.execute_script("return typeof window.Plotly") == "object"
    traces = driver.execute_script("return arguments[0].map(id => document.getElementById(id).data.length);", ids)
    assert all(n > 0 for n in traces), dict(zip(ids, traces, strict=True))
    severe = [e for e in driver.get_log("browser") if e.get("level") == "SEVERE"]
    assert not severe, severe
    driver.save_screenshot(str(shot))
    data = shot.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 20_000


@pytest.mark.slow
def test_synthetic_report_in_browser(browser, synthetic_report, tmp_path):
    check_in_browser(browser, synthetic_report, tmp_path / "synthetic.png")


@pytest.fixture
def demo_report(tmp_path) -> Path:
    """The report of a real `--fast` study run; EM_INTERP_DEMO_REPORT=path/report.html checks an existing one instead."""
    existing = os.environ.get("EM_INTERP_DEMO_REPORT")
    if existing:
        return Path(existing)
    from em_interp.study import run_study

    results = run_study(tmp_path / "demo", fast=True, device="cpu")
    assert set(results["verdicts"]) == {"efficiency", "stability", "reversion", "influence"}
    assert {v["verdict"] for v in results["verdicts"].values()} == {"PLUMBING CHECK"}
    assert (tmp_path / "demo" / "results.json").is_file()
    return tmp_path / "demo" / "report.html"


@pytest.mark.slow
def test_demo_fast_report_in_browser(demo_report, browser, tmp_path):  # demo_report first: no idle browser
    html = demo_report.read_text()
    assert 'class="note"' not in html, re.findall(r'<p class="note">(.*?)</p>', html)
    for div_id in FIGURE_IDS:
        assert f'id="{div_id}"' in html, div_id
    check_in_browser(browser, demo_report, tmp_path / "demo.png")


def test_study_record_line(tmp_path, results):
    from em_interp.study import append_record

    path = tmp_path / "deep" / "study.jsonl"
    append_record(results, path, "em-interp demo --seeds 3")
    append_record(results, path)
    lines = [json.loads(x) for x in path.read_text().splitlines()]
    assert len(lines) == 2 and lines[0]["command"] == "em-interp demo --seeds 3" and lines[1]["command"] is None
    assert {"device", "date", "command", "seeds", "wall_s", "gate", "verdicts"} <= set(lines[0])
    assert lines[0]["seeds"] == 3 and lines[0]["wall_s"] == 14.0 and lines[0]["gate"]["passed"] is True
    assert lines[0]["verdicts"]["efficiency"]["interval"] == [0.09, 0.13]
