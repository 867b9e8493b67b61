"""``spai evaluate``'s paired and pooled protocols, bootstrap intervals, calibrated thresholds, perturbation sweeps and
the HTML report, on score tables whose answers scikit-learn or a hand count gives."""
from __future__ import annotations

import base64
import html.parser
import json
import math

import numpy as np
import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq
import pytest
from sklearn.metrics import average_precision_score, roc_auc_score

from pipelines.evaluate.protocol import evaluate
from pipelines.evaluate.render import sections
from pipelines.evaluate.report import write_report
from spai_cli.main import main as cli

REAL_SOURCES = {"coco": (30, 2.0), "raise": (20, 3.0), "lsun": (12, 4.5)}  # images, beta's a: harder reals score higher
FAKES = {"gan": (18, 4.0), "sd": (25, 6.0)}
PNG = b"\x89PNG\r\n\x1a\n"


def sourced_table(real_sources: dict = REAL_SOURCES, seed: int = 0, **columns: list) -> pa.Table:
    """Reals from several sources and fakes of two generators, scores from Beta(a, 4) (a per source or generator)."""
    rng = np.random.default_rng(seed)
    rows = [{"label": 0, "generator": "real", "source": s, "score": float(x)}
            for s, (n, a) in real_sources.items() for x in rng.beta(a, 4, n)]
    rows += [{"label": 1, "generator": g, "source": "synthetic", "score": float(x)}
             for g, (n, a) in FAKES.items() for x in rng.beta(a, 4, n)]
    table = pa.Table.from_pylist(rows)
    for name, values in columns.items():
        table = table.append_column(name, pa.array(values))
    return table


def rows_of(report, run: str | None = None) -> dict[str, dict]:
    return {r["generator"]: r for r in report.rows if run is None or r["run"] == run}


def scores_of(table: pa.Table, **where: object) -> np.ndarray:
    rows = table.to_pylist()
    return np.array([r["score"] for r in rows if all(r[k] == v for k, v in where.items())])


def sk(metric, fakes: np.ndarray, reals: np.ndarray) -> float:
    return float(metric(np.r_[np.ones(fakes.size), np.zeros(reals.size)], np.r_[fakes, reals]))


def test_paired_means_equal_scikit_learns_per_pair_values_averaged():
    table = sourced_table()
    report = evaluate(table)  # three real sources: paired by default
    assert report.protocol == "paired" and report.markdown().startswith("Protocol: paired.")
    rows = rows_of(report)
    for generator in FAKES:
        fakes = scores_of(table, label=1, generator=generator)
        per_pair = {s: sk(roc_auc_score, fakes, scores_of(table, label=0, source=s)) for s in REAL_SOURCES}
        assert rows[generator]["auc"] == pytest.approx(np.mean(list(per_pair.values())), abs=1e-12)
        ap = np.mean([sk(average_precision_score, fakes, scores_of(table, label=0, source=s)) for s in REAL_SOURCES])
        assert rows[generator]["ap"] == pytest.approx(ap, abs=1e-12)
        pairs = {p["real_set"]: p for p in report.pairs if p["generator"] == generator}
        assert {s: p["auc"] for s, p in pairs.items()} == pytest.approx(per_pair, abs=1e-12)
        assert pairs["lsun"]["n_real"] == 12 and pairs["lsun"]["n_fake"] == FAKES[generator][0]
    # the reals' accuracy is the mean of each source's true-negative rate
    tnr = np.mean([np.mean(scores_of(table, label=0, source=s) <= 0.5) for s in REAL_SOURCES])
    assert rows["real"]["accuracy"] == pytest.approx(tnr)
    assert rows["mean"]["auc"] == pytest.approx((rows["gan"]["auc"] + rows["sd"]["auc"]) / 2)
    pooled = rows_of(evaluate(table, protocol="pooled", bootstrap=0))
    reals = scores_of(table, label=0)
    assert pooled["sd"]["auc"] == pytest.approx(sk(roc_auc_score, scores_of(table, generator="sd"), reals))
    assert pooled["sd"]["auc"] != pytest.approx(rows["sd"]["auc"], abs=1e-3)  # the sources differ: so do the means


def test_pooled_is_todays_protocol_and_one_source_gives_the_same_numbers_under_both():
    one = sourced_table({"coco": (40, 2.5)})
    auto, paired = evaluate(one), evaluate(one, protocol="paired")
    assert auto.protocol == "pooled" and auto.pairs == [] and paired.protocol == "paired"
    assert len(paired.pairs) == 4  # gan, sd, real, overall against coco
    for a, b in zip(auto.rows, paired.rows, strict=True):
        assert a.keys() == b.keys()
        for key, value in a.items():
            assert value == b[key] or (isinstance(value, float) and math.isnan(value) and math.isnan(b[key])), key
    assert "Protocol: pooled. Each generator's fakes against all the real images (per run: table #0: 40)" in \
        auto.markdown()


