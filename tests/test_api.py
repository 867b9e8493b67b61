"""The public API of spai_core: every exported name resolves, and config code stays light."""
from __future__ import annotations

import subprocess
import sys

import pytest

import spai_core
from pipelines.demo.config import DemoConfig
from spai_core.config import ConfigError, load_config


def test_every_exported_name_resolves():
    missing = [name for name in spai_core.__all__ if getattr(spai_core, name, None) is None]
    assert not missing
    assert spai_core.Detector.__module__ == "spai_core.detector"


def test_an_unknown_name_is_an_attribute_error():
    try:
        spai_core.NoSuchThing  # noqa: B018 - the lookup is the test
    except AttributeError as exc:
        assert "NoSuchThing" in str(exc)
    else:
        raise AssertionError("spai_core.NoSuchThing resolved")


def test_config_code_does_not_import_torch():
    # Command parsers are built from config classes; importing them must not cost torch's start-up.
    code = "import sys, spai_core, spai_core.config; print('torch' in sys.modules, 'timm' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.split() == ["False", "False"]


def test_declared_choices_hold_however_the_value_was_set(tmp_path):
    # argparse checks a flag's choices; a YAML file or a key=value override goes through load_config alone.
    (tmp_path / "demo.yaml").write_text("recipe: clip\n")
    assert load_config(DemoConfig, tmp_path / "demo.yaml").recipe == "clip"
    with pytest.raises(ConfigError, match=r"^--recipe \(recipe\): must be one of tiny, clip, got 'huge'$"):
        load_config(DemoConfig, None, ["recipe=huge"])
    (tmp_path / "demo.yaml").write_text("recipe: huge\n")
    with pytest.raises(ConfigError, match="must be one of tiny, clip"):
        load_config(DemoConfig, tmp_path / "demo.yaml")
