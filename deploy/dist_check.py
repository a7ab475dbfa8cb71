#!/usr/bin/env python3
"""Checks the release archives deploy/dist.sh wrote.

    dist_check.py DIST_DIR VERSION TARGET...

For each TARGET, DIST_DIR/keyrelay-VERSION-TARGET.tar.gz must:
  - be listed in DIST_DIR/SHA256SUMS with its true SHA-256, and nothing else be;
  - hold exactly one directory keyrelay-VERSION-TARGET/ with the binary (mode
    0755), README.md, LICENSE, keyrelay.1 and completions for bash, zsh and
    fish (mode 0644), owned by 0:0, with no path leaving the directory;
  - carry a binary for TARGET's operating system and processor (read from its
    ELF or Mach-O header), statically linked on Linux, and for macOS one that
    runs on MACOS_MINIMUM (build.sh's MACOSX_DEPLOYMENT_TARGET);
  - carry a man page that is roff for keyrelay VERSION and completions that
    name keyrelay's flags.

Prints one line per archive and exits 1 on the first failure.
"""

from __future__ import annotations

import hashlib
import sys
import tarfile
from pathlib import Path

sys.dont_write_bytecode = True  # no __pycache__ in deploy/ from the import below
from image_check import CheckFailed, binary_platform, expect

# Target triple parts to the names binary_platform() reports.
ARCHES = {"x86_64": "amd64", "aarch64": "arm64"}
SYSTEMS = {"unknown-linux-musl": "linux", "apple-darwin": "darwin"}

# The oldest macOS the binaries must run on: deploy/build.sh's MACOSX_DEPLOYMENT_TARGET.
MACOS_MINIMUM = (11, 0)
LC_BUILD_VERSION = 0x32

MEMBERS = {
    "keyrelay": 0o755,
    "README.md": 0o644,
    "LICENSE": 0o644,
    "keyrelay.1": 0o644,
    "completions/keyrelay.bash": 0o644,
    "completions/_keyrelay": 0o644,
    "completions/keyrelay.fish": 0o644,
}


def expected_platform(target: str) -> tuple[str, str]:
    arch, _, rest = target.partition("-")
    expect(arch in ARCHES and rest in SYSTEMS, f"unknown target {target}")
    return SYSTEMS[rest], ARCHES[arch]


def macos_minimum(data: bytes) -> tuple[int, int]:
    """The minimum macOS version (major, minor) in a Mach-O file's LC_BUILD_VERSION."""
    ncmds = int.from_bytes(data[16:20], "little")
    offset = 32  # after the 64-bit Mach-O header
    for _ in range(ncmds):
        cmd = int.from_bytes(data[offset:offset + 4], "little")
        size = int.from_bytes(data[offset + 4:offset + 8], "little")
        if cmd == LC_BUILD_VERSION:
            version = int.from_bytes(data[offset + 12:offset + 16], "little")  # X.Y.Z as xxxx.yy.zz
            return version >> 16, (version >> 8) & 0xFF
        offset += size
    raise CheckFailed("the Mach-O file has no LC_BUILD_VERSION")


def check_archive(archive: Path, top: str, target: str, version: str) -> str:
    with tarfile.open(archive, "r:gz") as tar:
        members = tar.getmembers()
        names = {m.name for m in members}
        wanted = {top, f"{top}/completions"} | {f"{top}/{name}" for name in MEMBERS}
        expect(names == wanted, f"{archive.name} holds {sorted(names - wanted)} extra and lacks {sorted(wanted - names)}")
        files = {}
        for member in members:
            expect(member.uid == 0 and member.gid == 0, f"{archive.name}: {member.name} is owned by {member.uid}:{member.gid}")
            if member.isdir():
                continue
            relative = member.name.removeprefix(f"{top}/")
            expect(member.isfile(), f"{archive.name}: {member.name} is not a regular file")
            mode = member.mode & 0o777
            expect(mode == MEMBERS[relative], f"{archive.name}: {member.name} has mode {mode:o}, expected {MEMBERS[relative]:o}")
            files[relative] = tar.extractfile(member).read()

    system, arch, static = binary_platform(files["keyrelay"], f"{archive.name}: keyrelay")
    want_system, want_arch = expected_platform(target)
    expect(
        (system, arch) == (want_system, want_arch),
        f"{archive.name}: the binary is for {system}/{arch}, expected {want_system}/{want_arch}",
    )
    expect(system != "linux" or static, f"{archive.name}: the Linux binary is dynamically linked")
    runs_on = "static" if static else ""
    if system == "darwin":
        minimum = macos_minimum(files["keyrelay"])
        expect(minimum <= MACOS_MINIMUM, f"{archive.name}: the binary needs macOS {minimum}, expected {MACOS_MINIMUM} or older")
        runs_on = f"macOS {minimum[0]}.{minimum[1]}+"

    page = files["keyrelay.1"].decode()
    expect(f'.TH keyrelay 1  "keyrelay {version}"' in page, f"{archive.name}: keyrelay.1 is not the man page of keyrelay {version}")
    for name, data in files.items():
        if name.startswith("completions/"):
            script = data.decode()
            expect("upstream" in script and "key-file" in script, f"{archive.name}: {name} does not complete keyrelay's flags")
    binary_size = len(files["keyrelay"])
    return f"{system}/{arch} {runs_on}, binary {binary_size} bytes"


def main(argv: list[str]) -> int:
    if len(argv) < 3:
        print(__doc__, file=sys.stderr)
        return 64
    dist, version, targets = Path(argv[0]), argv[1], argv[2:]
    try:
        sums = {}
        for line in (dist / "SHA256SUMS").read_text().splitlines():
            digest, _, name = line.partition("  ")
            sums[name] = digest
        archives = {f"keyrelay-{version}-{target}.tar.gz": target for target in targets}
        expect(set(sums) == set(archives), f"SHA256SUMS lists {sorted(sums)}, expected {sorted(archives)}")
        for name, target in archives.items():
            path = dist / name
            digest = hashlib.sha256(path.read_bytes()).hexdigest()
            expect(sums[name] == digest, f"{name}: SHA-256 {digest}, SHA256SUMS says {sums[name]}")
            summary = check_archive(path, name.removesuffix(".tar.gz"), target, version)
            print(f"  {name}: {path.stat().st_size} bytes, {summary}, sha256 {digest[:16]}...")
    except CheckFailed as err:
        print(f"dist_check.py: FAILED: {err}", file=sys.stderr)
        return 1
    except (OSError, tarfile.TarError) as err:
        print(f"dist_check.py: FAILED: {type(err).__name__}: {err}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
