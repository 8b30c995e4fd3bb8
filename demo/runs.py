"""What both demos do with their run folders: keep a run trained with the same config, retrain an edited one."""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

import yaml

from mutor_vision.config import config_changes, default_values, to_dict, upgrade

log = logging.getLogger("demo")


def discard_if_edited(run: Path, config, config_cls: type) -> None:
    """Delete ``run`` when the config it recorded differs from ``config`` (keys added since at their defaults)."""
    recorded = run / "config.yaml"
    if not recorded.is_file():
        return
    old = upgrade(config_cls, yaml.safe_load(recorded.read_text()))  # keys of older versions under today's names
    changes = config_changes(old, to_dict(config), default_values(config_cls))
    if changes:
        log.warning("%s: the config changed since it was trained (%s): training it anew", run, ", ".join(changes))
        shutil.rmtree(run)
