#!/usr/bin/env python3
"""Checks the service files in deploy/ that Linux CI cannot run for real.
deploy/services_check.sh calls it; each check fails with what it expected
and what it saw, and exits 1.

    check_services.py plist
        deploy/launchd/com.keyrelay.agent.plist, read with plistlib (plutil
        is macOS-only): Label, ProgramArguments naming the keyrelay-agent
        wrapper, KeepAlive, RunAtLoad, logs under ~/Library/Logs/keyrelay/,
        every home path written as /Users/YOU (the README's install step
        replaces it), KEYRELAY_* variables that are keyrelay settings.

    check_services.py agent
        deploy/launchd/keyrelay-agent, run with stand-ins for macOS's
        `security` and for keyrelay: the Keychain's key reaches keyrelay in
        its key variable and never its command line; a missing item stops it
        with exit 78 and the command that adds one; KEYRELAY_KEY_FILE skips
        the Keychain; ~/.config/keyrelay/keyrelay.toml becomes --config.

    check_services.py formula FORMULA DIST_DIR URL_BASE
        A formula filled by deploy/homebrew/fill.py, loaded by Ruby with a
        stand-in for Homebrew's DSL (deploy/homebrew/formula_facts.rb): one
        url per macOS/Linux x arm64/x86_64, each the archive of that target
        under URL_BASE, with the SHA-256 SHA256SUMS lists and the archive
        really has; the version of the archives; every file install() takes
        is in every archive; no template field left.

    check_services.py syscalls UNIT STRACE_OUT
        Every system call keyrelay made in STRACE_OUT (`strace -f -o`) is
        one UNIT's SystemCallFilter= lines allow, groups expanded by
        `systemd-analyze syscall-filter`, and every socket family it opened
        is in RestrictAddressFamilies=: the unit would not refuse them.

    check_services.py self-test
        Proves the plist and formula checks fail on a broken file.

Only python3's standard library (and ruby for `formula`).
"""

from __future__ import annotations

import hashlib
import json
import os
import plistlib
import re
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PLIST = ROOT / "deploy/launchd/com.keyrelay.agent.plist"
AGENT = ROOT / "deploy/launchd/keyrelay-agent"
FACTS = ROOT / "deploy/homebrew/formula_facts.rb"
HOME = "/Users/YOU"
LOGS = f"{HOME}/Library/Logs/keyrelay/"
# Homebrew's names for the platforms each release target runs on.
PLATFORMS = {
    ("macos", "arm64"): "aarch64-apple-darwin",
    ("macos", "x86_64"): "x86_64-apple-darwin",
    ("linux", "arm64"): "aarch64-unknown-linux-musl",
    ("linux", "x86_64"): "x86_64-unknown-linux-musl",
}


class CheckFailed(Exception):
    """A check did not hold; the message says what was expected and seen."""


def expect(condition: bool, message: str) -> None:
    if not condition:
        raise CheckFailed(message)


def setting_keys() -> set[str]:
    """keyrelay's setting names, from the SETTINGS table in src/."""
    text = (ROOT / "src/config/settings.rs").read_text()
    keys = set(re.findall(r'^\s*key: "([a-z0-9_]+)",$', text, re.MULTILINE))
    expect(len(keys) > 20, "cannot read keyrelay's SETTINGS table in src/config/settings.rs")
    return keys


# ------------------------------------------------------------------- launchd


