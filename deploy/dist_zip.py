#!/usr/bin/env python3
"""Writes a reproducible .zip of one directory, for deploy/dist.sh's Windows archive.

    dist_zip.py OUT.zip PARENT NAME EPOCH

Zips PARENT/NAME/ as NAME/... into OUT.zip: members sorted, every timestamp
EPOCH (a commit's time, clamped to 1980, the oldest a zip can say), no
owner or Unix mode (Windows has neither), deflated at level 9. The same
files give the same bytes, as the tarballs do. Python's zipfile rather than
Info-ZIP's zip(1): it is one fewer package to install, and zip(1) stores the
files' own times and modes.
"""

from __future__ import annotations

import sys
import time
import zipfile
from pathlib import Path


def main(argv: list[str]) -> int:
    if len(argv) != 4:
        print(__doc__, file=sys.stderr)
        return 64
    out, parent, name, epoch = Path(argv[0]), Path(argv[1]), argv[2], int(argv[3])
    stamp = max(time.gmtime(epoch)[:6], (1980, 1, 1, 0, 0, 0))
    files = sorted(path for path in (parent / name).rglob("*") if path.is_file())
    with zipfile.ZipFile(out, "w") as archive:
        for path in files:
            member = zipfile.ZipInfo(path.relative_to(parent).as_posix(), date_time=stamp)
            member.create_system = 0  # MS-DOS attributes, no Unix mode
            member.external_attr = 0x20  # FILE_ATTRIBUTE_ARCHIVE, as Windows' own zips have
            member.compress_type = zipfile.ZIP_DEFLATED
            archive.writestr(member, path.read_bytes(), compresslevel=9)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
