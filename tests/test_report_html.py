"""`snakemake --report`: one HTML file holding every figure and table of a finished run, each with
its caption and in its category, built from the files on disk without re-running any job; each
table a page of its own (its HTML version, which the report shows), and no job parameter holding
the config or the run list."""

import base64
import html
import json
import re
import zipfile
from html.parser import HTMLParser

import pytest
import yaml

from conftest import REPO, needs_fashion_mnist
from decoupled.layout import FIGURE_FORMATS, FIGURE_NAMES, TABLE_FORMATS, TABLE_NAMES, figures_for, tables_for
from test_workflow import copy_repo, snakemake

# A phrase of each caption (workflow/report/{name}.rst), and where the report files it.
CAPTIONS = {
    "main": ("Tables", "Main table", "one row per method, one column per mode"),
    "summary": ("Tables", "Summary table", "one row per method × mode × K × variant"),
    "paper_vs_ours": ("Tables", "Reproduction", "each number the paper published"),
    "claims": ("Tables", "Claims", "each claim of the paper this experiment reproduces"),
    "test_acc_vs_epoch": ("Figures", "Learning curves", "after each epoch (x axis)"),
    "acc_vs_simulated_time": ("Figures", "Learning curves", "training time on the <em>simulated parallel</em> clock"),
    "acc_vs_wall_time": ("Figures", "Learning curves", "training time on the <em>wall clock</em>"),
    "layerwise_acc": ("Figures", "Learning curves", "vs the module's depth (x axis"),
    "acc_vs_slowdown": ("Figures", "Sweeps", "vs the slowdown factor S of one module"),
    "acc_vs_buffer_size": ("Figures", "Sweeps", "vs the buffer size between two modules"),
    "acc_vs_K": ("Figures", "Sweeps", "vs the number of modules K"),
    "acc_vs_bits": ("Figures", "Sweeps", "against the bits sent per activation"),
    "acc_vs_worker_macs": ("Figures", "Sweeps", "against the largest forward compute of one worker"),
}
MIME = {"png": "image/png", "pdf": "application/pdf", "csv": "text/csv", "md": "text/markdown", "tex": "text/x-tex", "html": "text/html"}
# The report opens a text/html result in a frame of the page's width: a table's HTML version is
# what it shows; the other formats are downloads.
FORMATS = {"html": "HTML", "csv": "raw CSV", "md": "Markdown", "tex": "LaTeX", "png": "PNG", "pdf": "vector PDF"}


def test_every_table_and_figure_has_a_caption():
    assert set(CAPTIONS) == set(TABLE_NAMES) | set(FIGURE_NAMES)
    for name in [*CAPTIONS, "workflow"]:
        assert (REPO / f"workflow/report/{name}.rst").is_file(), name


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    """A finished run of a tiny grid (backprop, DGL and GN-DGL with 1 or 2 groups, each with floats or
    4-bit codes between modules; sync, one seed, one epoch): about a minute."""
    workdir = copy_repo(tmp_path_factory.mktemp("report_html") / "repo")
    cfg = yaml.safe_load((REPO / "config/smoke.yaml").read_text())
    cfg["experiment"] = "report-html-test"
    cfg["grid"].update(methods=["backprop", "dgl", "gn_dgl"], modes=["sync"], seeds=[0], groups=[1, 2], quantize=[None, {"bits": 4, "dim": 4}])
    cfg["overrides"].pop("gn_dgl")
    cfg["train"]["epochs"] = 1
    cfg["report"] = {"target_accuracy": 0.42,  # shows in the captions, through Jinja
                     "claims": [{"claim": "DGL is about as accurate as backprop", "source": "a paper", "a": {"method": "dgl"},
                                 "b": {"method": "backprop"}, "margin": 1}]}
    configfile = workdir / "config/report_html.yaml"
    configfile.write_text(yaml.safe_dump(cfg))
    result = snakemake(workdir, configfile=configfile)
    assert result.returncode == 0, result.stderr[-4000:]
    return workdir, configfile


def _script_var(page: str, script_id: str, name: str):
    """A JSON value the report embeds as `<script id="...">var name = {...};</script>`."""
    match = re.search(rf'<script id="{script_id}">\s*var {name} = (.*?);\s*</script>', page, re.S)
    assert match, f"no {name} in the report"
    return json.loads(match.group(1))


def _mtimes(workdir):
    return {p: p.stat().st_mtime_ns for p in (workdir / "results").rglob("*") if p.is_file()}


