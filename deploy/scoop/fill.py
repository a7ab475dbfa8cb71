#!/usr/bin/env python3
"""Fills the Scoop manifest template from the Windows release zip, and checks
a filled manifest the way Scoop would install from it.

    fill.py DIST_DIR --url-base URL [--homepage URL] [--out FILE]
    fill.py --install MANIFEST DIR

The first form reads DIST_DIR/SHA256SUMS (deploy/dist.sh writes it) and
writes the manifest (DIST_DIR/keyrelay.json unless --out) with the version,
the zip's URL (URL/keyrelay-VERSION-x86_64-pc-windows-gnu.zip: where the
release is published, or file:///... for a local try), its SHA-256 and the
directory inside it. It fails, naming it, when SHA256SUMS has no Windows
zip or a field is left unfilled, so a manifest with a placeholder is never
written.

The second does what `scoop install` does with MANIFEST, on any OS: fetches
the 64-bit url (file:// or a local path only), checks its hash, unpacks
it, takes extract_dir as the app's directory, checks that `bin` is there,
and prints that executable's path (tests/windows/run.sh then runs it under
Wine).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import re
import sys
import urllib.parse
import urllib.request
import zipfile
from pathlib import Path

TEMPLATE = Path(__file__).with_name("keyrelay.json")
TARGET = "x86_64-pc-windows-gnu"
ZIP = re.compile(rf"^keyrelay-(?P<version>[^-]+)-{TARGET}\.zip$")


class ManifestError(Exception):
    pass


def windows_zip(sums: Path) -> tuple[str, str, str]:
    """(zip name, version, sha256) of the Windows zip listed in SHA256SUMS."""
    if not sums.is_file():
        raise ManifestError(f"{sums} does not exist: run deploy/dist.sh first")
    for line in sums.read_text().splitlines():
        digest, _, name = line.partition("  ")
        match = ZIP.match(name.strip().lstrip("*"))
        if match:
            if not re.fullmatch(r"[0-9a-f]{64}", digest):
                raise ManifestError(f"{sums}: {digest!r} is not a SHA-256 for {name}")
            return name.strip(), match["version"], digest
    raise ManifestError(f"{sums} lists no {TARGET} zip: run deploy/dist.sh {TARGET}")


def fill(dist: Path, url_base: str, homepage: str) -> dict:
    name, version, digest = windows_zip(dist / "SHA256SUMS")
    values = {
        "@VERSION@": version,
        "@HOMEPAGE@": homepage,
        "@URL@": f"{url_base.rstrip('/')}/{name}",
        "@SHA256@": digest,
        "@EXTRACT_DIR@": name.removesuffix(".zip"),
    }

    def filled(value):
        if isinstance(value, dict):
            return {key: filled(item) for key, item in value.items()}
        if isinstance(value, list):
            return [filled(item) for item in value]
        if isinstance(value, str) and re.fullmatch(r"@[A-Z_0-9]+@", value):
            if value not in values:
                raise ManifestError(f"the template's field {value} has no value")
            return values[value]
        return value

    return filled(json.loads(TEMPLATE.read_text()))


def install(manifest_path: Path, into: Path) -> Path:
    manifest = json.loads(manifest_path.read_text())
    arch = manifest.get("architecture", {}).get("64bit")
    if not arch:
        raise ManifestError(f"{manifest_path} has no architecture.64bit")
    for field in ("version", "url", "hash", "extract_dir"):
        value = manifest.get(field) or arch.get(field)
        if not value or "@" in str(value):
            raise ManifestError(f"{manifest_path}: {field} is {value!r}")
    url = urllib.parse.urlparse(arch["url"])
    if url.scheme not in ("file", ""):
        raise ManifestError(f"--install fetches file:// URLs only, not {arch['url']}")
    data = Path(urllib.request.url2pathname(url.path)).read_bytes()
    digest = hashlib.sha256(data).hexdigest()
    if digest != arch["hash"].removeprefix("sha256:"):
        raise ManifestError(f"the zip's SHA-256 is {digest}, the manifest says {arch['hash']}")
    into.mkdir(parents=True, exist_ok=True)
    archive = into / Path(url.path).name
    archive.write_bytes(data)
    with zipfile.ZipFile(archive) as zipped:
        zipped.extractall(into / "unpacked")
    app = into / "unpacked" / arch["extract_dir"]
    if f"keyrelay-{manifest['version']}-" not in arch["extract_dir"]:
        raise ManifestError(f"extract_dir {arch['extract_dir']} is not version {manifest['version']}'s")
    exe = app / manifest["bin"]
    if not exe.is_file():
        raise ManifestError(f"bin {manifest['bin']} is not in the zip's {arch['extract_dir']}/")
    return exe


def main(argv: list[str]) -> int:
    if argv[:1] == ["--install"]:
        if len(argv) != 3:
            print(__doc__, file=sys.stderr)
            return 64
        try:
            print(install(Path(argv[1]), Path(argv[2])))
        except (ManifestError, OSError, zipfile.BadZipFile, json.JSONDecodeError) as err:
            print(f"fill.py --install: FAILED: {err}", file=sys.stderr)
            return 1
        return 0
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("dist", type=Path)
    parser.add_argument("--url-base", required=True, help="where the release files are published")
    parser.add_argument("--homepage", help="the manifest's homepage (default: --url-base)")
    parser.add_argument("--out", type=Path, help="default: DIST/keyrelay.json")
    args = parser.parse_args(argv)
    try:
        manifest = fill(args.dist, args.url_base, args.homepage or args.url_base)
    except (ManifestError, OSError, json.JSONDecodeError) as err:
        print(f"fill.py: FAILED: {err}", file=sys.stderr)
        return 1
    out = args.out or args.dist / "keyrelay.json"
    out.write_text(json.dumps(manifest, indent=4) + "\n")
    print(f"wrote {out}: version {manifest['version']}, {manifest['architecture']['64bit']['url']}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
