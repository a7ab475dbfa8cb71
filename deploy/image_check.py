#!/usr/bin/env python3
"""Helpers for deploy/image.sh: derive, inspect and exercise the container image.

    image_check.py containerfile DOCKERFILE
        Print the Dockerfile's final stage as a Containerfile that copies a
        locally built binary (build context: a directory holding `keyrelay`)
        instead of `COPY --from=build`. Everything else is the Dockerfile's own
        text, so the image built from it cannot drift from the Dockerfile.

    image_check.py config DOCKERFILE INSPECT_JSON ROOTFS --arch=ARCH [--build-arg=NAME=VALUE...]
        Check the built image (`buildah inspect --type image` output and its
        mounted root filesystem) against the Dockerfile: user, entrypoint, cmd,
        healthcheck, environment, ports, labels, that the image holds only
        /keyrelay, and that the image and its static binary are linux/ARCH
        (amd64, arm64).

    image_check.py pushed DIR IMAGE_INSPECT_JSON...
        Check a manifest list pushed with its images to DIR (`buildah manifest
        push --all --format v2s2 LIST dir:DIR`, what a registry receives): the
        list names each image (by its manifest digest) once, for its own
        platform, and nothing else, and each pushed image's config has that
        platform's architecture, the Dockerfile's entrypoint and HEALTHCHECK.

    image_check.py smoke INSPECT_JSON SECRET_DIR -- RUN_PREFIX...
        Run the image's entrypoint through RUN_PREFIX (e.g. `buildah run
        --isolation chroot -v SECRET_DIR:/var/run/secrets/keyrelay:ro CTR --`)
        in front of a mock upstream on 127.0.0.1, and check: admin /healthz,
        /readyz, /metrics; the image's HEALTHCHECK command (passing, and failing
        when nothing answers); a streamed response arriving token by token with
        the key from the mounted key file injected and the client's own
        credential removed; key rotation through the file; SIGTERM turning
        /readyz to 503 and ending in exit status 0. For an image of another
        architecture RUN_PREFIX ends with a qemu-user emulator mounted into the
        container (`... CTR -- /qemu-aarch64-static`).

Every failure prints what was expected and what was seen, and exits 1.
Everything listens on 127.0.0.1 only.
"""

from __future__ import annotations

import http.client
import json
import os
import re
import secrets
import shlex
import signal
import socket
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

# What the final stage copies from the build stage, and what replaces it here.
BUILD_COPY = "COPY --from=build /keyrelay /keyrelay"
LOCAL_COPY = "COPY keyrelay /keyrelay"

# Where the smoke test mounts the key file inside the container (as in the
# Kubernetes examples).
SECRET_MOUNT = "/var/run/secrets/keyrelay"
KEY_NAME = "api-key"

TOKENS = ["The", " mistral", " is", " a", " cold", " wind."]
TOKEN_GAP = 0.3  # seconds between tokens sent by the mock upstream


class CheckFailed(Exception):
    """A check did not hold; the message says what was expected and seen."""


def expect(condition: bool, message: str) -> None:
    if not condition:
        raise CheckFailed(message)


# ---------------------------------------------------------------- Dockerfile


def logical_lines(text: str) -> list[str]:
    """Dockerfile instructions with continuation lines joined, comments dropped."""
    lines, current = [], ""
    for raw in text.splitlines():
        stripped = raw.strip()
        if not current and (not stripped or stripped.startswith("#")):
            continue
        if current and stripped.startswith("#"):
            continue  # comment inside a continued instruction
        if stripped.endswith("\\"):
            current += stripped[:-1].rstrip() + " "
            continue
        current += stripped
        lines.append(current.strip())
        current = ""
    if current.strip():
        lines.append(current.strip())
    return lines


def final_stage(dockerfile: Path) -> list[str]:
    lines = logical_lines(dockerfile.read_text())
    starts = [i for i, line in enumerate(lines) if line.upper().startswith("FROM ")]
    expect(bool(starts), f"{dockerfile}: no FROM instruction")
    stage = lines[starts[-1]:]
    expect(
        stage[0].split()[1] == "scratch",
        f"{dockerfile}: the final stage must be FROM scratch, found {stage[0]!r}",
    )
    return stage


