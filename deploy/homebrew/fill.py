#!/usr/bin/env python3
"""Fills the Homebrew formula template from the release archives.

    fill.py DIST_DIR --url-base URL [--homepage URL] [--out FILE]

Reads DIST_DIR/SHA256SUMS (deploy/dist.sh writes it) and writes the
formula (DIST_DIR/keyrelay.rb unless --out) with the version, each
archive's URL (URL/keyrelay-VERSION-TARGET.tar.gz: where the archives are
published, or file:///... for a local try) and its SHA-256. Fails, naming
it, if SHA256SUMS lacks a target the formula installs or the template has a
field it cannot fill, so a formula with a placeholder is never written.
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

TEMPLATE = Path(__file__).with_name("keyrelay.rb")
ARCHIVE = re.compile(r"^keyrelay-(?P<version>[^-]+)-(?P<target>.+)\.tar\.gz$")
FIELD = re.compile(r"@([A-Za-z0-9_.-]+)@")


class FillError(Exception):
    pass


def read_sums(path: Path) -> tuple[str, dict[str, str]]:
    """The version and {target: sha256} of the .tar.gz archives in SHA256SUMS."""
    if not path.is_file():
        raise FillError(f"{path} does not exist: run deploy/dist.sh first")
    versions, sums = set(), {}
    for line in path.read_text().splitlines():
        digest, _, name = line.partition("  ")
        match = ARCHIVE.match(name.strip().lstrip("*"))
        if not match:
            continue  # the Windows .zip and anything else Homebrew does not use
        if not re.fullmatch(r"[0-9a-f]{64}", digest):
            raise FillError(f"{path}: {digest!r} is not a SHA-256 for {name}")
        versions.add(match["version"])
        sums[match["target"]] = digest
    if len(versions) != 1:
        raise FillError(f"{path}: expected archives of one version, found {sorted(versions)}")
    return versions.pop(), sums


def fill(template: str, version: str, sums: dict[str, str], url_base: str, homepage: str) -> str:
    values = {"VERSION": version, "URL_BASE": url_base.rstrip("/"), "HOMEPAGE": homepage}
    values.update({f"SHA256_{target}": digest for target, digest in sums.items()})

    def value(match: re.Match[str]) -> str:
        field = match[1]
        if field not in values:
            target = field.removeprefix("SHA256_")
            raise FillError(
                f"no archive for {target} in SHA256SUMS"
                if field.startswith("SHA256_")
                else f"the template's field @{field}@ has no value"
            )
        return values[field]

    return FIELD.sub(value, template)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("dist", type=Path, help="the directory dist.sh wrote")
    parser.add_argument("--url-base", required=True, help="where the archives are published")
    parser.add_argument("--homepage", help="the formula's homepage (default: --url-base)")
    parser.add_argument("--out", type=Path, help="where to write (default: DIST/keyrelay.rb)")
    args = parser.parse_args()
    try:
        version, sums = read_sums(args.dist / "SHA256SUMS")
        formula = fill(
            TEMPLATE.read_text(), version, sums, args.url_base, args.homepage or args.url_base
        )
    except FillError as err:
        print(f"fill.py: {err}", file=sys.stderr)
        return 1
    out = args.out or args.dist / "keyrelay.rb"
    out.write_text(formula)
    print(f"fill.py: wrote {out} for keyrelay {version} ({len(sums)} archives)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