def test_bootstrap_intervals_are_seeded_and_hold_the_point_estimate():
    table = sourced_table()
    first, again = evaluate(table, bootstrap=300, seed=7), evaluate(table, bootstrap=300, seed=7)
    other = evaluate(table, bootstrap=300, seed=8)
    for generator in ("gan", "sd", "overall"):
        row = rows_of(first)[generator]
        assert row["auc_lo"] < row["auc"] < row["auc_hi"] and row["ap_lo"] < row["ap"] < row["ap_hi"]
        assert [row[k] for k in ("auc_lo", "auc_hi", "ap_lo", "ap_hi")] == [
            rows_of(again)[generator][k] for k in ("auc_lo", "auc_hi", "ap_lo", "ap_hi")]
        assert row["auc_lo"] != rows_of(other)[generator]["auc_lo"]
    assert 0.02 < rows_of(first)["sd"]["auc_hi"] - rows_of(first)["sd"]["auc_lo"] < 0.4  # a few dozen images each
    # a row's interval does not move when another table joins the evaluation
    alone = evaluate({"a.parquet": table}, bootstrap=300, seed=7)
    joined = evaluate({"a.parquet": table, "b.parquet": sourced_table(seed=1)}, bootstrap=300, seed=7)
    assert rows_of(joined, "a.parquet")["sd"]["auc_lo"] == rows_of(alone, "a.parquet")["sd"]["auc_lo"]
    none = rows_of(evaluate(table, bootstrap=0))["sd"]
    assert math.isnan(none["auc_lo"]) and "No bootstrap intervals" in evaluate(table, bootstrap=0).markdown()


def calibrated_table() -> pa.Table:
    """Four reals and four fakes scored with weights calibrated to 0.3: a fake iff score > 0.3."""
    scores = [0.1, 0.2, 0.35, 0.6, 0.25, 0.4, 0.7, 0.9]
    return pa.table({"label": [0] * 4 + [1] * 4, "generator": ["real"] * 4 + ["sd"] * 4, "score": scores,
                     "threshold": [0.3] * 8, "predicted": pa.array([int(s > 0.3) for s in scores], pa.int8())})


def test_accuracy_at_the_calibrated_threshold_is_reported_beside_the_fixed_one():
    report = evaluate(calibrated_table())
    rows = rows_of(report)
    # at 0.5: reals 3/4 right, fakes 2/4; at 0.3: reals 2/4 (0.35, 0.6 called fake), fakes 3/4
    assert (rows["sd"]["accuracy"], rows["sd"]["cal_accuracy"]) == (5 / 8, 5 / 8)
    assert (rows["real"]["accuracy"], rows["real"]["cal_accuracy"]) == (0.75, 0.5)
    assert rows["sd"]["cal_balanced_accuracy"] == pytest.approx((0.5 + 0.75) / 2)
    text = report.markdown()
    assert "table #0: also at the calibrated threshold of its checkpoint (Acc@cal): 0.3000." in text
    assert "| Acc@0.5 | bAcc@0.5 | Acc@cal | bAcc@cal |" in text
    plain = evaluate(calibrated_table().drop_columns(["threshold", "predicted"]))
    assert "cal_accuracy" not in plain.rows[0] and "Acc@cal" not in plain.markdown()


SETTINGS = [("none", "none", None), ("jpeg=90", "jpeg", 90.0), ("jpeg=50", "jpeg", 50.0), ("blur=3", "blur", 3.0),
            ("filter=clarendon", "filter", None)]


def sweep_table() -> pa.Table:
    """The reals and fakes of one table under each setting; sd's fakes lose ground as the perturbation grows."""
    base = sourced_table({"coco": (30, 2.0)}).to_pylist()
    rows = []
    for i, (label, kind, strength) in enumerate(SETTINGS):
        for r in base:
            shift = -0.1 * i if r["generator"] == "sd" else 0.0
            rows.append({**r, "score": min(max(r["score"] + shift, 0.0), 1.0), "variant": label,
                         "perturbation": kind, "strength": strength})
    options = json.dumps({"precision": "fp32", "perturb": "jpeg=90,50 blur=3 filter=clarendon"})
    return pa.Table.from_pylist([{**r, "options": options} for r in rows])


