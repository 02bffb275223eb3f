"""Keep evaluation off the network: the hub is unreachable here and local tasks need nothing from it.

huggingface_hub and datasets read the offline switches once, at import; embedkit imports transformers (and so
huggingface_hub) before the harness runs, so the switches are also pushed into those already-imported modules.
An explicit ``HF_HUB_OFFLINE=0`` from the user is respected (e.g. to fetch standard mteb tasks).
"""

from __future__ import annotations

import os
import sys

OFFLINE_VARS = ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE")
_TRUE = {"1", "ON", "YES", "TRUE"}


def is_offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").upper() in _TRUE


def ensure_offline() -> bool:
    """Default the three offline switches to 1 and apply them to imported hub clients; returns offline-ness."""
    for name in OFFLINE_VARS:
        os.environ.setdefault(name, "1")
    offline = is_offline()
    if offline:
        hub = sys.modules.get("huggingface_hub.constants")
        if hub is not None:
            hub.HF_HUB_OFFLINE = True
        datasets_config = sys.modules.get("datasets.config")
        if datasets_config is not None:
            datasets_config.HF_HUB_OFFLINE = True
            datasets_config.HF_DATASETS_OFFLINE = True
    return offline
