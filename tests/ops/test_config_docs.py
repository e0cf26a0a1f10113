"""docs/configuration.md is generated from ``Settings``: it must be current, and every field documented."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from broker.config import Settings
from broker.config_explain import env_name, nested_model
from broker.settings_doc import render_configuration_doc
from tests.helpers import REPO


def test_configuration_reference_is_up_to_date() -> None:
    current = (REPO / "docs" / "configuration.md").read_text()
    assert current == render_configuration_doc(Settings), (
        "docs/configuration.md is out of date: run `nhi-broker config docs > docs/configuration.md`"
    )


def test_the_cli_prints_the_same_reference() -> None:
    out = subprocess.run([str(Path(sys.executable).with_name("nhi-broker")), "config", "docs"],
                         capture_output=True, text=True, check=True, timeout=60)
    assert out.stdout == render_configuration_doc(Settings)


def test_every_setting_and_its_variable_is_in_the_reference() -> None:
    text = render_configuration_doc(Settings)
    for name, field in Settings.model_fields.items():
        assert f"`{env_name((name,))}`" in text
        sub = nested_model(field.annotation)
        for sub_name in (sub.model_fields if sub is not None else {}):
            assert f"`{sub_name}`" in text or f"`{name}.{sub_name}`" in text