def containerfile(dockerfile: Path) -> str:
    stage = final_stage(dockerfile)
    copies = [line for line in stage if line == BUILD_COPY]
    expect(
        len(copies) == 1,
        f"{dockerfile}: the final stage must contain exactly one {BUILD_COPY!r} "
        f"(deploy/image.sh swaps it for the locally built binary); found {len(copies)}",
    )
    others = [line for line in stage if line.upper().startswith(("COPY", "ADD", "RUN"))]
    expect(
        others == copies,
        f"{dockerfile}: the final stage may only COPY the binary (no RUN/ADD in a scratch "
        f"image); found {others}",
    )
    body = [LOCAL_COPY if line == BUILD_COPY else line for line in stage]
    return (
        "# Generated by deploy/image_check.py from the Dockerfile's final stage; do not edit.\n"
        + "\n".join(body)
        + "\n"
    )


def instruction_args(stage: list[str], name: str) -> list[str]:
    """The argument text of every `name` instruction in the stage."""
    prefix = name.upper() + " "
    return [line[len(prefix):].strip() for line in stage if line.upper().startswith(prefix)]


def key_values(text: str) -> dict[str, str]:
    """KEY=VALUE pairs as written in ENV and LABEL (values may be double-quoted)."""
    pairs = {}
    for key, quoted, bare in re.findall(r'([\w.\-]+)=(?:"((?:[^"\\]|\\.)*)"|(\S+))', text):
        pairs[key] = quoted if quoted or not bare else bare
    return pairs


def dockerfile_expectations(dockerfile: Path, build_args: dict[str, str]) -> dict:
    stage = final_stage(dockerfile)
    users = instruction_args(stage, "USER")
    entrypoints = instruction_args(stage, "ENTRYPOINT")
    cmds = instruction_args(stage, "CMD")
    healthchecks = instruction_args(stage, "HEALTHCHECK")
    expect(len(users) == 1, f"Dockerfile final stage: expected one USER, found {users}")
    expect(len(entrypoints) == 1, f"Dockerfile final stage: expected one ENTRYPOINT, found {entrypoints}")
    expect(len(healthchecks) == 1, f"Dockerfile final stage: expected one HEALTHCHECK, found {healthchecks}")
    health = healthchecks[0]
    options = dict(re.findall(r"--([\w-]+)=(\S+)", health))
    exec_form = re.search(r"(?:^|\s)CMD\s+(\[.*\])$", health)
    expect(exec_form is not None, f"HEALTHCHECK needs CMD in exec (JSON) form: {health!r}")
    health_cmd = ["CMD"] + json.loads(exec_form.group(1))
    env: dict[str, str] = {}
    for text in instruction_args(stage, "ENV"):
        env.update(key_values(text))
    labels: dict[str, str] = {}
    for text in instruction_args(stage, "LABEL"):
        labels.update(key_values(text))
    args = {}
    for text in instruction_args(stage, "ARG"):
        name, _, default = text.partition("=")
        args[name] = default
    args.update(build_args)
    labels = {k: re.sub(r"\$\{(\w+)\}", lambda m: args.get(m.group(1), ""), v) for k, v in labels.items()}
    ports = set()
    for text in instruction_args(stage, "EXPOSE"):
        for port in text.split():
            ports.add(port if "/" in port else f"{port}/tcp")
    return {
        "user": users[0],
        "entrypoint": json.loads(entrypoints[0]),
        "cmd": json.loads(cmds[0]) if cmds else [],
        "health_cmd": health_cmd,
        "health_options": options,
        "env": env,
        "labels": labels,
        "ports": ports,
    }


def go_duration(text: str) -> int:
    """Dockerfile HEALTHCHECK durations (e.g. 15s, 1m30s) in nanoseconds."""
    units = {"ms": 10**6, "s": 10**9, "m": 60 * 10**9, "h": 3600 * 10**9}
    parts = re.findall(r"(\d+)(ms|s|m|h)", text)
    expect(bool(parts) and "".join(a + b for a, b in parts) == text, f"bad duration {text!r}")
    return sum(int(amount) * units[unit] for amount, unit in parts)


