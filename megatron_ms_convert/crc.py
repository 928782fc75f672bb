"""CRC-32 as every input check computes it: ISA-L's where installed, zlib's otherwise.

ISA-L's runs ~10 GB/s on one core here against zlib's ~3 GB/s (docs/performance.md), which keeps
checking the inputs' bytes far below the cost of copying them. Both compute the same number, so
where no isal wheel exists (an unusual platform) zlib gives the same answers, only slower.
"""

from __future__ import annotations

import zlib

try:
    from isal.isal_zlib import crc32
except ImportError:  # pragma: no cover - platforms without an isal wheel
    crc32 = zlib.crc32

__all__ = ["crc32"]
