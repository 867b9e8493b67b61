"""Names of the files a training run (``<output>/<name>/``) and a search (``<output>/<name>/``) keep.

``spai train`` writes them, ``spai tune`` reads its trials' runs through them, and a resume finds its job by them;
one place for each name keeps the writers and the readers in step.
"""
from __future__ import annotations

CONFIG = "config.yaml"  # the job's full config: `spai train --config <run>/config.yaml` reruns it
RUN_MARKER = "spai_run.json"  # a run's MLflow run id, tracking store and config as it started (what --resume reads)
BEST_WEIGHTS = "best.safetensors"  # the epoch with the highest val AUC (a search: its best trial's)
LAST_WEIGHTS = "last.safetensors"  # the last epoch trained
DATA_ERROR = "data_error.txt"  # rank 0's reason when an epoch had no decodable training image
CHECKPOINT_WEIGHTS = "model.safetensors"  # the weights inside each Ray Train checkpoint folder
TRAIN_STATE = "train_state.pt"  # model, optimizer and early-stopping state inside each Ray Train checkpoint folder

SEARCH_MARKER = "spai_search.json"  # a search's parent MLflow run and its resolved concurrency
SEARCH_TRIALS = "train"  # the folder of a search's Train runs, one per trial id
TRIALS_TABLE = "trials.csv"
TRIALS_PLOT = "val_auc.png"
BEST_CONFIG = "best_config.yaml"  # the best trial's training config, ready for `spai train --config`
