"""Files in and out: downloads, checkpoints of every format, digests and atomic writes.

``downloads`` (the checkpoint registry and ``fetch``), ``safe_pickle`` (NVlabs pickles read without running
them), ``foreign_checkpoints`` (EDM / EDM2 / ECT / TCM checkpoints), ``network_files`` (our format and the one
``load_network``), ``hashing`` (sha256 pins) and ``atomic`` (write-then-rename outputs).
"""

import os
from pathlib import Path


def default_cache_dir() -> Path:
    """Where fetched files and derived caches live: ``$TCM_CACHE_DIR``, else ``~/.cache/tcm_pipeline``."""
    return Path(os.environ.get("TCM_CACHE_DIR", Path.home() / ".cache" / "tcm_pipeline"))
