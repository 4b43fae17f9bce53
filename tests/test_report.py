"""The HTML report: self-contained, escaped, explained, and rendered by a real headless Chromium without errors."""

from __future__ import annotations

import html.parser
import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

import vaelab.evaluate as evaluate
from tiny import bars, tiny_run
from vaelab.cli import main
from vaelab.diagnostics import diagnostics
from vaelab.plots import draw_pictures
from vaelab.report import EXPLAIN, as_json, render_report, write_report
from vaelab.train import load_run

CHROMIUM = Path("/usr/bin/chromium")
CHROMEDRIVER = Path("/usr/bin/chromedriver")
EVIL = "<script>alert('config')</script> & \"quoted\""


def train_tiny(run_dir: Path, dataset: str, *, latent_dim: int = 2, data_dir: str | None = None):
    """30 steps of a tiny MLP VAE on the bars; returns the run loaded back from its directory."""
    return tiny_run(run_dir, latent_dim=latent_dim, steps=30, examples=200, dataset=dataset, data_dir=data_dir)


def run_diagnostics(model, x: torch.Tensor) -> dict:
    """The full diagnostics as the command line writes them (small k: a test, not a result)."""
    return as_json(diagnostics(model, x, k=100, slow=False, progress=False))


@pytest.fixture(scope="module")
def report(tmp_path_factory, one_thread):
    """A report of a tiny run whose config holds markup in string fields: (path, html text, pictures)."""
    root = tmp_path_factory.mktemp("report")
    run = train_tiny(root / "run", EVIL, data_dir="</td><b>dir</b>")
    x, labels = bars(40, seed=1)
    torch.manual_seed(0)
    diagnostics = run_diagnostics(run.model, x)
    pictures = draw_pictures(
        run.model, x, root / "run" / "pictures", labels=labels, metrics=run.metrics, diagnostics=diagnostics
    )
    path = write_report(run, diagnostics, root / "out" / "report.html", pictures=pictures)
    return path, path.read_text(encoding="utf-8"), pictures


class _Structure(html.parser.HTMLParser):
    """Records tag nesting errors, <img> attributes, resource URLs and ids of a document."""

    VOID = frozenset(
        {"area", "base", "br", "col", "embed", "hr", "img", "input", "link", "meta", "source", "track", "wbr"}
    )

    def __init__(self):
        super().__init__(convert_charrefs=True)
        self.stack: list[str] = []
        self.errors: list[str] = []
        self.images: list[dict] = []
        self.urls: list[str] = []
        self.ids: list[str] = []
        self.doctype = None
        self.tags: list[tuple[str, dict]] = []

    def handle_decl(self, decl):
        self.doctype = decl

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        self.tags.append((tag, attrs))
        self.urls += [attrs[a] for a in ("src", "href") if attrs.get(a)]
        if "id" in attrs:
            self.ids.append(attrs["id"])
        if tag == "img":
            self.images.append(attrs)
        if tag not in self.VOID:
            self.stack.append(tag)

    def handle_endtag(self, tag):
        if tag in self.VOID:
            return
        if not self.stack or self.stack[-1] != tag:
            self.errors.append(f"</{tag}> closes <{self.stack[-1] if self.stack else None}>")
        else:
            self.stack.pop()


def structure(text: str) -> _Structure:
    parser = _Structure()
    parser.feed(text)
    parser.close()
    return parser


def test_report_is_valid_self_contained_html5(report):
    path, text, pictures = report
    doc = structure(text)
    assert doc.doctype is not None and doc.doctype.lower() == "doctype html"
    assert not doc.errors and not doc.stack, (doc.errors, doc.stack)
    assert ("html", {"lang": "en"}) in doc.tags
    assert ("meta", {"charset": "utf-8"}) in doc.tags
    assert re.search(r"<title>[^<]+</title>", text)
    assert len(doc.ids) == len(set(doc.ids)), "duplicate ids"
    # self-contained: every resource is inline, nothing points at a network or another file
    assert not re.search(r"https?://", text)
    assert "<script" not in text.lower() and '<link rel="stylesheet"' not in text
    for url in doc.urls:
        assert url.startswith(("data:", "#")), url
    # every picture embedded once, as a PNG data URI with alt text
    assert len(doc.images) == len(pictures) >= 9
    for img in doc.images:
        assert img["src"].startswith("data:image/png;base64,")
        assert img.get("alt", "").strip()
    # written atomically: no temporary file left beside it
    assert [p.name for p in path.parent.iterdir()] == ["report.html"]


