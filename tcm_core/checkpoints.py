"""TEMPORARY: the names ``tcm_core/training.py`` still imports from here, until the lead's training rewrite
imports them from their new modules. Delete this file when merging that rewrite (no module is called
``checkpoints`` after the split: see downloads, foreign_checkpoints, network_files)."""

from tcm_core.foreign_checkpoints import CheckpointError
from tcm_core.network_files import load_network, save_network

__all__ = ["CheckpointError", "load_network", "save_network"]
