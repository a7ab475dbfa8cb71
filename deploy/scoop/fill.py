#!/usr/bin/env python3
"""Fills the Scoop manifest template from the Windows release zip, and checks
a filled manifest the way Scoop would install from it.

    fill.py DIST_DIR --url-base URL [--homepage URL] [--out FILE]
    fill.py --install MANIFEST ARCH DIR      # ARCH: 64bit or arm64

The first form reads DIST_DIR/SHA256SUMS (deploy/dist.sh writes it) and
writes the manifest (DIST_DIR/keyrelay.json unless --out) with the version
and, for each architecture, its zip's URL (URL/keyrelay-VERSION-TARGET.zip:
where the release is published, or file:///... for a local try), SHA-256
and the directory inside it. It fails, naming it, when SHA256SUMS lacks a
zip the template names or a field is left unfilled, so a manifest with a
placeholder is never written.

The second does what `scoop install` does with MANIFEST on an ARCH
machine, on any OS: fetches that architecture's url (file:// only), checks
its hash, unpacks it, takes extract_dir as the app's directory, checks
that `bin` is there, and prints that executable's path
(tests/windows/run.sh then runs the 64bit one under Wine).
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
ZIP = re.compile(r"^keyrelay-(?P<version>[^-]+)-(?P<target>[a-z0-9_]+-pc-windows-[a-z]+)\.zip$")
FIELD = re.compile(r"@([A-Z_0-9]+)(?::([a-z0-9_-]+))?@")


class ManifestError(Exception):
    pass


def windows_zips(sums: Path) -> tuple[str, dict[str, tuple[str, str]]]:
    """The version and {target: (zip name, sha256)} of the Windows zips in SHA256SUMS."""
    if not sums.is_file():
        raise ManifestError(f"{sums} does not exist: run deploy/dist.sh first")
    versions, zips = set(), {}
    for line in sums.read_text().splitlines():
        digest, _, name = line.partition("  ")
        match = ZIP.match(name.strip().lstrip("*"))
        if not match:
            continue  # the tarballs
        if not re.fullmatch(r"[0-9a-f]{64}", digest):
            raise ManifestError(f"{sums}: {digest!r} is not a SHA-256 for {name}")
        versions.add(match["version"])
        zips[match["target"]] = (name.strip(), digest)
    if len(versions) != 1:
        raise ManifestError(f"{sums}: expected Windows zips of one version, found {sorted(versions)}")
    return versions.pop(), zips


def fill(dist: Path, url_base: str, homepage: str) -> dict:
    version, zips = windows_zips(dist / "SHA256SUMS")

    def value(field: str, target: str | None) -> str:
        if field == "VERSION" and not target:
            return version
        if field == "HOMEPAGE" and not target:
            return homepage
        if target and field in ("URL", "SHA256", "EXTRACT_DIR"):
            if target not in zips:
                raise ManifestError(f"no {target} zip in SHA256SUMS: run deploy/dist.sh {target}")
            name, digest = zips[target]
            return {
                "URL": f"{url_base.rstrip('/')}/{name}",
                "SHA256": digest,
                "EXTRACT_DIR": name.removesuffix(".zip"),
            }[field]
        raise ManifestError(f"the template's field @{field}{':' + target if target else ''}@ has no value")

    def filled(item):
        if isinstance(item, dict):
            return {key: filled(inner) for key, inner in item.items()}
        if isinstance(item, list):
            return [filled(inner) for inner in item]
        if isinstance(item, str):
            return FIELD.sub(lambda match: value(match[1], match[2]), item)
        return item

    return filled(json.loads(TEMPLATE.read_text()))


def install(manifest_path: Path, architecture: str, into: Path) -> Path:
    manifest = json.loads(manifest_path.read_text())
    arch = manifest.get("architecture", {}).get(architecture)
    if not arch:
        raise ManifestError(f"{manifest_path} has no architecture.{architecture}")
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
        if len(argv) != 4:
            print(__doc__, file=sys.stderr)
            return 64
        try:
            print(install(Path(argv[1]), argv[2], Path(argv[3])))
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
    urls = ", ".join(arch["url"] for arch in manifest["architecture"].values())
    print(f"wrote {out}: version {manifest['version']}, {urls}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
