"""Configuration: the typed settings object and the check-config command."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from node.errors import ConfigError
from node.settings import default_config_text, load_settings, parse_settings
from tests.peers import ROOT


def test_embedded_default_has_the_documented_keys() -> None:
    s = parse_settings(default_config_text())
    assert (s.dicom.ae_title, s.dicom.port, s.dicom.allowed_calling_ae_titles) == \
        ("AINODE", 11112, [])
    assert s.storage.dir == Path("var") and s.database.url == "sqlite:///var/ainode.db"
    assert s.study.stable_seconds == 60 and s.workers.count == 1 and s.workers.device == "auto"
    assert (s.admin.host, s.admin.port) == ("127.0.0.1", 8080)
    assert s.destination("pacs").port == 4242
    assert s.routes[0].match == {"Modality": "CT"} and s.routes[0].models == ["ct-lung"]


@pytest.mark.parametrize(("text", "key"), [
    ("[dicom]\nport = 70000\n", "dicom.port"),
    ("[dicom]\nae_title = 'THIS-AE-TITLE-IS-TOO-LONG'\n", "dicom.ae_title"),
    ("[workers]\ndevice = 'tpu'\n", "workers.device"),
    ("[dicom]\nprot = 1\n", "dicom.prot"),
    ("[[routes]]\nname = 'x'\nmodels = ['ct-lung']\nmatch = { Modalty = 'CT' }\n",
     "routes.0.match"),
    ("[[routes]]\nname = 'x'\nmodels = ['ct-lung']\ndestinations = ['nowhere']\n", "nowhere"),
    ("[[routes]]\nname = 'x'\nmodels = ['m']\nmatch = { Modality = 're:(' }\n", "regular"),
])
def test_bad_file_is_refused_naming_the_key(text: str, key: str) -> None:
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        parse_settings(text, "test.toml")


def test_env_variable_selects_the_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "a.toml"
    path.write_text("[dicom]\nport = 10104\n")
    monkeypatch.setenv("AINODE_CONFIG", str(path))
    assert load_settings().dicom.port == 10104


def run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "node.cli", *args], capture_output=True,
                          text=True, cwd=ROOT, timeout=120)


def test_check_config_accepts_good_and_names_bad_key(tmp_path: Path) -> None:
    good = run_cli("check-config", str(ROOT / "node" / "default_config.toml"))
    assert good.returncode == 0, good.stderr
    bad_file = tmp_path / "bad.toml"
    bad_file.write_text("[study]\nstable_seconds = -1\n")
    bad = run_cli("check-config", str(bad_file))
    assert bad.returncode == 2 and "study.stable_seconds" in bad.stderr
    unknown = tmp_path / "unknown.toml"
    unknown.write_text("[[routes]]\nname = 'x'\nmodels = ['no-such-model']\n")
    out = run_cli("check-config", str(unknown))
    assert out.returncode == 2 and "no-such-model" in out.stderr