def test_a_sweep_is_one_run_per_setting_with_a_table_5_layout():
    table = sweep_table()
    report = evaluate(table, bootstrap=0)
    assert report.runs == [label for label, _, _ in SETTINGS]  # none first, then by perturbation as they appear
    reals = scores_of(table, label=0, variant="jpeg=50")
    fakes = scores_of(table, generator="sd", variant="jpeg=50")
    assert rows_of(report, "jpeg=50")["sd"]["auc"] == pytest.approx(sk(roc_auc_score, fakes, reals))
    assert rows_of(report, "blur=3")["sd"]["strength"] == 3.0 and rows_of(report, "none")["sd"]["variant"] == "none"
    grid = {s.title: s for s in sections(report)}["AUC under perturbations"]
    assert grid.columns == ["generator", "none", "jpeg=90", "jpeg=50", "blur=3", "filter=clarendon"]
    sd = next(r for r in grid.rows if r[0] == "sd")
    assert [float(v) for v in sd[1:]] == pytest.approx([rows_of(report, label)["sd"]["auc"] for label, _, _ in SETTINGS],
                                                       abs=5e-5)
    assert [r[0] for r in grid.rows] == ["gan", "sd", "mean", "overall"]  # the reals have no AUC
    assert "real" in [r[0] for r in {s.title: s for s in sections(report)}["Acc under perturbations"].rows]


class Page(html.parser.HTMLParser):
    """Images, tables (rows of cells) and links of an HTML page."""

    def __init__(self) -> None:
        super().__init__()
        self.images, self.tables, self.links, self._cell = [], [], [], None

    def handle_starttag(self, tag: str, attrs: list) -> None:
        attrs = dict(attrs)
        if tag == "img":
            self.images.append(attrs["src"])
        elif tag in ("a", "link", "script"):
            self.links.append(tag)
        elif tag == "table":
            self.tables.append([])
        elif tag == "tr":
            self.tables[-1].append([])
        elif tag in ("td", "th"):
            self._cell = ""

    def handle_data(self, data: str) -> None:
        if self._cell is not None:
            self._cell += data

    def handle_endtag(self, tag: str) -> None:
        if tag in ("td", "th"):
            self.tables[-1][-1].append(self._cell)
            self._cell = None


def test_the_html_report_is_self_contained_with_every_table_and_plot(tmp_path):
    table = sweep_table()
    report = evaluate({"sweep.parquet": table, "paired.parquet": sourced_table()}, bootstrap=50)
    written = write_report(report, str(tmp_path))
    page = Page()
    page.feed((tmp_path / "report.html").read_text())
    pngs = sorted(p for p in written if p.endswith(".png"))
    assert "sweep_clean.png" in {p.rsplit("/", 1)[-1] for p in pngs}
    assert len(page.images) == len(pngs) and page.links == []
    for src in page.images:
        prefix, data = src.split(",", 1)
        assert prefix == "data:image/png;base64" and base64.b64decode(data, validate=True)[:8] == PNG
    expected = sections(report)
    options_table = page.tables[len(expected)]
    assert len(page.tables) == len(expected) + 1
    for parsed, section in zip(page.tables, expected):
        assert parsed == [section.columns, *section.rows] and len(parsed) > 1
    assert ["perturb", '"jpeg=90,50 blur=3 filter=clarendon"', ""] in options_table
    assert (tmp_path / "pairs.csv").exists() and report.protocol == "paired"
    csv = pacsv.read_csv(tmp_path / "metrics.csv")
    assert {"run", "generator", "auc", "variant", "strength"} <= set(csv.column_names)
    assert csv.num_rows == len(report.rows) == len({(r["run"], r["generator"]) for r in report.rows})


def test_cli_protocol_and_bootstrap_flags(tmp_path, capsys):
    path = str(tmp_path / "scores.parquet")
    pq.write_table(sourced_table(), path)
    assert cli(["evaluate", path, "--bootstrap", "-1", "--no-mlflow"]) == 2
    assert "error: --bootstrap (bootstrap): must be 0 (no intervals)" in capsys.readouterr().err
    with pytest.raises(SystemExit):  # argparse knows the choices
        cli(["evaluate", path, "--protocol", "paired-ish"])
    assert "invalid choice: 'paired-ish'" in capsys.readouterr().err
    assert cli(["evaluate", path, "--protocol", "pooled", "--bootstrap", "100", "--seed", "2", "--no-mlflow"]) == 0
    out = capsys.readouterr().out
    assert "Protocol: pooled." in out and "bootstrap of 100 resamples (seed 2)" in out