def test_config_values_are_escaped(report):
    _, text, _ = report
    assert "<script>alert" not in text and "<b>dir</b>" not in text
    assert "&lt;script&gt;alert(&#x27;config&#x27;)&lt;/script&gt; &amp; &quot;quoted&quot;" in text
    assert "&lt;/td&gt;&lt;b&gt;dir&lt;/b&gt;" in text


def test_report_explains_its_numbers(report):
    _, text, _ = report
    for phrase in (
        "0 would mean the encoder is exact",
        "Effective sample size",
        "Pareto k̂",
        "min(1 − 1/log10 k, 0.7)",
        "A latent dimension is active",
        "The amortization gap",
        "The approximation gap",
        "Why naive Monte Carlo fails",
        "IWAE_k = E[log (1/k) Σ w_i]",
    ):
        assert phrase in text, phrase
    for key in ("posterior_gap", "ess", "pareto_k", "active_units", "estimator_study"):
        assert EXPLAIN[key] in text or EXPLAIN[key].replace("'", "&#x27;") in text


def test_missing_diagnostics_say_not_computed(report, tmp_path):
    path, _, _ = report
    run = load_run(path.parent.parent / "run")
    x, _ = bars(20, seed=2)
    basic = evaluate.evaluate_model(run.model, x, k=20, iwae_ks=(1, 10), progress=False)
    text = render_report(run, basic)  # the standard evaluation only, no pictures
    assert text.count("not computed") >= 4  # approximation and amortization gaps, ELBO-form variances, study, curve
    assert "<img" not in text
    assert not structure(text).errors
    empty = render_report(run, {})
    assert "not computed" in empty and not structure(empty).errors


def test_a_model_of_eight_bit_images_leads_with_bits_per_dim_too(report):
    path, _, _ = report
    run = load_run(path.parent.parent / "run")
    log_px = {"mean": -2000.0, "sem": 3.0, "k": 10}
    text = render_report(run, {"log_px": log_px, "bits_per_dim": {"mean": 3.6804, "sem": 0.0055}})
    assert "bits per dimension" in text and "3.6804 ± 0.0055" in text and not structure(text).errors
    assert "bits per dimension" not in render_report(run, {"log_px": log_px})  # nats only for other models


@pytest.mark.skipif(
    not (CHROMIUM.exists() and CHROMEDRIVER.exists()),
    reason=f"needs Chromium and its driver ({CHROMIUM}, {CHROMEDRIVER}: Debian packages chromium, chromium-driver)",
)
def test_report_renders_in_headless_chromium(report, tmp_path, monkeypatch):
    webdriver = pytest.importorskip("selenium.webdriver", reason="needs selenium (pip install selenium)")
    from selenium.webdriver.chrome.service import Service

    monkeypatch.setenv("SE_OFFLINE", "true")  # selenium-manager must never try to download a browser or driver
    path, _, pictures = report
    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", f"--user-data-dir={tmp_path / 'profile'}"):
        options.add_argument(flag)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(service=Service(str(CHROMEDRIVER)), options=options)
    try:
        driver.set_page_load_timeout(60)
        driver.get(path.resolve().as_uri())
        state = driver.execute_script(
            "return {ready: document.readyState, title: document.title,"
            " images: Array.from(document.images).map(i => [i.complete, i.naturalWidth, i.naturalHeight, i.alt])};"
        )
        logs = driver.get_log("browser")
    finally:
        driver.quit()
    assert state["ready"] == "complete"
    assert state["title"].startswith("vaelab report")
    assert len(state["images"]) == len(pictures)
    for complete, width, height, alt in state["images"]:
        assert complete and width > 0 and height > 0, (alt, width, height)
    errors = [entry for entry in logs if entry.get("level") == "SEVERE"]
    assert not errors, errors


