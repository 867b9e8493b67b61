"""Sem-SPAI on the demo corpus: SPAI alone, logit fusion and late fusion, held-out AUC per generator, clean and on
each derivative kind of the robustness suite (``spai score --perturb meme screenshot collage sticker``).

Every step is the library call behind a CLI command, each kept in ``--work`` and reused by a rerun:

1. the demo corpus (``spai demo-data``); 2. SPAI: the tiny recipe trained on its train split (``spai train -c
configs/tiny.yaml``), or ``--spai WEIGHTS``; 3. the offline CLIP ViT-B/16 weights (``spai backbone``); 4. features
of every image (``spai fusion extract``, CLIP as the semantic encoder); 5. the two heads (``spai fusion train``,
configs/fusion.yaml and configs/fusion_logit.yaml); 6. the test split scored by each model with the derivative
sweep (``spai score --perturb``); 7. ``spai evaluate`` of each table, printed side by side as one table.

    nice -n 19 python benchmarks/bench_fusion.py --work bench_fusion_out      # ~1 h on 2 busy cores
"""
from __future__ import annotations

import argparse
import logging
import time
from pathlib import Path

from pipelines.demo.corpus import build_demo_corpus
from pipelines.demo.run import _clip_weights
from pipelines.data.manifest import read_sidecar
from pipelines.evaluate.protocol import evaluate
from pipelines.evaluate.tables import read_scores
from pipelines.features.config import FeaturesConfig
from pipelines.features.job import run_extraction
from pipelines.fusion.config import FUSION_RECIPE, FusionTrainConfig
from pipelines.fusion.run import run_fusion
from pipelines.infra.console import log_to_console
from pipelines.infra.settings import TrackingConfig
from pipelines.score.job import ScoreConfig, score
from pipelines.train.config import CONFIG_DIR, TrainConfig
from pipelines.train.run import run_training
from spai_core.config import load_config
from spai_core.semantic import SemanticConfig

DERIVATIVES = ["meme", "screenshot", "collage", "sticker"]  # the robustness suite's derivative kinds
HEADS = {"logit fusion": CONFIG_DIR / "fusion_logit.yaml", "late fusion": FUSION_RECIPE}
NO_MLFLOW = {"tracking.enabled": False}


def step(text: str) -> None:
    print(f"\n==> {time.strftime('%H:%M:%S')} {text}", flush=True)


def spai_weights(manifest: str, work: Path, epochs: int | None) -> str:
    """The tiny recipe trained on the corpus (as ``spai demo`` does, one worker), once."""
    best = work / "spai" / "spai" / "best.safetensors"
    if not best.is_file():
        job = {"manifest": manifest, "output": str(work / "spai"), "name": "spai", "workers": 1, **NO_MLFLOW}
        if epochs:
            job["epochs"] = epochs
        result = run_training(load_config(TrainConfig, CONFIG_DIR / "tiny.yaml", flags=job))
        if result.best_checkpoint is None:
            raise SystemExit("SPAI training produced no checkpoint")
    return str(best)


def fused(name: str, recipe: Path, features: str, work: Path) -> str:
    best = work / "fusion" / name.replace(" ", "_") / "best.safetensors"
    if not best.is_file():
        run_fusion(load_config(FusionTrainConfig, recipe, flags={"features": features, "output": str(work / "fusion"),
                                                                 "name": name.replace(" ", "_"), **NO_MLFLOW}))
    return str(best)


def scored(name: str, weights: str, manifest: str, work: Path, cpus: int) -> str:
    out = work / "scores" / f"{name.replace(' ', '_')}.parquet"
    if not out.is_file():
        score(ScoreConfig(weights=weights, input=manifest, output=str(out), split="test", perturb=DERIVATIVES,
                          device="cpu", cpus_per_worker=cpus, tracking=TrackingConfig(enabled=False)))
    return str(out)


def auc_table(reports: dict, seen: list[str]) -> str:
    """Rows: generator (seen ones marked); columns: each variant x model; cells: AUC against all test reals.
    ``reports``: model -> its ``spai evaluate`` report."""
    auc = {(model, r.get("variant", "none"), r["generator"]): r["auc"] for model, report in reports.items()
           for r in report.rows}
    variants = list(dict.fromkeys(v for (_, v, _) in auc))  # sweep labels, e.g. sticker=3
    generators = list(dict.fromkeys(g for (_, _, g) in auc if g != "real"))
    head = "| generator | " + " | ".join(f"{v if v != 'none' else 'clean'}: {m}" for v in variants
                                         for m in reports) + " |"
    lines = [head, "|---|" + "---:|" * (len(variants) * len(reports))]
    for gen in generators:
        cells = [auc.get((m, v, gen)) for v in variants for m in reports]
        label = f"{gen} (seen)" if gen in seen else gen
        lines.append(f"| {label} | " + " | ".join("-" if c is None or c != c else f"{c:.3f}" for c in cells) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", type=Path, default=Path("bench_fusion_out"), help="folder of every step (reused)")
    parser.add_argument("--spai", help="SPAI weights to fuse (default: train the tiny recipe on the corpus)")
    parser.add_argument("--spai-epochs", type=int, help="epochs of that training (default: the recipe's)")
    parser.add_argument("--cpus", type=int, default=2, help="torch threads of each extraction / scoring actor")
    args = parser.parse_args()
    log_to_console(logging.INFO)
    work = args.work.resolve()
    started = time.time()
    step("demo corpus")
    manifest = build_demo_corpus(work / "corpus")
    seen = (read_sidecar(manifest) or {}).get("build", {}).get("seen_generators") or []
    step("SPAI (frozen): the tiny recipe")
    spai = args.spai or spai_weights(manifest, work, args.spai_epochs)
    step("CLIP ViT-B/16 weights (offline)")
    clip = str(_clip_weights(work / "weights"))
    step("features of every image: SPAI at native resolution, CLIP at 224")
    features = str(work / "features")
    run_extraction(load_config(FeaturesConfig, None, flags={
        "manifest": manifest, "weights": spai, "output": features, "cpus_per_worker": args.cpus,
        "device": "cpu", "semantic": vars(SemanticConfig(encoder="clip_vit_b16", weights=clip))}))
    models = {"SPAI": spai}
    for name, recipe in HEADS.items():
        step(f"{name} head")
        models[name] = fused(name, recipe, features, work)
    reports = {}
    for name, weights in models.items():
        step(f"scoring the test split with {name}: clean and {', '.join(DERIVATIVES)}")
        table = read_scores(scored(name, weights, manifest, work, args.cpus))
        reports[name] = evaluate({name: table}, split="test", seen=seen, bootstrap=0)
    print(f"\n## Held-out AUC per generator (test split of {manifest}; SPAI: {spai}; semantic: CLIP ViT-B/16)\n")
    print(auc_table(reports, seen))
    print(f"\ntotal {(time.time() - started) / 60:.1f} min")


if __name__ == "__main__":
    main()