def check_config(dockerfile: Path, inspect_path: Path, rootfs: Path, arch: str, build_args: dict[str, str]) -> None:
    want = dockerfile_expectations(dockerfile, build_args)
    inspect = json.loads(inspect_path.read_text())
    config = inspect["Docker"]["config"]
    oci = inspect["OCIv1"]["config"]
    for source, image in (("Docker", inspect["Docker"]), ("OCI", inspect["OCIv1"])):
        platform = f"{image.get('os')}/{image.get('architecture')}"
        expect(platform == f"linux/{arch}", f"image ({source}) platform is {platform}, expected linux/{arch}")

    # The fixed promises, whatever the Dockerfile says.
    expect(want["user"] == "65532:65532", f"Dockerfile USER is {want['user']!r}, expected 65532:65532")
    expect(want["entrypoint"] == ["/keyrelay"], f"Dockerfile ENTRYPOINT is {want['entrypoint']}")
    expect(
        want["health_cmd"] == ["CMD", "/keyrelay", "health"],
        f"Dockerfile HEALTHCHECK is {want['health_cmd']}, expected CMD [\"/keyrelay\", \"health\"]",
    )
    expect(
        want["env"].get("KEYRELAY_ADMIN_LISTEN") == "127.0.0.1:9901",
        "Dockerfile must set KEYRELAY_ADMIN_LISTEN=127.0.0.1:9901 (where `keyrelay health` looks by default); "
        f"found {want['env'].get('KEYRELAY_ADMIN_LISTEN')!r}",
    )
    expect(
        want["env"].get("KEYRELAY_LISTEN", "127.0.0.1:8080") == "127.0.0.1:8080",
        f"Dockerfile KEYRELAY_LISTEN is {want['env'].get('KEYRELAY_LISTEN')!r}, expected loopback 127.0.0.1:8080",
    )

    # The built image agrees with the Dockerfile.
    for source, cfg in (("Docker", config), ("OCI", oci)):
        expect(cfg.get("User") == want["user"], f"image ({source}) User is {cfg.get('User')!r}, Dockerfile says {want['user']!r}")
        expect(
            cfg.get("Entrypoint") == want["entrypoint"],
            f"image ({source}) Entrypoint is {cfg.get('Entrypoint')}, Dockerfile says {want['entrypoint']}",
        )
        expect(
            (cfg.get("Cmd") or []) == want["cmd"],
            f"image ({source}) Cmd is {cfg.get('Cmd')}, Dockerfile says {want['cmd']}",
        )
        image_env = dict(item.split("=", 1) for item in cfg.get("Env") or [])
        for key, value in want["env"].items():
            expect(image_env.get(key) == value, f"image ({source}) env {key}={image_env.get(key)!r}, Dockerfile says {value!r}")
        extra = sorted(k for k in image_env if k.startswith("KEYRELAY_") and k not in want["env"])
        expect(not extra, f"image ({source}) has KEYRELAY_ variables the Dockerfile does not set: {extra}")
        ports = set((cfg.get("ExposedPorts") or {}).keys())
        expect(ports == want["ports"], f"image ({source}) exposes {sorted(ports)}, Dockerfile says {sorted(want['ports'])}")
        labels = cfg.get("Labels") or {}
        for key, value in want["labels"].items():
            expect(labels.get(key) == value, f"image ({source}) label {key}={labels.get(key)!r}, Dockerfile says {value!r}")

    health = config.get("Healthcheck") or {}
    expect(
        health.get("Test") == want["health_cmd"],
        f"image Healthcheck.Test is {health.get('Test')}, Dockerfile says {want['health_cmd']} "
        "(HEALTHCHECK needs the docker image format: buildah bud --format docker)",
    )
    fields = {"interval": "Interval", "timeout": "Timeout", "start-period": "StartPeriod"}
    for option, field in fields.items():
        if option in want["health_options"]:
            expected = go_duration(want["health_options"][option])
            expect(health.get(field) == expected, f"image Healthcheck.{field} is {health.get(field)}, Dockerfile says {expected}")
    if "retries" in want["health_options"]:
        expected = int(want["health_options"]["retries"])
        expect(health.get("Retries") == expected, f"image Healthcheck.Retries is {health.get('Retries')}, Dockerfile says {expected}")

    # Nothing but the binary in the image.
    files = sorted(
        "/" + str(path.relative_to(rootfs)) for path in rootfs.rglob("*") if not path.is_dir()
    )
    expect(files == ["/keyrelay"], f"image files are {files}, expected only ['/keyrelay']")
    binary = rootfs / "keyrelay"
    expect(os.access(binary, os.X_OK), "/keyrelay in the image is not executable")
    system, machine, static = binary_platform(binary.read_bytes(), "/keyrelay")
    expect(
        (system, machine) == ("linux", arch),
        f"/keyrelay is a {system}/{machine} binary in a linux/{arch} image",
    )
    expect(static, "/keyrelay is dynamically linked; a scratch image needs a static binary")
    print(
        f"linux/{arch} image config agrees with the Dockerfile: user {want['user']}, entrypoint {want['entrypoint']}, "
        f"healthcheck {want['health_cmd']}, env {want['env']}, ports {sorted(want['ports'])}; files {files}"
    )