def check_plist(plist: dict) -> None:
    label = plist.get("Label")
    expect(isinstance(label, str) and re.fullmatch(r"[a-z]+(\.[a-z]+)+", label or "") is not None,
           f"Label should be a reverse-DNS name, is {label!r}")
    args = plist.get("ProgramArguments")
    expect(isinstance(args, list) and args and all(isinstance(a, str) for a in args),
           f"ProgramArguments should be a list of strings, is {args!r}")
    expect(args[0].startswith("/") and args[0].endswith("/keyrelay-agent"),
           f"ProgramArguments should start with the keyrelay-agent wrapper's absolute path, starts with {args[0]!r}")
    keep_alive = plist.get("KeepAlive")
    expect(keep_alive is True or (isinstance(keep_alive, dict) and keep_alive.get("SuccessfulExit") is False),
           f"KeepAlive should restart keyrelay when it dies (true, or SuccessfulExit false), is {keep_alive!r}")
    expect(plist.get("RunAtLoad") is True, "RunAtLoad should be true (start at login)")
    for key in ("StandardOutPath", "StandardErrorPath"):
        path = plist.get(key)
        expect(isinstance(path, str) and path.startswith(LOGS) and path.endswith(".log"),
               f"{key} should be a .log file under {LOGS}, is {path!r}")
    env = plist.get("EnvironmentVariables", {})
    expect(isinstance(env, dict) and all(isinstance(v, str) for v in env.values()),
           "EnvironmentVariables should map names to strings")
    settings = setting_keys()
    for name in env:
        if name.startswith("KEYRELAY_"):
            expect(name.removeprefix("KEYRELAY_").lower() in settings,
                   f"EnvironmentVariables: {name} is not a keyrelay setting (keyrelay refuses unknown ones)")
        expect(not re.search(r"API_KEY|TOKEN|SECRET", name) or name == "KEYRELAY_KEY_ENV",
               f"EnvironmentVariables: {name} looks like a secret; the key comes from the Keychain")
    # launchd expands neither ~ nor $HOME: every path in the file is absolute,
    # and a home directory is written as the placeholder the install replaces.
    strings = [*args, *env.values(), plist["StandardOutPath"], plist["StandardErrorPath"]]
    for text in strings:
        expect("~" not in text and "$" not in text, f"launchd does not expand ~ or $: {text!r}")
        for home in re.findall(r"/Users/[^/:]+", text):
            expect(home == HOME, f"home directories should be written {HOME} (the install step replaces it): {text!r}")


def plist_command() -> None:
    with PLIST.open("rb") as file:
        check_plist(plistlib.load(file))
    print(f"plist: {PLIST.relative_to(ROOT)} is well formed and complete")


