"""What a plugin's output records about its inputs: the SHA-256 of their weight files, written
into the output's ``config.json`` once the engine has written it (hashing reads every weight
byte, so it runs in a plan's ``finalize``, never while planning)."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Callable


def sha256_files(path: Path) -> dict[str, str]:
    """``{file name: sha256}`` of the ``*.safetensors`` files of a model folder."""
    hashes = {}
    for file in sorted(Path(path).glob("*.safetensors")):
        digest = hashlib.sha256()
        with open(file, "rb") as handle:
            for chunk in iter(lambda: handle.read(1 << 20), b""):
                digest.update(chunk)
        hashes[file.name] = digest.hexdigest()
    return hashes


def update_config(folder: Path, change: Callable[[dict], None]) -> None:
    """Apply ``change`` to the ``config.json`` the engine wrote into ``folder``."""
    path = Path(folder) / "config.json"
    config = json.loads(path.read_text())
    change(config)
    path.write_text(json.dumps(config, indent=2) + "\n")


def record_input_hashes(folder: Path, folders: dict) -> None:
    """The sha256 of every input's safetensors files into the written config's
    ``mixcli.inputs.<name>.sha256`` (``folders``: input name -> model folder)."""
    hashes = {name: sha256_files(path) for name, path in folders.items()}

    def change(config):
        for name, entry in config["mixcli"]["inputs"].items():
            entry["sha256"] = hashes[name]
    update_config(folder, change)
