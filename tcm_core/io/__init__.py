"""Files in and out: downloads, checkpoints of every format, digests and atomic writes.

``downloads`` (the checkpoint registry and ``fetch``), ``safe_pickle`` (NVlabs pickles read without running
them), ``foreign_checkpoints`` (EDM / EDM2 / ECT / TCM checkpoints), ``network_files`` (our format and the one
``load_network``), ``hashing`` (sha256 pins) and ``atomic`` (write-then-rename outputs).
"""
