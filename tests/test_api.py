"""The public API of spai_core: every exported name resolves, and config code stays light."""
from __future__ import annotations

import subprocess
import sys

import spai_core


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