@needs_fashion_mnist
def test_html_report_holds_every_result_with_its_caption(finished):
    workdir, configfile = finished
    before = _mtimes(workdir)
    out = workdir / "results/report.html"
    result = snakemake(workdir, "--report", str(out), configfile=configfile)
    log = result.stdout + result.stderr
    assert result.returncode == 0, log[-4000:]
    assert "Report created." in log

    # Building the report re-ran nothing: no job started and no file under results/ changed.
    assert "rule train" not in log and "Execute" not in log, log[-4000:]
    after = _mtimes(workdir)
    assert after.pop(out) and after == before
    assert any(p.name == "metrics.json" for p in before)

    page = out.read_text()
    results = _script_var(page, "results", "results")
    categories = _script_var(page, "categories", "categories")
    # a claim but no published numbers in this config: the claims table, no reproduction table
    expected = {f"results/tables/{t.name}.{e}" for t in tables_for(yaml.safe_load(configfile.read_text())["report"]) for e in TABLE_FORMATS}
    assert "results/tables/claims.html" in expected and "results/tables/paper_vs_ours.html" not in expected
    expected |= {f"results/figures/{f.name}.{e}" for f in figures_for({"groups", "quantize"}, {"simulated parallel"}) for e in FIGURE_FORMATS}  # the sweeps of these two only
    assert set(results) == expected

    filed = {path: (cat, sub) for cat, subs in categories.items() for sub, paths in subs.items() for path in paths}
    assert set(filed) == expected
    for path, entry in results.items():
        name, ext = path.rsplit("/", 1)[1].split(".")
        category, subcategory, phrase = CAPTIONS[name]
        assert filed[path] == (category, subcategory), path
        assert entry["name"] == f"{name}.{ext}" and entry["mime_type"] == MIME[ext]
        # embedded, byte for byte
        assert base64.b64decode(entry["data_uri"].split("base64,", 1)[1]) == (workdir / path).read_bytes(), path
        assert entry["labels"]["format"] == FORMATS[ext]
        caption = " ".join(html.unescape(entry["caption"]).split())
        assert phrase in caption, (path, caption)
        assert "{{" not in caption and "{%" not in caption, caption  # Jinja rendered
        if name in ("main", "summary", "acc_vs_simulated_time"):
            assert "42 %" in caption  # report.target_accuracy from the config
        if name in ("main", "summary"):  # the caption leads to the table; it holds none of it
            assert "format <em>HTML</em> (the eye icon) shows it with every column" in caption
            assert "| backprop" not in caption and "<table" not in caption
        if name == "acc_vs_simulated_time":  # the default engine's clock
            assert "It is not the wall clock" in caption

    description = html.unescape(_script_var(page, "workflow-desc", "workflow_desc"))
    assert "report-html-test" in description and "backprop, dgl, gn_dgl" in description
    assert "app.showCategory('Figures')" in description and "app.showCategory('Tables')" in description


class _Table(HTMLParser):
    """The header and body cells of a table's HTML page."""

    def __init__(self, page: str):
        super().__init__()
        self.headers, self.cells, self._into = [], [], None
        self.feed(page)

    def handle_starttag(self, tag, attrs):
        self._into = {"th": self.headers, "td": self.cells}.get(tag)

    def handle_endtag(self, tag):
        self._into = None

    def handle_data(self, data):
        if self._into is not None:
            self._into.append(data)


@needs_fashion_mnist
def test_the_report_shows_each_table_as_a_page_with_every_column(finished):
    """The HTML version of each table is a text/html result, which the report opens in a frame
    as wide as its page: a real <table>, its header every column of the Markdown version's."""
    workdir, configfile = finished
    out = workdir / "results/report_tables.html"
    assert snakemake(workdir, "--report", str(out), configfile=configfile).returncode == 0
    results = _script_var(out.read_text(), "results", "results")
    for table in tables_for({}):
        entry = results[f"results/tables/{table.name}.html"]
        assert entry["mime_type"] == "text/html" and entry["labels"] == {"table": table.title, "format": "HTML"}
        page = base64.b64decode(entry["data_uri"].split("base64,", 1)[1]).decode()
        md_header = (workdir / f"results/tables/{table.name}.md").read_text().splitlines()[0]
        parsed = _Table(page)
        assert parsed.headers == [c.strip() for c in md_header.strip("|").split("|")]
        assert "backprop" in parsed.cells and "gn_dgl" in parsed.cells
    # the readable version first in each table's list (the report sorts by the format label)
    assert min((FORMATS[ext] for ext in TABLE_FORMATS), key=str.casefold) == "HTML"


@needs_fashion_mnist
def test_no_job_parameter_holds_the_config_or_the_runs_and_a_config_change_reruns_the_report(finished):
    """The report prints every job parameter under each of its results: the report rule's are
    short (the config as a digest, the runs as its inputs), and a config change still re-runs
    the report, and nothing else."""
    workdir, configfile = finished
    out = workdir / "results/report_params.html"
    assert snakemake(workdir, "--report", str(out), configfile=configfile).returncode == 0
    results = _script_var(out.read_text(), "results", "results")
    for path, entry in results.items():
        params = entry["job_properties"]["params"]
        assert len(params) < 300, (path, params)
        assert "report-html-test" not in params and "grid" not in params and "/runs/" not in params, (path, params)
        assert re.search(r"config_digest=[0-9a-f]{16}\b", params), (path, params)

    original = configfile.read_text()
    cfg = yaml.safe_load(original)
    cfg["report"]["reduced_run"] = True  # read by the report alone
    configfile.write_text(yaml.safe_dump(cfg))
    try:
        dry = snakemake(workdir, "--dry-run", configfile=configfile)
    finally:
        configfile.write_text(original)
    planned = dry.stdout + dry.stderr
    assert dry.returncode == 0, planned[-3000:]
    assert set(re.findall(r"^(?:local)?rule (\w+):", planned, re.M)) == {"report", "all"}, planned[-3000:]


@needs_fashion_mnist
def test_zip_report(finished):
    workdir, configfile = finished
    out = workdir / "results/report.zip"
    result = snakemake(workdir, "--report", str(out), configfile=configfile)
    assert result.returncode == 0, result.stderr[-4000:]
    names = zipfile.ZipFile(out).namelist()
    assert "report/report.html" in names
    for figure in figures_for(set(), {"simulated parallel"}):
        assert any(n.endswith(f"/{figure.name}.png") for n in names), figure.name
