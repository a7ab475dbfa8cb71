#!/usr/bin/env python3
"""Checks the release archives deploy/dist.sh wrote.

    dist_check.py DIST_DIR VERSION TARGET...

For each Unix TARGET, DIST_DIR/keyrelay-VERSION-TARGET.tar.gz must:
  - be listed in DIST_DIR/SHA256SUMS with its true SHA-256, and nothing else be;
  - hold exactly one directory keyrelay-VERSION-TARGET/ with the binary (mode
    0755), README.md, LICENSE, keyrelay.1 and completions for bash, zsh and
    fish (mode 0644), owned by 0:0, with no path leaving the directory;
  - carry a binary for TARGET's operating system and processor (read from its
    ELF or Mach-O header), statically linked on Linux, and for macOS one that
    runs on MACOS_MINIMUM (build.sh's MACOSX_DEPLOYMENT_TARGET);
  - carry a man page that is roff for keyrelay VERSION and completions that
    name keyrelay's flags.
For a Windows TARGET, DIST_DIR/keyrelay-VERSION-TARGET.zip must likewise be
listed, hold exactly keyrelay-VERSION-TARGET/ with keyrelay.exe, README.md,
LICENSE and completions/keyrelay.ps1, and carry a console executable (PE
header) for TARGET's processor that loads only DLLs Windows itself ships:
no MinGW runtime (libgcc_s, libwinpthread) a user's machine would lack.

Prints one line per archive and exits 1 on the first failure.
"""

from __future__ import annotations

import hashlib
import sys
import tarfile
import zipfile
from pathlib import Path

sys.dont_write_bytecode = True  # no __pycache__ in deploy/ from the import below
from image_check import CheckFailed, binary_platform, expect

# Target triple parts to the names binary_platform() reports.
ARCHES = {"x86_64": "amd64", "aarch64": "arm64"}
SYSTEMS = {
    "unknown-linux-musl": "linux",
    "apple-darwin": "darwin",
    "pc-windows-gnu": "windows",
    "pc-windows-gnullvm": "windows",
}

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


WINDOWS_MEMBERS = ["keyrelay.exe", "README.md", "LICENSE", "completions/keyrelay.ps1"]

# DLLs every Windows 10 and later has; the api-ms-win-* API sets are too.
WINDOWS_DLLS = {
    "advapi32.dll", "bcrypt.dll", "bcryptprimitives.dll", "crypt32.dll", "kernel32.dll",
    "msvcrt.dll", "ntdll.dll", "ole32.dll", "secur32.dll", "shell32.dll", "ucrtbase.dll",
    "user32.dll", "userenv.dll", "ws2_32.dll",
}
IMAGE_SUBSYSTEM_WINDOWS_CUI = 3


def archive_name(version: str, target: str) -> str:
    """deploy/dist.sh's file name for TARGET: a zip for Windows, a tarball elsewhere."""
    suffix = ".zip" if expected_platform(target)[0] == "windows" else ".tar.gz"
    return f"keyrelay-{version}-{target}{suffix}"


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


def pe_imports(data: bytes) -> tuple[int, list[str]]:
    """(subsystem, imported DLL names, lowercased) of a PE32+ executable."""
    pe = int.from_bytes(data[0x3C:0x40], "little")
    sections = int.from_bytes(data[pe + 6:pe + 8], "little")
    optional = pe + 24
    expect(int.from_bytes(data[optional:optional + 2], "little") == 0x20B, "not a PE32+ (64-bit) executable")
    subsystem = int.from_bytes(data[optional + 68:optional + 70], "little")
    imports_rva = int.from_bytes(data[optional + 120:optional + 124], "little")  # data directory 1
    table = optional + int.from_bytes(data[pe + 20:pe + 22], "little")

    def offset(rva: int) -> int:
        for start in range(table, table + sections * 40, 40):
            size = max(int.from_bytes(data[start + 8:start + 12], "little"), int.from_bytes(data[start + 16:start + 20], "little"))
            address = int.from_bytes(data[start + 12:start + 16], "little")
            if address <= rva < address + size:
                return rva - address + int.from_bytes(data[start + 20:start + 24], "little")
        raise CheckFailed(f"RVA {rva:#x} is in no section")

    dlls = []
    if imports_rva:
        descriptor = offset(imports_rva)
        while any(data[descriptor:descriptor + 20]):  # an all-zero descriptor ends the table
            name = offset(int.from_bytes(data[descriptor + 12:descriptor + 16], "little"))
            dlls.append(data[name:data.index(b"\0", name)].decode("ascii").lower())
            descriptor += 20
    return subsystem, dlls


def check_windows_binary(exe: bytes, name: str) -> str:
    subsystem, dlls = pe_imports(exe)
    expect(subsystem == IMAGE_SUBSYSTEM_WINDOWS_CUI, f"{name} has subsystem {subsystem}, not a console program (3)")
    foreign = [dll for dll in dlls if dll not in WINDOWS_DLLS and not dll.startswith("api-ms-win-")]
    expect(not foreign, f"{name} needs DLLs Windows does not ship: {foreign}")
    return f"console, imports {len(dlls)} Windows DLLs"


def check_zip(archive: Path, top: str, target: str) -> str:
    with zipfile.ZipFile(archive) as zipped:
        names = zipped.namelist()
        wanted = [f"{top}/{name}" for name in WINDOWS_MEMBERS]
        expect(sorted(names) == sorted(wanted), f"{archive.name} holds {sorted(set(names) - set(wanted))} extra and lacks {sorted(set(wanted) - set(names))}")
        files = {name.removeprefix(f"{top}/"): zipped.read(name) for name in names}
    exe = files["keyrelay.exe"]
    system, arch, _ = binary_platform(exe, f"{archive.name}: keyrelay.exe")
    expect((system, arch) == expected_platform(target), f"{archive.name}: the binary is for {system}/{arch}, expected {expected_platform(target)}")
    loads = check_windows_binary(exe, f"{archive.name}: keyrelay.exe")
    script = files["completions/keyrelay.ps1"].decode()
    expect("Register-ArgumentCompleter" in script and "key-file" in script, f"{archive.name}: keyrelay.ps1 does not complete keyrelay's flags")
    return f"{system}/{arch} {loads}, binary {len(exe)} bytes"


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
        archives = {archive_name(version, target): target for target in targets}
        expect(set(sums) == set(archives), f"SHA256SUMS lists {sorted(sums)}, expected {sorted(archives)}")
        for name, target in archives.items():
            path = dist / name
            digest = hashlib.sha256(path.read_bytes()).hexdigest()
            expect(sums[name] == digest, f"{name}: SHA-256 {digest}, SHA256SUMS says {sums[name]}")
            top = f"keyrelay-{version}-{target}"
            if name.endswith(".zip"):
                summary = check_zip(path, top, target)
            else:
                summary = check_archive(path, top, target, version)
            print(f"  {name}: {path.stat().st_size} bytes, {summary}, sha256 {digest[:16]}...")
    except CheckFailed as err:
        print(f"dist_check.py: FAILED: {err}", file=sys.stderr)
        return 1
    except (OSError, tarfile.TarError, zipfile.BadZipFile) as err:
        print(f"dist_check.py: FAILED: {type(err).__name__}: {err}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