# OCI architecture names of the executables keyrelay ships.
ELF_MACHINES = {62: "amd64", 183: "arm64"}  # EM_X86_64, EM_AARCH64
MACHO_CPUS = {0x01000007: "amd64", 0x0100000C: "arm64"}  # CPU_TYPE_X86_64, CPU_TYPE_ARM64
PE_MACHINES = {0x8664: "amd64", 0xAA64: "arm64"}  # IMAGE_FILE_MACHINE_AMD64, _ARM64


def binary_platform(data: bytes, name: str) -> tuple[str, str, bool]:
    """(os, architecture, statically linked) of a 64-bit little-endian ELF, Mach-O or PE executable."""
    if data[:4] == b"\x7fELF":
        expect(data[4] == 2 and data[5] == 1, f"{name} is not a 64-bit little-endian ELF file")
        machine = int.from_bytes(data[0x12:0x14], "little")
        phoff = int.from_bytes(data[0x20:0x28], "little")
        phentsize = int.from_bytes(data[0x36:0x38], "little")
        phnum = int.from_bytes(data[0x38:0x3A], "little")
        interpreter = any(  # PT_INTERP: the binary asks for a dynamic loader
            int.from_bytes(data[start:start + 4], "little") == 3
            for start in range(phoff, phoff + phnum * phentsize, phentsize)
        )
        return "linux", ELF_MACHINES.get(machine, f"elf-machine-{machine}"), not interpreter
    if data[:4] == b"\xcf\xfa\xed\xfe":  # MH_MAGIC_64
        cpu = int.from_bytes(data[4:8], "little")
        expect(int.from_bytes(data[12:16], "little") == 2, f"{name} is a Mach-O file but not an executable")
        # Every macOS executable loads libSystem dynamically: there is no static macOS binary.
        return "darwin", MACHO_CPUS.get(cpu, f"macho-cpu-{cpu:#x}"), False
    if data[:2] == b"MZ":
        pe = int.from_bytes(data[0x3C:0x40], "little")
        expect(data[pe:pe + 4] == b"PE\0\0", f"{name} has an MZ header but no PE signature")
        machine = int.from_bytes(data[pe + 4:pe + 6], "little")
        characteristics = int.from_bytes(data[pe + 22:pe + 24], "little")
        expect(characteristics & 0x2000 == 0, f"{name} is a PE DLL, not an executable")  # IMAGE_FILE_DLL
        # Every Windows executable loads kernel32 and friends dynamically.
        return "windows", PE_MACHINES.get(machine, f"pe-machine-{machine:#x}"), False
    raise CheckFailed(f"{name} is not a 64-bit ELF, Mach-O or PE executable")


def check_pushed_list(pushed: Path, image_paths: list[Path]) -> None:
    listing = json.loads((pushed / "manifest.json").read_text())
    expect(
        listing.get("mediaType") == "application/vnd.docker.distribution.manifest.list.v2+json",
        f"pushed list is {listing.get('mediaType')!r}, expected a Docker manifest list (HEALTHCHECK needs Docker configs)",
    )
    listed = sorted(
        (m.get("digest"), f"{m.get('platform', {}).get('os')}/{m.get('platform', {}).get('architecture')}")
        for m in listing.get("manifests") or []
    )
    wanted = []
    for path in image_paths:
        inspect = json.loads(path.read_text())
        wanted.append((inspect["FromImageDigest"], f"{inspect['OCIv1']['os']}/{inspect['OCIv1']['architecture']}"))
    wanted.sort()
    expect(listed == wanted, f"pushed manifest list names {listed}, expected {wanted}")
    for digest, platform in listed:
        manifest = json.loads((pushed / f"{digest.split(':', 1)[1]}.manifest.json").read_text())
        config = json.loads((pushed / manifest["config"]["digest"].split(":", 1)[1]).read_text())
        expect(f"{config.get('os')}/{config.get('architecture')}" == platform, f"pushed {platform} image's config says {config.get('os')}/{config.get('architecture')}")
        health = (config["config"].get("Healthcheck") or {}).get("Test")
        expect(health == ["CMD", "/keyrelay", "health"], f"pushed {platform} image's Healthcheck is {health}")
        entrypoint = config["config"].get("Entrypoint")
        expect(entrypoint == ["/keyrelay"], f"pushed {platform} image's Entrypoint is {entrypoint}")
    print(f"pushed manifest list: {', '.join(platform for _, platform in listed)}, each with its entrypoint and HEALTHCHECK")


