"""One set of start-up checks: what serve refuses, check-config refuses; serve refuses first.

Each configuration below is valid TOML and passes the settings' validation, but
cannot run: ``ainode check-config`` exits 2 naming the key, and ``ainode serve``
exits 2 with the same message before it creates its storage, migrates its
database or binds the DICOM port.
"""

from __future__ import annotations

import subprocess
import sys
import threading
from pathlib import Path

import pytest

from tests.peers import ROOT, free_port, port_open, write_config

ROUTE = {"name": "ct", "match": {"Modality": "CT"}, "models": ["ct-lung"]}


def _config(tmp_path: Path, port: int, *, storage: Path | None = None,
            routes: list[dict[str, object]] | None = None, admin: str = "", extra: str = "",
            destinations: list[dict[str, object]] | None = None) -> Path:
    storage = storage or tmp_path / "var"
    path = write_config(tmp_path / "ainode.toml", port=port, storage=storage,
                        db_url=f"sqlite:///{tmp_path / 'db' / 'ainode.db'}",
                        routes=routes or [ROUTE], destinations=destinations, extra=extra)
    path.write_text(path.read_text().replace("[admin]\n", f"[admin]\n{admin}", 1))
    return path


def _unknown_model(tmp_path: Path, port: int) -> tuple[Path, str]:
    return _config(tmp_path, port, routes=[{**ROUTE, "models": ["no-such-model"]}]), \
        "no-such-model"


def _tls_files_missing(tmp_path: Path, port: int) -> tuple[Path, str]:
    missing = tmp_path / "missing"
    return _config(tmp_path, port, extra=f'[dicom.tls]\nenabled = true\n'
                                         f'cert = "{missing}.crt"\nkey = "{missing}.key"\n'), \
        "dicom.tls.cert"


def _destination_ca_missing(tmp_path: Path, port: int) -> tuple[Path, str]:
    dest = {"name": "pacs", "ae_title": "PACS", "host": "127.0.0.1", "port": free_port()}
    path = _config(tmp_path, port, destinations=[dest])
    path.write_text(path.read_text() + f'[destinations.tls]\nenabled = true\n'
                                       f'ca = "{tmp_path / "no-ca.pem"}"\n')
    return path, "destinations[0].tls.ca"


def _storage_not_a_folder(tmp_path: Path, port: int) -> tuple[Path, str]:
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    return _config(tmp_path, port, storage=blocker / "var"), "storage.dir"


def _admin_open_without_credentials(tmp_path: Path, port: int) -> tuple[Path, str]:
    return _config(tmp_path, port, admin='host = "0.0.0.0"\n'), "admin.host"


def _credentials_file_missing(tmp_path: Path, port: int) -> tuple[Path, str]:
    return _config(tmp_path, port, admin=f'credentials_file = "{tmp_path / "none.toml"}"\n'), \
        "admin.credentials_file"


REFUSED = [_unknown_model, _tls_files_missing, _destination_ca_missing, _storage_not_a_folder,
           _admin_open_without_credentials, _credentials_file_missing]


def ainode(*args: str) -> subprocess.Popen[str]:
    return subprocess.Popen([sys.executable, "-m", "node.cli", *args], cwd=ROOT, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)


def watch_port(port: int, proc: subprocess.Popen[str]) -> list[bool]:
    """Poll ``port`` until ``proc`` exits; the list gets True if it was ever open."""
    seen: list[bool] = []

    def poll() -> None:
        while proc.poll() is None:
            if port_open(port):
                seen.append(True)
                return

    threading.Thread(target=poll, daemon=True).start()
    return seen


@pytest.mark.parametrize("make", REFUSED, ids=lambda f: f.__name__.strip("_"))
def test_check_config_and_serve_refuse_alike_before_binding(make: object, tmp_path: Path
                                                            ) -> None:
    assert callable(make)
    port = free_port()
    config, key = make(tmp_path, port)
    check = ainode("check-config", str(config))
    checked, _ = check.communicate(timeout=120)
    assert check.returncode == 2, checked
    assert key in checked

    serve = ainode("serve", "--config", str(config))
    opened = watch_port(port, serve)
    try:
        served, _ = serve.communicate(timeout=120)
    finally:
        if serve.poll() is None:
            serve.kill()
            serve.wait()
    assert serve.returncode == 2, served
    assert key in served and "Traceback" not in served
    assert opened == [] and "listening" not in served  # never bound the DICOM port
    assert not (tmp_path / "db").exists()  # nor created or migrated the database


def test_check_config_accepts_what_serve_runs(tmp_path: Path) -> None:
    config = _config(tmp_path, free_port())
    check = ainode("check-config", str(config))
    out, _ = check.communicate(timeout=120)
    assert check.returncode == 0 and "OK" in out, out
    assert not (tmp_path / "db").exists() and not (tmp_path / "var").exists()  # changes nothing