# --- the command line -------------------------------------------------------------------------------------------------
def test_cli_report(tmp_path, capsys, one_thread):
    x, y = bars(200)
    x_test, y_test = bars(40, seed=3)
    data = tmp_path / "bars.npz"
    np.savez(data, x=x.numpy(), y=y.numpy(), x_test=x_test.numpy(), y_test=y_test.numpy())
    run_dir = tmp_path / "run"
    train_tiny(run_dir, str(data), latent_dim=3)
    code = main(["report", str(run_dir), "--k", "50", "--examples", "30", "--fast", "--no-progress"])
    out = capsys.readouterr().out
    assert code == 0, out
    report = run_dir / "report.html"
    assert f"report written to {report}" in out
    diagnostics = json.loads((run_dir / "diagnostics_test.json").read_text())
    assert diagnostics["examples"] == 30 and diagnostics["log_px"]["k"] == 50
    pictures = sorted(p.stem for p in (run_dir / "pictures").glob("*.png"))
    assert {"reconstructions", "samples", "traversals", "latents", "training_curves", "kl_per_dim"} <= set(pictures)
    assert "manifold" not in pictures  # d = 3
    text = report.read_text()
    assert text.count("data:image/png;base64,") == len(pictures)
    # a chosen output path
    code = main(["report", str(run_dir), "--k", "20", "--examples", "10", "--fast", "--no-progress", "--out",
                 str(tmp_path / "elsewhere" / "r.html"), "--json", str(tmp_path / "elsewhere" / "d.json")])  # fmt: skip
    assert code == 0 and (tmp_path / "elsewhere" / "r.html").is_file() and (tmp_path / "elsewhere" / "d.json").is_file()
    shutil.rmtree(run_dir)


@pytest.mark.parametrize(
    "argv, message",
    [
        (["report", "/nonexistent/run"], "is not a directory"),
        (["report", ".", "--k", "0"], "--k must be >= 1"),
    ],
)
def test_cli_report_user_errors(argv, message, capsys):
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("vaelab report: error:") and message in err and "\n" not in err


def test_a_classifiers_report_leads_with_its_error_and_shows_calibration(report, tmp_path):
    from vaelab.evaluate import classification_metrics
    from vaelab.plots import confusion_figure, reliability_figure, save_figure

    path, _, _ = report
    run = load_run(path.parent.parent / "run")
    g = torch.Generator().manual_seed(5)
    labels = torch.randint(0, 3, (50,), generator=g)
    log_probs = (torch.randn(50, 3, generator=g, dtype=torch.float64) + 2 * torch.eye(3)[labels]).log_softmax(-1)
    metrics = classification_metrics(log_probs, labels)
    pictures = {
        "reliability": save_figure(reliability_figure(metrics["reliability"]), tmp_path / "r.png"),
        "confusion": save_figure(confusion_figure(metrics["confusion"]), tmp_path / "c.png"),
    }
    text = render_report(run, {"classification": metrics, "examples": 50}, pictures=pictures)
    parsed = structure(text)
    assert not parsed.errors and "classification" in parsed.ids
    summary = text[text.index('id="summary"') : text.index('id="config"')]
    assert f"{100 * metrics['error']:.2f} %" in summary  # the error leads; no log p(x) row is invented
    section = text[text.index('id="classification"') : text.index('id="json"')]
    assert f"{100 * metrics['accuracy']:.2f} %" in section and f"{metrics['ece']:.4f}" in section
    assert section.count("<img") == 2 and "Reliability diagram" in section and "Confusion matrix" in section
    assert 'id="other"' not in text  # the classification numbers have their section, not the "other" listing
