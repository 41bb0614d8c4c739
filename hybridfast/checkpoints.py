"""Checkpoint folders that resume only their own configuration.

A resumable job claims its checkpoint folder before training: the folder's ``config.json`` records
the job's configuration (every setting that decides the result) and its hash. A later job with
another configuration is refused with :class:`CheckpointMismatch`, naming each setting that
differs (``key: old -> new``), instead of resuming someone else's state; so is a folder holding
checkpoint files but no recorded configuration (written by an older hybridfast).
``restart=True`` empties the folder and starts from scratch.
"""
from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

from .io import atomic_write_text
from .provenance import RunIdentity, differences

__all__ = ["CheckpointMismatch", "digest", "claim_checkpoint"]

CONFIG = "config.json"


class CheckpointMismatch(ValueError):
    """A checkpoint folder holds a job of another configuration; ``changes`` lists
    ``key: old -> new`` for each setting that differs."""

    def __init__(self, folder, changes: list[str]):
        self.folder, self.changes = Path(folder), changes
        super().__init__(f"{folder} holds a checkpoint of another configuration ({'; '.join(changes)}); a "
                         f"checkpoint resumes only the configuration that wrote it")


def digest(obj) -> str:
    """16 hex digits of the sha256 of ``obj``'s JSON (for data too large to record itself)."""
    return hashlib.sha256(json.dumps(obj, separators=(",", ":")).encode()).hexdigest()[:16]


def _holds_files(folder: Path) -> bool:
    return any(f.is_file() for f in folder.rglob("*"))


def claim_checkpoint(folder, config: dict, *, restart: bool = False) -> None:
    """Make ``folder`` the checkpoint folder of the job ``config`` (see the module doc)."""
    folder = Path(folder)
    run = RunIdentity(config, {})
    if restart and folder.exists():
        shutil.rmtree(folder)
    recorded = folder / CONFIG
    if recorded.exists():
        old = json.loads(recorded.read_text())
        if old.get("config_hash") != run.id:
            raise CheckpointMismatch(folder, differences(old.get("config", {}), run.config)
                                     or ["the configuration hash"])
        return
    if folder.exists() and _holds_files(folder):
        raise CheckpointMismatch(folder, ["its checkpoint records no configuration (an older hybridfast wrote it)"])
    atomic_write_text(recorded, json.dumps(dict(config=run.config, config_hash=run.id), indent=1))
