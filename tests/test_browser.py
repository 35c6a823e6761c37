"""A real headless Chromium opens the live dashboard and the offline report, as a person would.

Needs the Debian packages ``chromium`` and ``chromium-driver`` and the pip package ``selenium``;
skipped with the reason when any is missing. Screenshots land in pytest's tmp_path.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from catdog_hpo.view.report import write_report
from catdog_hpo.search.storage import open_storage
from study_factory import demo_store, make_study
from test_dashboard import get_json, start_dashboard, stop

CHROMIUM = next((p for p in map(shutil.which, ("chromium", "chromium-browser")) if p), None)
CHROMEDRIVER = shutil.which("chromedriver")
try:
    import selenium  # noqa: F401

    HAVE_SELENIUM = True
except ImportError:
    HAVE_SELENIUM = False

pytestmark = [
    pytest.mark.browser,
    pytest.mark.skipif(CHROMIUM is None, reason="Chromium is not installed (apt-get install chromium)"),
    pytest.mark.skipif(CHROMEDRIVER is None, reason="chromedriver is not installed (apt-get install chromium-driver)"),
    pytest.mark.skipif(not HAVE_SELENIUM, reason="selenium is not installed (pip install selenium)"),
]

WAIT_S = 30  # generous: two CPUs, other tests running beside us
# The flags a sandboxed, offline CI machine needs; every run gets a fresh profile folder.
CHROMIUM_FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync",
                  "--window-size=1400,1000")


@pytest.fixture()
def browser(tmp_path: Path):
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in CHROMIUM_FLAGS:
        options.add_argument(flag)
    options.add_argument(f"--user-data-dir={tmp_path / 'chromium-profile'}")
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    # An explicit driver path: Selenium Manager would otherwise try to download one.
    driver = webdriver.Chrome(options=options, service=Service(executable_path=CHROMEDRIVER))
    try:
        yield driver
    finally:
        driver.quit()


def wait_for(driver, condition, what: str):
    from selenium.common.exceptions import TimeoutException
    from selenium.webdriver.support.ui import WebDriverWait

    try:
        return WebDriverWait(driver, WAIT_S, poll_frequency=0.2).until(lambda d: condition(d))
    except TimeoutException:
        driver.save_screenshot(str(Path(driver.capabilities["chrome"]["userDataDir"]).parent / "timeout.png"))
        raise AssertionError(f"timed out waiting for {what}; page text: {body_text(driver)[:500]!r}") from None


def body_text(driver) -> str:
    from selenium.webdriver.common.by import By

    return driver.find_element(By.TAG_NAME, "body").text


def test_dashboard_shows_the_study_its_trials_and_charts(browser, tmp_path: Path) -> None:
    url = demo_store(tmp_path)
    proc, base, _ = start_dashboard(tmp_path, url)
    try:
        study_id = get_json(f"{base}/api/studies")["study_summaries"][0]["study_id"]

        browser.get(f"{base}/dashboard")
        wait_for(browser, lambda d: "demo" in body_text(d), "the study list")

        browser.get(f"{base}/dashboard/studies/{study_id}/trials")
        wait_for(browser, lambda d: "11 Trials" in body_text(d), "the trial count")
        # The best trial is selected first: its training-curve SVG artifact is shown as an image.
        wait_for(browser, lambda d: d.execute_script(
            "return [...document.images].some(i => i.src.includes('/artifacts/') && i.naturalWidth > 0)"),
            "the training-curve artifact image")
        browser.save_screenshot(str(tmp_path / "dashboard-trials.png"))

        browser.get(f"{base}/dashboard/studies/{study_id}")
        wait_for(browser, lambda d: "demo" in body_text(d) and "History" in body_text(d), "the study page")
        n_charts = wait_for(browser, lambda d: d.execute_script(
            "return document.querySelectorAll('.js-plotly-plot svg.main-svg').length"), "a plotly chart")
        assert n_charts >= 1
        browser.save_screenshot(str(tmp_path / "dashboard-study.png"))
    finally:
        stop(proc)
    assert (tmp_path / "dashboard-study.png").stat().st_size > 10_000


def test_report_renders_every_chart_offline(browser, tmp_path: Path) -> None:
    storage = open_storage(f"sqlite:///{tmp_path}/r.db")
    make_study(storage, "demo")
    make_study(storage, "random", sampler="random", n_complete=4, n_pruned=1, n_failed=0, n_rejected=0, seed=5)
    files = write_report(storage, "demo", compare=["random"], out_dir=tmp_path / "report")

    browser.get(files.html.resolve().as_uri())
    plot_sections = ["history", "intermediate", "parallel", "importance", "slice", "compare"]
    script = ("return arguments[0].filter(id => !document.querySelector("
              "'#' + id + ' .plotly .main-svg')).length")
    wait_for(browser, lambda d: d.execute_script(script, plot_sections) == 0, "a rendered chart in every section")
    n_svg = browser.execute_script("return document.querySelectorAll('.plotly .main-svg').length")
    assert n_svg >= len(plot_sections) + 1  # the comparison section has two charts
    # Plotted data, not empty axes: the intermediate-values chart drew one line per trial curve.
    n_lines = browser.execute_script("return document.querySelectorAll('#intermediate .scatterlayer .trace').length")
    assert n_lines == 10  # 6 complete + 3 pruned + the failed trial's first epoch; not the rejected one
    assert "Top 10 trials" in body_text(browser)
    severe = [e for e in browser.get_log("browser") if e["level"] == "SEVERE"]
    assert not severe, severe
    browser.set_window_size(1400, 4600)
    browser.save_screenshot(str(tmp_path / "report.png"))
    assert (tmp_path / "report.png").stat().st_size > 10_000


def test_report_renders_the_pareto_front(browser, tmp_path: Path) -> None:
    from test_pareto import make_mo_study

    storage = open_storage(f"sqlite:///{tmp_path}/mo.db")
    make_mo_study(storage, "mo")
    files = write_report(storage, "mo", out_dir=tmp_path / "report")

    browser.get(files.html.resolve().as_uri())
    wait_for(browser, lambda d: d.execute_script("return !!document.querySelector('#pareto .plotly .main-svg')"),
             "the Pareto front chart")
    # Two traces (other trials, the front), with one marker per trial: 3 on the front, 3 off it.
    points = browser.execute_script(
        "return [...document.querySelectorAll('#pareto .scatterlayer .trace')].map(t => t.querySelectorAll('.point').length)")
    assert sorted(points) == [3, 3], points
    rows = browser.execute_script("return document.querySelectorAll('#tradeoff tbody tr').length")
    assert rows == 3
    n_history = browser.execute_script("return document.querySelectorAll('#objective-history .plotly .main-svg').length")
    assert n_history >= 2  # one chart per objective
    severe = [e for e in browser.get_log("browser") if e["level"] == "SEVERE"]
    assert not severe, severe
    browser.save_screenshot(str(tmp_path / "pareto.png"))
    assert (tmp_path / "pareto.png").stat().st_size > 10_000