# ---------------------------------------------------------------- smoke test


class MockUpstream:
    """A model endpoint on 127.0.0.1 that streams tokens only to the right key."""

    def __init__(self, key: str):
        self.key = key
        self.seen_auth: list[str | None] = []
        self.sent_at: list[float] = []
        self.lock = threading.Lock()
        mock = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):  # keep the output readable
                pass

            def do_POST(self):
                length = int(self.headers.get("content-length") or 0)
                self.rfile.read(length)
                auth = self.headers.get("authorization")
                with mock.lock:
                    mock.seen_auth.append(auth)
                    expected = f"Api-Key {mock.key}"
                if auth != expected or self.headers.get("x-api-key") is not None:
                    body = b'{"error": "wrong or missing key"}'
                    self.send_response(401)
                    self.send_header("content-type", "application/json")
                    self.send_header("content-length", str(len(body)))
                    self.end_headers()
                    self.wfile.write(body)
                    return
                self.send_response(200)
                self.send_header("content-type", "text/plain; charset=utf-8")
                self.send_header("transfer-encoding", "chunked")
                self.end_headers()
                sent = []
                for index, token in enumerate(TOKENS):
                    if index:
                        time.sleep(TOKEN_GAP)
                    data = token.encode()
                    self.wfile.write(b"%x\r\n%s\r\n" % (len(data), data))
                    self.wfile.flush()
                    sent.append(time.monotonic())
                with mock.lock:  # before the last chunk, so the client sees it once done
                    mock.sent_at = sent
                self.wfile.write(b"0\r\n\r\n")
                self.wfile.flush()

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.port = self.server.server_address[1]
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def stop(self):
        self.server.shutdown()
        self.server.server_close()


