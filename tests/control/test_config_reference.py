"""docs/configuration.md is generated from the settings object and must match it."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from control.config import HONOURED_SERVER_KEYS, IGNORED_SERVER_KEYS, Settings, configuration_reference

ROOT = Path(__file__).resolve().parents[2]
REFERENCE = ROOT / "docs" / "configuration.md"


def test_every_setting_is_documented() -> None:
    text = REFERENCE.read_text()
    missing = [f.alias for f in Settings.model_fields.values() if f"`{f.alias}`" not in text]
    assert not missing, f"undocumented settings: {missing}; run python -m control config-reference"
    assert all(f"`{key}`" in text for key in [*HONOURED_SERVER_KEYS, *IGNORED_SERVER_KEYS])


def test_reference_file_is_not_stale() -> None:
    assert REFERENCE.read_text() == configuration_reference(), "run python -m control config-reference"


def test_check_command_fails_on_a_stale_file(tmp_path: Path) -> None:
    stale = tmp_path / "configuration.md"
    stale.write_text(configuration_reference().replace("ZLH_POLL_INTERVAL", "ZLH_POLL"))
    check = [sys.executable, "-m", "control", "config-reference", "--check", "--output"]
    assert subprocess.run([*check, str(stale)], check=False, capture_output=True, timeout=60).returncode == 1
    assert subprocess.run([*check, str(REFERENCE)], check=False, capture_output=True, timeout=60).returncode == 0
