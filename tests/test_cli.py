"""The ``spai`` CLI's own behaviour: user errors end in one ``error:`` line and exit code 2, never a traceback."""
from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq
import pytest
import torch

from polling import free_port
from spai_cli.main import main as spai
from spai_core.checkpoint import save_checkpoint
from spai_core.spai import build_model

PHOTOS = Path(__file__).resolve().parents[1] / "pipelines" / "assets" / "photos"


@pytest.mark.parametrize("argv, message", [
    (["convert", "{tmp}/nope.pth", "{tmp}/out.safetensors"], "nope.pth"),  # CheckpointError, from spai_core
    (["tune", "--manifest", "{tmp}/m", "--resume"], "--resume needs the --name"),  # ConfigError, before any work
    (["train", "--manifest", "{tmp}/m", "--output", "{tmp}/runs", "--name", "gone", "--resume"], "nothing to resume"),
    (["score", "--weights", "{tmp}/w", "--input", "{tmp}", "--output", "{tmp}/s.parquet", "--perturb", "jpeg=0"],
     "--perturb (perturb): jpeg=0: the JPEG quality must be a whole number in [1, 100]"),  # checked before Ray starts
    (["validate", "{tmp}/nope"], "does not exist"),  # ManifestError
    (["evaluate", "{tmp}/nope.parquet"], "{tmp}/nope.parquet does not exist"),  # StorageError
    (["evaluate", "{tmp}/odd.parquet"], "found labels [2.0]"),  # EvaluateError
    (["manifest", "folders", "--real", "{tmp}/none", "--fake", "gan={tmp}/f", "--output", "{tmp}/m"],
     "{tmp}/none does not exist"),
    (["demo-data", "--output", "{tmp}/d", "not_a_key=1"], "not_a_key"),  # ConfigError
    (["train", "-c", "{tmp}/nope.yaml", "-m", "{tmp}/m"], "config {tmp}/nope.yaml does not exist"),
    (["train", "-m", "{tmp}/m", "epochs=0"], "epochs: must be at least 1, got 0"),  # values checked as the config is built
    (["train", "-m", "{tmp}/m", "workers=0"], "--workers (workers): must be at least 1, got 0"),
    (["train", "-m", "{tmp}/m", "optim.lr=-1"], "optim.lr: must be above 0, got -1.0"),
    (["train", "-m", "{tmp}/m", "model.mask_radius=500"], "mask_radius must be 1 to 156 for 224-px tiles"),
    (["train", "-m", "{tmp}/m", "optim.lr=[1"], "override value '[1' is not valid YAML"),
    (["tune", "-m", "{tmp}/m", "--space", "{tmp}/bad.yaml"], "search space {tmp}/bad.yaml is not valid YAML"),
])
def test_user_errors_print_one_line_and_exit_2(argv, message, tmp_path, capsys):
    odd_labels = pa.table({"label": [0, 2], "generator": ["real", "x"], "score": [0.1, 0.9]})
    pq.write_table(odd_labels, tmp_path / "odd.parquet")
    (tmp_path / "bad.yaml").write_text("params: {optim.lr: [1\n")
    assert spai([arg.format(tmp=tmp_path) for arg in argv]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message.format(tmp=tmp_path) in err and len(err.strip().splitlines()) == 1, err


@pytest.mark.parametrize("argv, usage, message", [
    # (its 3 is taken for a KEY=VALUE override, which then fails on its own)
    (["score", "-w", "w", "-i", "i", "-o", "o.csv", "--batchsize", "3"], "spai score", "unrecognized arguments: "
     "--batchsize"),
    (["score", "-w", "w", "-i", "i", "-o", "o.csv", "--prec", "bf16"], "spai score", "--prec"),  # no abbreviations
    (["manifest", "folders", "--real", "r", "--fake", "f", "-o", "m", "--bogus"], "spai manifest folders", "--bogus"),
])
def test_usage_errors_show_the_subcommands_usage(argv, usage, message, capsys):
    with pytest.raises(SystemExit) as exited:
        spai(argv)
    err = capsys.readouterr().err
    assert exited.value.code == 2 and f"usage: {usage}" in err and message in err, err


def test_bare_spai_prints_its_help(capsys):
    assert spai([]) == 2
    out = capsys.readouterr().out
    assert out.startswith("usage: spai") and "RAY_ADDRESS" in out


def test_version_and_python_dash_m():
    done = subprocess.run([sys.executable, "-m", "spai_cli", "--version"], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0 and re.fullmatch(r"spai \d+\.\d+\.\d+\n", done.stdout), done


def test_an_unreachable_cluster_is_an_error_not_a_hang(tmp_path):
    """RAY_ADDRESS naming a port nobody listens on: ``ray.init`` alone would retry for minutes."""
    torch.manual_seed(0)
    save_checkpoint(tmp_path / "tiny.safetensors", build_model("spai_tiny"))
    (tmp_path / "photos").mkdir()
    shutil.copy(next(PHOTOS.glob("*.jpg")), tmp_path / "photos")
    env = {**os.environ, "RAY_ADDRESS": f"127.0.0.1:{free_port()}"}
    done = subprocess.run([sys.executable, "-m", "spai_cli.main", "score", "-w", str(tmp_path / "tiny.safetensors"),
                           "-i", str(tmp_path / "photos"), "-o", str(tmp_path / "s.csv")], env=env, capture_output=True,
                          text=True, timeout=120, cwd=tmp_path)  # its default MLflow store (./mlruns) stays there
    assert done.returncode == 2 and "error: cannot reach the Ray cluster at 127.0.0.1:" in done.stderr, done.stderr


@pytest.mark.parametrize("suffix", ["parquet", "csv"])
def test_an_error_after_reading_a_table_exits_2_not_134(tmp_path, suffix):
    """Arrow's pool threads, left holding the bytes of an in-memory table, aborted the interpreter at exit (134) in
    about 1 run of 4 (see table_from_parquet)."""
    table = pa.table({"label": [0, 1], "generator": ["real", "x"], "score": [0.1, 0.9]})
    (pq.write_table if suffix == "parquet" else pacsv.write_csv)(table, tmp_path / f"s.{suffix}")
    done = subprocess.run([sys.executable, "-m", "spai_cli.main", "evaluate", str(tmp_path / f"s.{suffix}"),
                           "--split", "test"], capture_output=True, text=True, timeout=120)  # no split column
    assert done.returncode == 2 and "terminate called" not in done.stderr, done.stderr


def test_demo_config_round_trips_and_a_bad_value_fails_before_any_work(tmp_path, capsys):
    from pipelines.demo.config import DemoConfig
    from spai_core.config import dump_config, load_config

    cfg = DemoConfig(output=str(tmp_path / "d"), workers=3, epochs=2, rebuild=True)
    (tmp_path / "demo.yaml").write_text(dump_config(cfg))
    assert load_config(DemoConfig, tmp_path / "demo.yaml") == cfg
    assert spai(["demo", "--config", str(tmp_path / "demo.yaml"), "--workers", "0"]) == 2
    assert capsys.readouterr().err == "error: --workers (workers): must be at least 1, got 0\n"
    assert spai(["demo", "-o", str(tmp_path / "d"), "--epochs", "0"]) == 2
    assert "error: --epochs (epochs): must be at least 1" in capsys.readouterr().err
    assert not (tmp_path / "d").exists()
