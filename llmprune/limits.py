"""Bounds on what a run reads, declared once (no torch here: the command line checks them first)."""

from __future__ import annotations

from .options import Option

# Local text read for one part (calibration or evaluation), in bytes after decompression: far above
# any real corpus, so sampling on real data never changes; a decompression bomb is refused.
MAX_DATA_BYTES = Option("max_data_bytes", int, 2 << 30,
                        "read at most N bytes of local calibration text, and N of evaluation text, counted after "
                        "decompression (default 2147483648 = 2 GiB)", minimum=1, metavar="N")

