"""``spai evaluate``: metrics per generator from score tables (the SPAI paper's paired or the pooled protocol,
:mod:`.protocol`), a report folder (:mod:`.report`: CSV, Markdown, a self-contained HTML page, plots) and an MLflow
run.

Several tables (e.g. one per degradation: ``spai score --jpeg-quality 75``) are compared side by side, each labelled
from the ``options`` column ``spai score`` writes. A scored manifest holds several splits; their rows are pooled
unless ``split`` (``--split``) picks one, and the report notes any pooling, since train rows make every metric look
better than held-out performance. The :class:`~pipelines.evaluate.config.EvaluateConfig` is saved in the report
folder as ``config.yaml``: ``spai evaluate --config`` of it makes the same report again.
"""
from __future__ import annotations

import dataclasses

from pipelines.evaluate.config import EvaluateConfig
from pipelines.evaluate.mistakes import draw_mistakes, pick_mistakes
from pipelines.evaluate.protocol import EvalReport, evaluate
from pipelines.evaluate.report import log_report, write_report
from pipelines.evaluate.tables import read_scores
from pipelines.infra.storage import Files, StorageOptions, absolute, join
from spai_core.config import check_config, dump_config

CONFIG_FILE = "config.yaml"


@dataclasses.dataclass
class EvaluationResult:
    """The report, the files written (report folder), and the MLflow run it was logged to."""

    report: EvalReport
    written: list[str]
    run_id: str | None


def run_evaluation(cfg: EvaluateConfig, options: StorageOptions | None = None) -> EvaluationResult:
    """Evaluate the score tables of ``cfg``; write the report folder (with the config) and log to MLflow as asked."""
    check_config(cfg)
    tables = {uri: read_scores(uri, options) for uri in cfg.scores}
    report = evaluate(tables, threshold=cfg.threshold, seen=cfg.seen, split=cfg.split, protocol=cfg.protocol,
                      bootstrap=cfg.bootstrap, seed=cfg.seed)
    mistakes = (draw_mistakes(pick_mistakes(tables, cfg.threshold, cfg.explain_count, cfg.split), cfg.explain,
                              options) if cfg.explain else None)
    written = []
    if cfg.output:
        written = write_report(report, cfg.output, options, mistakes)
        # absolute paths: the saved config makes the same report from any folder
        saved = dataclasses.replace(cfg, scores=[absolute(uri) for uri in cfg.scores], output=absolute(cfg.output))
        written.append(join(cfg.output, CONFIG_FILE))
        Files(options).write(written[-1], dump_config(saved).encode())
    run_id = None
    if cfg.tracking.enabled:
        run_id = log_report(report, cfg.tracking.uri, cfg.run_id, cfg.tracking.experiment, mistakes)
    return EvaluationResult(report, written, run_id)