def free_port(preferred: int | None = None) -> int:
    if preferred is not None:
        with socket.socket() as sock:
            try:
                sock.bind(("127.0.0.1", preferred))
                return preferred
            except OSError:
                pass
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def get(port: int, path: str, timeout: float = 3.0) -> tuple[int, dict, bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        conn.request("GET", path)
        resp = conn.getresponse()
        return resp.status, {k.lower(): v for k, v in resp.getheaders()}, resp.read()
    finally:
        conn.close()


def stream(port: int, headers: dict) -> tuple[int, dict, list[tuple[float, bytes]]]:
    """POSTs a prediction and returns each body piece with its arrival time."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        body = json.dumps({"prompt": "What is the Mistral wind?", "stream": True})
        conn.request("POST", "/production/predict", body=body, headers={"content-type": "application/json", **headers})
        resp = conn.getresponse()
        pieces = []
        while True:
            data = resp.read1(65536)
            if not data:
                break
            pieces.append((time.monotonic(), data))
        return resp.status, {k.lower(): v for k, v in resp.getheaders()}, pieces
    finally:
        conn.close()


def descendants(pid: int) -> list[int]:
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        children.setdefault(ppid, []).append(int(entry))
    found, queue = [], [pid]
    while queue:
        for child in children.get(queue.pop(), []):
            found.append(child)
            queue.append(child)
    return found


def keyrelay_pid(root: int) -> int | None:
    for pid in descendants(root):
        try:
            comm = Path(f"/proc/{pid}/comm").read_text().strip()
            argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        # An image of another architecture runs as qemu-user emulating /keyrelay;
        # signals sent to the emulator reach keyrelay.
        if comm == "keyrelay" or (comm.startswith("qemu-") and argv[1:2] == [b"/keyrelay"]):
            return pid
    return None


def wait_for(what: str, predicate, timeout: float, proc: subprocess.Popen | None = None):
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise CheckFailed(f"keyrelay exited with status {proc.returncode} while waiting for {what}")
        try:
            result = predicate()
            if result:
                return result
            last = result
        except (OSError, http.client.HTTPException) as err:
            last = err
        time.sleep(0.1)
    raise CheckFailed(f"timed out after {timeout:.0f}s waiting for {what} (last: {last!r})")


def smoke(inspect_path: Path, secret_dir: Path, prefix: list[str]) -> None:
    # A TERM (e.g. CI cancelling) must still stop the container: make it unwind the finally blocks.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    config = json.loads(inspect_path.read_text())["Docker"]["config"]
    entrypoint = config["Entrypoint"]
    health_test = config["Healthcheck"]["Test"]
    expect(health_test[0] == "CMD", f"unexpected Healthcheck.Test {health_test}")
    image_env = dict(item.split("=", 1) for item in config.get("Env") or [])
    default_admin = int(image_env["KEYRELAY_ADMIN_LISTEN"].rsplit(":", 1)[1])

    key = "image-test-" + secrets.token_hex(16)
    key_file = secret_dir / KEY_NAME
    key_file.write_text(key + "\n")
    key_file.chmod(0o444)
    mock = MockUpstream(key)
    proxy_port = free_port()
    # Use the image's own admin address when it is free, so the HEALTHCHECK runs verbatim.
    admin_port = free_port(default_admin)
    args = [
        "--upstream", f"http://127.0.0.1:{mock.port}",
        "--key-file", f"{SECRET_MOUNT}/{KEY_NAME}",
        "--listen", f"127.0.0.1:{proxy_port}",
        "--shutdown-delay", "3s",
        "--shutdown-grace", "5s",
    ]
    health_extra: list[str] = []
    if admin_port != default_admin:
        print(f"  127.0.0.1:{default_admin} is taken here; admin on 127.0.0.1:{admin_port} instead")
        args += ["--admin-listen", f"127.0.0.1:{admin_port}"]
        health_extra = ["--url", f"http://127.0.0.1:{admin_port}/healthz"]
    command = prefix + entrypoint + args
    print("  running:", shlex.join(command))
    log = open(secret_dir.parent / "keyrelay.log", "w+b")
    proc = subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        run_smoke(proc, prefix, mock, key_file, proxy_port, admin_port, health_test, health_extra)
    except BaseException:
        log.seek(0)
        sys.stderr.write("---- keyrelay output ----\n" + log.read().decode(errors="replace") + "----\n")
        raise
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        mock.stop()
        log.close()


def run_smoke(proc, prefix, mock, key_file, proxy_port, admin_port, health_test, health_extra):
    started = time.monotonic()
    wait_for("admin /healthz to answer 200", lambda: get(admin_port, "/healthz")[0] == 200, 30, proc)
    print(f"  /healthz 200 after {time.monotonic() - started:.1f}s")

    pid = keyrelay_pid(proc.pid)
    expect(pid is not None, "cannot find the keyrelay process under the container runner")
    status_text = Path(f"/proc/{pid}/status").read_text()
    uid = re.search(r"^Uid:\s+(\d+)", status_text, re.M).group(1)
    expect(uid == "65532", f"keyrelay runs as uid {uid}, expected the image's USER 65532")
    print(f"  keyrelay pid {pid} runs as uid {uid}")

    health = subprocess.run(prefix + health_test[1:] + health_extra, capture_output=True, timeout=30)
    expect(
        health.returncode == 0,
        f"HEALTHCHECK {health_test[1:] + health_extra} exited {health.returncode}: {health.stderr.decode(errors='replace')}",
    )
    dead = free_port()
    unhealthy = subprocess.run(
        prefix + health_test[1:] + ["--url", f"http://127.0.0.1:{dead}/healthz"], capture_output=True, timeout=30
    )
    expect(unhealthy.returncode == 1, f"`keyrelay health` against a closed port exited {unhealthy.returncode}, expected 1")
    print(f"  HEALTHCHECK {health_test[1:]} exits 0; against a closed port it exits 1")

    status, _, body = get(admin_port, "/readyz")
    expect(status == 200, f"/readyz answered {status} {body!r}, expected 200")
    status, headers, body = get(admin_port, "/metrics")
    expect(status == 200 and headers.get("content-type", "").startswith("application/openmetrics-text"),
           f"/metrics answered {status} {headers.get('content-type')!r}")
    expect(b"# TYPE" in body, f"/metrics is not Prometheus text: {body[:200]!r}")
    print(f"  /readyz 200, /metrics 200 ({len(body)} bytes of Prometheus text)")

    # A streamed prediction; the client sends a credential of its own, which must not reach the upstream.
    status, headers, pieces = stream(proxy_port, {"authorization": "Bearer client-junk", "x-api-key": "client-junk"})
    text = b"".join(piece for _, piece in pieces).decode()
    expect(status == 200, f"streamed request answered {status}: {text!r}; upstream saw {mock.seen_auth[-1:]!r}")
    expect(text == "".join(TOKENS), f"streamed body {text!r}, expected {''.join(TOKENS)!r}")
    expect(headers.get("transfer-encoding") == "chunked", f"response is not chunked: {headers}")
    expect(mock.seen_auth[-1] == f"Api-Key {mock.key}", "upstream did not receive the key from the key file")
    # Streaming, not buffering: each token reached the client before the mock sent the next one.
    arrivals, received = [], ""
    for at, piece in pieces:
        received += piece.decode()
        while len(arrivals) < len(TOKENS) and received.startswith("".join(TOKENS[: len(arrivals) + 1])):
            arrivals.append(at)
    for index in range(len(TOKENS) - 1):
        expect(
            arrivals[index] < mock.sent_at[index + 1],
            f"token {index} ({TOKENS[index]!r}) arrived only after the upstream sent token {index + 1}: buffered",
        )
    spread = arrivals[-1] - arrivals[0]
    print(f"  streamed {len(TOKENS)} tokens through the image in {len(pieces)} reads over {spread:.2f}s, "
          "each before the next was sent; key injected, client credential removed")

    # Key rotation through the mounted file, as a Kubernetes Secret update does it.
    new_key = "image-test-rotated-" + secrets.token_hex(16)
    staged = key_file.with_name(".api-key.new")
    staged.write_text(new_key + "\n")
    staged.chmod(0o444)
    with mock.lock:
        mock.key = new_key
    os.replace(staged, key_file)
    wait_for("the rotated key to be used", lambda: stream(proxy_port, {})[0] == 200, 10, proc)
    expect(mock.seen_auth[-1] == f"Api-Key {new_key}", "upstream did not receive the rotated key")
    print("  rotated key file picked up")

    # SIGTERM: readiness fails at once (shutdown_delay keeps serving), then a clean exit.
    os.kill(pid, signal.SIGTERM)
    signalled = time.monotonic()
    wait_for("/readyz to answer 503 after SIGTERM", lambda: get(admin_port, "/readyz")[0] == 503, 2, proc)
    status, _, _ = get(admin_port, "/healthz")
    expect(status == 200, f"/healthz answered {status} while draining, expected 200")
    try:
        code = proc.wait(timeout=20)
    except subprocess.TimeoutExpired:
        raise CheckFailed("keyrelay did not exit within 20s of SIGTERM") from None
    expect(code == 0, f"keyrelay exited with status {code} after SIGTERM, expected 0")
    print(f"  SIGTERM: /readyz 503 while draining, exit 0 after {time.monotonic() - signalled:.1f}s")


def main(argv: list[str]) -> int:
    try:
        if len(argv) == 2 and argv[0] == "containerfile":
            sys.stdout.write(containerfile(Path(argv[1])))
        elif len(argv) >= 5 and argv[0] == "config":
            build_args, arch = {}, None
            for item in argv[4:]:
                if item.startswith("--arch="):
                    arch = item.removeprefix("--arch=")
                    continue
                name, sep, value = item.removeprefix("--build-arg=").partition("=")
                expect(item.startswith("--build-arg=") and bool(sep), f"config: unexpected argument {item!r}")
                build_args[name] = value
            expect(arch in ELF_MACHINES.values(), f"config: --arch= must be one of {sorted(ELF_MACHINES.values())}")
            check_config(Path(argv[1]), Path(argv[2]), Path(argv[3]), arch, build_args)
        elif len(argv) >= 3 and argv[0] == "pushed":
            check_pushed_list(Path(argv[1]), [Path(arg) for arg in argv[2:]])
        elif len(argv) >= 5 and argv[0] == "smoke" and argv[3] == "--":
            smoke(Path(argv[1]), Path(argv[2]), argv[4:])
        else:
            print(__doc__, file=sys.stderr)
            return 64
    except CheckFailed as err:
        print(f"FAILED: {err}", file=sys.stderr)
        return 1
    except (OSError, http.client.HTTPException) as err:
        print(f"FAILED: {type(err).__name__}: {err}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
