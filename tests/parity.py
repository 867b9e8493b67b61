"""The parity fixture's weight recipe (tests/fixtures/spai-parity/README.md), shared by tests and benchmarks."""
from __future__ import annotations

import csv
import hashlib
from pathlib import Path

import numpy as np
import torch

FIXTURE = Path(__file__).resolve().parent / "fixtures" / "spai-parity"
RECIPE_SHA256 = "70c3d08c7d22956cb8f8252955f4b6289f152487ff8d0744b688a01e306344db"


def recipe_state_dict(seed: int = 1234) -> dict[str, torch.Tensor]:
    """Official-layout state dict holding exactly the 280 used keys, seeded as the fixture README says."""
    state = {}
    for i, line in enumerate((FIXTURE / "keys.txt").read_text().splitlines()):
        key, shape_text = line.split("\t")
        shape = tuple(int(s) for s in shape_text.split(","))
        z = np.random.default_rng([seed, i]).standard_normal(shape, dtype=np.float32)
        if "norm" in key and key.endswith(".weight"):
            value = 1 + 0.02 * z
        elif key.startswith("cls_head."):
            value = 0.03 * z
        elif key.startswith(("to_kv.", "to_out.")):
            value = 0.5 * z
        else:
            value = 0.02 * z
        state[key] = torch.from_numpy(np.ascontiguousarray(value, dtype=np.float32))
    return state


def recipe_sha256(state: dict[str, torch.Tensor]) -> str:
    digest = hashlib.sha256()
    for value in state.values():
        digest.update(value.numpy().tobytes())
    return digest.hexdigest()


def expected_rows() -> list[dict[str, str]]:
    with open(FIXTURE / "expected.csv") as fh:
        return list(csv.DictReader(fh))


def write_official_checkpoint(path: Path, seed: int = 1234) -> Path:
    torch.save({"model": recipe_state_dict(seed)}, path)
    return path