def run_agent(home: Path, stub_bin: Path, env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run(
        ["/bin/sh", str(AGENT), "--workers", "1"],
        env={"PATH": f"{stub_bin}:/usr/bin:/bin", "HOME": str(home), **env},
        capture_output=True, text=True, timeout=30,
    )


def agent_command() -> None:
    key = "kr-agent-KEY-1b2c3d"
    with tempfile.TemporaryDirectory() as tmp:
        home, stub_bin = Path(tmp, "home"), Path(tmp, "bin")
        home.mkdir()
        stub_bin.mkdir()
        # `security find-generic-password -s SERVICE -w` prints the password
        # of the item SERVICE, or fails (exit 44) when there is none.
        (stub_bin / "security").write_text(
            '#!/bin/sh\n[ "$1 $2 $3 $4" = "find-generic-password -s keyrelay -w" ] || exit 2\n'
            f'[ -n "${{NO_ITEM:-}}" ] && {{ echo "security: item not found" >&2; exit 44; }}\necho "{key}"\n')
        # keyrelay's stand-in reports what it was given.
        (stub_bin / "keyrelay").write_text(
            '#!/bin/sh\necho "args=$*"\necho "BASETEN_API_KEY=${BASETEN_API_KEY:-}"\necho "MY_KEY=${MY_KEY:-}"\n')
        for stub in stub_bin.iterdir():
            stub.chmod(0o755)

        run = run_agent(home, stub_bin, {})
        expect(run.returncode == 0, f"agent with a Keychain item: exit {run.returncode}, stderr {run.stderr!r}")
        expect(f"BASETEN_API_KEY={key}\n" in run.stdout, f"the key should reach BASETEN_API_KEY: {run.stdout!r}")
        expect(key not in run.stdout.split("\n")[0], f"the key must not be on the command line: {run.stdout!r}")
        expect(run.stdout.startswith("args=--workers 1\n"), f"arguments pass through: {run.stdout!r}")

        run = run_agent(home, stub_bin, {"KEYRELAY_KEY_ENV": "MY_KEY"})
        expect(f"MY_KEY={key}\n" in run.stdout and "BASETEN_API_KEY=\n" in run.stdout,
               f"KEYRELAY_KEY_ENV names the variable the key goes in: {run.stdout!r}")

        run = run_agent(home, stub_bin, {"NO_ITEM": "1"})
        expect(run.returncode == 78, f"no Keychain item: exit 78 (EX_CONFIG), got {run.returncode}")
        expect("security add-generic-password -s keyrelay" in run.stderr,
               f"no Keychain item: the error says how to add one: {run.stderr!r}")
        expect("args=" not in run.stdout, "no Keychain item: keyrelay is not started")

        run = run_agent(home, stub_bin, {"NO_ITEM": "1", "KEYRELAY_KEY_FILE": "/k"})
        expect(run.returncode == 0 and "BASETEN_API_KEY=\n" in run.stdout,
               f"KEYRELAY_KEY_FILE: the Keychain is not read: exit {run.returncode}, {run.stdout!r}")

        config = home / ".config/keyrelay/keyrelay.toml"
        config.parent.mkdir(parents=True)
        config.write_text("")
        run = run_agent(home, stub_bin, {})
        expect(f"args=--config {config} --workers 1\n" in run.stdout,
               f"an existing keyrelay.toml is passed as --config: {run.stdout!r}")
    print("agent: keyrelay-agent passes the Keychain's key in the environment, fails clearly without one")


# ------------------------------------------------------------- system calls


def syscall_groups() -> dict[str, list[str]]:
    """systemd's system call groups (@name: members, groups among them)."""
    text = subprocess.run(["systemd-analyze", "syscall-filter", "--no-pager"],
                          capture_output=True, text=True, check=True).stdout
    groups: dict[str, list[str]] = {}
    current = None
    for line in text.splitlines():
        if line.startswith("@"):
            current = groups.setdefault(line.split()[0], [])
        elif current is not None and line.strip() and not line.strip().startswith("#"):
            current.append(line.split()[0])
    expect("@system-service" in groups, "systemd-analyze syscall-filter lists no @system-service group")
    return groups


def expand(names: list[str], groups: dict[str, list[str]]) -> set[str]:
    calls: set[str] = set()
    for name in names:
        calls |= expand(groups[name], groups) if name.startswith("@") else {name}
    return calls


def allowed_syscalls(unit: str, groups: dict[str, list[str]]) -> set[str]:
    """What a unit's SystemCallFilter= lines allow: the allow lists, less the ~ deny lists."""
    allowed: set[str] | None = None
    denied: set[str] = set()
    for line in unit.splitlines():
        if not line.startswith("SystemCallFilter="):
            continue
        value = line.removeprefix("SystemCallFilter=")
        if value.startswith("~"):
            denied |= expand(value[1:].split(), groups)
        else:
            allowed = (allowed or set()) | expand(value.split(), groups)
    expect(allowed is not None, "the unit has no SystemCallFilter= allow list")
    return allowed - denied


def traced_syscalls(strace_out: str) -> set[str]:
    calls = set()
    for line in strace_out.splitlines():
        line = re.sub(r"^\d+ +", "", line)
        match = re.match(r"(?:<\.\.\. )?([a-z0-9_]+)(?:\(| resumed>)", line)
        if match:
            calls.add(match[1])
    return calls


def syscalls_command(unit: Path, strace_out: Path) -> None:
    allowed = allowed_syscalls(unit.read_text(), syscall_groups())
    made = traced_syscalls(strace_out.read_text())
    expect(len(made) > 20, f"{strace_out} records only {sorted(made)}: did strace run keyrelay?")
    refused = sorted(made - allowed)
    expect(not refused, f"{unit.name}'s SystemCallFilter= would refuse {refused} (EPERM), which keyrelay calls")
    families = set(re.findall(r"\bsocket(?:pair)?\((AF_[A-Z0-9]+)", strace_out.read_text()))
    allowed_families = {family for line in unit.read_text().splitlines()
                        if line.startswith("RestrictAddressFamilies=")
                        for family in line.removeprefix("RestrictAddressFamilies=").split()}
    expect(families <= allowed_families,
           f"{unit.name}'s RestrictAddressFamilies= would refuse {sorted(families - allowed_families)}, "
           "which keyrelay opens sockets of (tokio's signal handling uses a Unix socket pair)")
    print(f"syscalls: the {len(made)} system calls and the socket families {sorted(families)} keyrelay "
          f"used are all allowed by {unit.name}")


# ------------------------------------------------------------------ Homebrew


def formula_facts(formula: Path) -> dict:
    run = subprocess.run(["ruby", str(FACTS), str(formula)], capture_output=True, text=True, timeout=60)
    expect(run.returncode == 0, f"ruby could not load {formula}: {run.stderr.strip()}")
    return json.loads(run.stdout)


def read_sums(dist: Path) -> dict[str, str]:
    sums = {}
    for line in (dist / "SHA256SUMS").read_text().splitlines():
        digest, _, name = line.partition("  ")
        sums[name.strip().lstrip("*")] = digest
    return sums


def check_formula(facts: dict, dist: Path, url_base: str) -> None:
    text = json.dumps(facts)
    expect(re.search(r"@[A-Za-z0-9_.-]+@", text) is None, f"a template field is left unfilled: {text}")
    sums = read_sums(dist)
    urls = facts["urls"]
    platforms = [(u.get("os"), u.get("arch")) for u in urls]
    expect(sorted(platforms) == sorted(PLATFORMS),
           f"one url for each of {sorted(PLATFORMS)}, found {sorted(platforms, key=str)}")
    version = facts.get("version")
    for entry in urls:
        target = PLATFORMS[(entry["os"], entry["arch"])]
        name = f"keyrelay-{version}-{target}.tar.gz"
        expect(entry["url"] == f"{url_base.rstrip('/')}/{name}",
               f"{entry['os']}/{entry['arch']} should fetch {url_base}/{name}, fetches {entry['url']}")
        expect(sums.get(name) == entry.get("sha256"),
               f"{name}: sha256 {entry.get('sha256')} in the formula, {sums.get(name)} in SHA256SUMS")
        archive = dist / name
        expect(archive.is_file(), f"{archive} is missing")
        actual = hashlib.sha256(archive.read_bytes()).hexdigest()
        expect(actual == entry["sha256"], f"{name}: the archive's SHA-256 is {actual}, the formula says {entry['sha256']}")
        with tarfile.open(archive, "r:gz") as tar:
            names = set(tar.getnames())
        top = f"keyrelay-{version}-{target}"
        for install in facts["installs"]:
            expect(f"{top}/{install['file']}" in names,
                   f"install() takes {install['file']} into {install['dir']}, which {name} lacks")
    expect({i["dir"] for i in facts["installs"]} >= {"bin", "man1"}, "install() should install the binary and man page")


def formula_command(formula: Path, dist: Path, url_base: str) -> None:
    check_formula(formula_facts(formula), dist, url_base)
    print(f"formula: {formula} installs each of the 4 archives in {dist} with its true SHA-256")


# ----------------------------------------------------------------- self-test


def fails(check, *args) -> bool:
    try:
        check(*args)
    except CheckFailed:
        return True
    return False


def self_test() -> None:
    with PLIST.open("rb") as file:
        good = plistlib.load(file)
    check_plist(good)
    broken = {
        "no KeepAlive": {k: v for k, v in good.items() if k != "KeepAlive"},
        "logs elsewhere": {**good, "StandardErrorPath": f"{HOME}/keyrelay.log"},
        "a tilde": {**good, "ProgramArguments": ["~/.local/bin/keyrelay-agent"]},
        "a real home": {**good, "StandardOutPath": "/Users/alice/Library/Logs/keyrelay/out.log"},
        "an unknown setting": {**good, "EnvironmentVariables": {"KEYRELAY_UPSTREEM": "x"}},
        "a key in the plist": {**good, "EnvironmentVariables": {"BASETEN_API_KEY": "x"}},
    }
    for what, plist in broken.items():
        expect(fails(check_plist, plist), f"self-test: the plist check passed a plist with {what}")

    facts = {
        "version": "1.0.0",
        "urls": [{"os": os_, "arch": arch, "url": f"file:///d/keyrelay-1.0.0-{target}.tar.gz", "sha256": "0" * 64}
                 for (os_, arch), target in PLATFORMS.items()],
        "installs": [{"dir": "bin", "file": "keyrelay"}, {"dir": "man1", "file": "keyrelay.1"}],
    }
    with tempfile.TemporaryDirectory() as tmp:
        dist = Path(tmp)
        lines = []
        for entry in facts["urls"]:
            top = entry["url"].rsplit("/", 1)[1].removesuffix(".tar.gz")
            for member in ("keyrelay", "keyrelay.1"):
                Path(tmp, top).mkdir(exist_ok=True)
                Path(tmp, top, member).write_text(member)
            archive = dist / f"{top}.tar.gz"
            with tarfile.open(archive, "w:gz") as tar:
                tar.add(Path(tmp, top), arcname=top)
            entry["sha256"] = hashlib.sha256(archive.read_bytes()).hexdigest()
            lines.append(f"{entry['sha256']}  {archive.name}")
        (dist / "SHA256SUMS").write_text("\n".join(lines) + "\n")
        check_formula(facts, dist, "file:///d")
        wrong_sum = json.loads(json.dumps(facts))
        wrong_sum["urls"][0]["sha256"] = "1" * 64
        wrong_target = json.loads(json.dumps(facts))
        wrong_target["urls"][0]["url"], wrong_target["urls"][1]["url"] = facts["urls"][1]["url"], facts["urls"][0]["url"]
        missing = json.loads(json.dumps(facts))
        missing["urls"].pop()
        unfilled = json.loads(json.dumps(facts))
        unfilled["version"] = "@VERSION@"
        absent_file = json.loads(json.dumps(facts))
        absent_file["installs"].append({"dir": "fish_completion", "file": "completions/keyrelay.fish"})
        for what, broken_facts in {
            "a wrong sha256": wrong_sum, "swapped targets": wrong_target, "a missing platform": missing,
            "an unfilled field": unfilled, "an install of a file the archive lacks": absent_file,
        }.items():
            expect(fails(check_formula, broken_facts, dist, "file:///d"),
                   f"self-test: the formula check passed a formula with {what}")
    groups = {"@a": ["read", "@b"], "@b": ["write"], "@c": ["reboot"]}
    unit = "SystemCallFilter=@a @c\nSystemCallFilter=~@c\n"
    expect(allowed_syscalls(unit, groups) == {"read", "write"}, "self-test: groups or ~ lists are misread")
    traced = '12 read(3, "", 1) = 0\n13 <... reboot resumed>) = 0\n+++ exited with 0 +++\n'
    expect(traced_syscalls(traced) == {"read", "reboot"}, "self-test: strace lines are misread")
    print(f"self-test: the plist check fails on {len(broken)} broken plists, the formula check on 5 "
          "broken formulas, the system call check reads groups, ~ lists and strace lines")


def main(argv: list[str]) -> int:
    commands = {
        "plist": (plist_command, 0),
        "agent": (agent_command, 0),
        "formula": (lambda f, d, u: formula_command(Path(f), Path(d), u), 3),
        "syscalls": (lambda u, t: syscalls_command(Path(u), Path(t)), 2),
        "self-test": (self_test, 0),
    }
    if not argv or argv[0] not in commands or len(argv) - 1 != commands[argv[0]][1]:
        print(__doc__, file=sys.stderr)
        return 2
    command, _ = commands[argv[0]]
    try:
        command(*argv[1:])
    except CheckFailed as err:
        print(f"check_services {argv[0]}: FAILED: {err}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.dont_write_bytecode = True
    sys.exit(main(sys.argv[1:]))
