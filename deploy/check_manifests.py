#!/usr/bin/env python3
"""Checks the Kubernetes examples in deploy/kubernetes/ for what matters.

    python3 deploy/check_manifests.py               # check the manifests
    python3 deploy/check_manifests.py --self-test   # and prove every check can fail
    python3 deploy/check_manifests.py --self-test --schema
        # and validate every document against the Kubernetes 1.29 and latest
        # OpenAPI schemas, strictly (unknown fields fail), installing
        # kubernetes-validate when missing
    python3 deploy/check_manifests.py --binary target/debug/keyrelay
        # and start that keyrelay binary with each manifest's own arguments
        # and env (Secret files materialised in a temporary directory, listen
        # addresses moved to free 127.0.0.1 ports): it must refuse to start
        # with the placeholder access tokens (exit 64), and with real-length
        # ones pass the manifest's own probes (httpGet, or the exec command
        # run with this binary), then exit 0 on SIGTERM

For every pod that runs keyrelay it checks, reading keyrelay's settings the way
keyrelay does (Dockerfile ENV < KEYRELAY_* env < flags, names from the SETTINGS
table in src/):

- every flag and KEYRELAY_* variable is a real setting (keyrelay refuses
  unknown ones), and service links are off (a Service named keyrelay would
  inject KEYRELAY_SERVICE_HOST & co.);
- the admin listener is on; startupProbe and livenessProbe check /healthz and
  readinessProbe /readyz on it, either with httpGet on the container port
  named "admin" (which must be admin_listen's port, and admin_listen must
  not be loopback-only: kubelet connects to the pod IP) or by exec of
  `/keyrelay health --url http://127.0.0.1:<admin port>/<path>`;
- the key comes from --key-file inside a read-only Secret volume (no subPath,
  which would miss rotations), readable by the container's user, naming a
  Secret and key that exist;
- the container is locked down: runAsNonRoot, allowPrivilegeEscalation false,
  readOnlyRootFilesystem, capabilities drop ALL, seccomp RuntimeDefault, and
  has resource requests and a memory limit;
- terminationGracePeriodSeconds covers shutdown_delay + shutdown_grace;
- sidecar.yaml: keyrelay is a native sidecar (initContainer, restartPolicy
  Always) listening on loopback, and the app's 127.0.0.1 URLs use its port;
- a non-loopback listen address comes with access tokens from a Secret,
  --allowed-hosts holding every DNS name of the Services in front of it, and a
  NetworkPolicy admitting only labelled client pods to the proxy port;
- shared.yaml: 2 replicas behind a Service;
- Secrets in the examples hold only REPLACE_ME placeholders, and placeholder
  access tokens are too short for keyrelay to accept (fail closed).

--self-test applies one mutation per check to the parsed manifests and fails
unless each mutation is caught. Exits 1 with a list of problems on failure.
"""

from __future__ import annotations

import copy
import http.client
import ipaddress
import os
import re
import secrets as random_secrets
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
MANIFESTS = HERE / "kubernetes"
SIDECAR, SHARED = "sidecar.yaml", "shared.yaml"

try:
    import yaml
except ImportError:  # a fresh machine: install PyYAML, then carry on
    print("check_manifests: installing PyYAML", file=sys.stderr)
    subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "PyYAML"], check=True)
    import yaml

sys.path.insert(0, str(HERE))
import image_check  # noqa: E402  (the Dockerfile reader shared with image.sh)

# Native sidecars are on by default from 1.29; the latest is the package's newest.
SCHEMA_VERSIONS = ["1.29.0", "latest"]
KUBERNETES_VALIDATE = "kubernetes-validate==1.37.0"

ADMIN_PATHS = {"startupProbe": "/healthz", "livenessProbe": "/healthz", "readinessProbe": "/readyz"}
MIN_TOKEN_LEN = 16  # keyrelay's shortest accepted access token


# ------------------------------------------------------------------ settings


def load_settings() -> dict[str, str]:
    """keyrelay's settings table from src/: key -> kind (Text, List, Switch)."""
    found: dict[str, str] = {}
    pattern = re.compile(r'Setting\s*\{\s*key:\s*"(\w+)".*?kind:\s*Kind::(\w+)', re.S)
    for source in sorted((REPO / "src").rglob("*.rs")):
        for key, kind in pattern.findall(source.read_text()):
            found[key] = kind
    if "listen" not in found or "key_file" not in found:
        sys.exit("check_manifests: cannot find keyrelay's SETTINGS table under src/")
    return found


SETTINGS = load_settings()


def image_env() -> dict[str, str]:
    env: dict[str, str] = {}
    for text in image_check.instruction_args(image_check.final_stage(REPO / "Dockerfile"), "ENV"):
        env.update(image_check.key_values(text))
    return env


IMAGE_ENV = image_env()


def parse_duration(text: str) -> float:
    """keyrelay durations (ms, s, m, h; "off") in seconds."""
    text = str(text).strip()
    if text in ("off", "", "0"):
        return 0.0
    match = re.fullmatch(r"(\d+(?:\.\d+)?)(ms|s|m|h)", text)
    if not match:
        raise ValueError(f"{text!r} is not a duration")
    return float(match.group(1)) * {"ms": 0.001, "s": 1, "m": 60, "h": 3600}[match.group(2)]


def split_list(text: str) -> list[str]:
    return [item.strip() for item in str(text).split(",") if item.strip()]


class Problems:
    def __init__(self):
        self.items: list[str] = []

    def add(self, where: str, message: str) -> None:
        self.items.append(f"{where}: {message}")


def effective_settings(container: dict, where: str, problems: Problems) -> dict:
    """keyrelay's settings for a container: Dockerfile ENV < env < flags."""
    layers: list[dict] = []
    base = {}
    for name, value in IMAGE_ENV.items():
        if name.startswith("KEYRELAY_"):
            base[name[len("KEYRELAY_"):].lower()] = value
    layers.append(base)

    env_layer = {}
    for item in container.get("env") or []:
        name = item.get("name", "")
        if not name.startswith("KEYRELAY_"):
            continue
        key = name[len("KEYRELAY_"):].lower()
        if key not in SETTINGS:
            problems.add(where, f"env {name} is not a keyrelay setting (keyrelay refuses unknown KEYRELAY_ variables)")
            continue
        env_layer[key] = item.get("value", "<valueFrom>")
    layers.append(env_layer)

    if container.get("command") not in (None, ["/keyrelay"]):
        problems.add(where, f"command {container.get('command')} replaces the image's /keyrelay entrypoint")
    flag_layer: dict = {}
    args = [str(a) for a in container.get("args") or []]
    index = 0
    while index < len(args):
        arg = args[index]
        index += 1
        if not arg.startswith("--"):
            problems.add(where, f"unexpected argument {arg!r} (settings are --flags)")
            continue
        name, has_value, value = arg[2:].partition("=")
        key = name.replace("-", "_")
        if key not in SETTINGS or "_" in name:
            problems.add(where, f"--{name} is not a keyrelay setting flag")
            continue
        kind = SETTINGS[key]
        if kind == "Switch":
            flag_layer[key] = value.lower() != "false" if has_value else True
            continue
        if not has_value:
            if index >= len(args):
                problems.add(where, f"--{name} has no value")
                continue
            value = args[index]
            index += 1
        if kind == "List":
            flag_layer.setdefault(key, []).extend(split_list(value))
        else:
            flag_layer[key] = value
    layers.append(flag_layer)

    settings: dict = {}
    for layer in layers:
        for key, value in layer.items():
            kind = SETTINGS[key]
            if kind == "List" and isinstance(value, str):
                value = split_list(value)
            if kind == "Switch" and isinstance(value, str):
                value = value.lower() == "true"
            settings[key] = value
    return settings


def host_port(address: str) -> tuple[str, int] | None:
    match = re.fullmatch(r"\[?([^\]]+?)\]?:(\d+)", str(address))
    return (match.group(1), int(match.group(2))) if match else None


def is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


# ------------------------------------------------------------------ helpers


def is_keyrelay(container: dict) -> bool:
    image = str(container.get("image", ""))
    name = image.rsplit("/", 1)[-1].split("@")[0].split(":")[0]
    return name == "keyrelay"


def pod_spec(workload: dict) -> dict:
    return workload.get("spec", {}).get("template", {}).get("spec", {}) or {}


def pod_labels(workload: dict) -> dict:
    return workload.get("spec", {}).get("template", {}).get("metadata", {}).get("labels", {}) or {}


def namespace(doc: dict) -> str:
    return doc.get("metadata", {}).get("namespace", "default")


def selects(selector: dict | None, labels: dict) -> bool:
    """A matchLabels selector (the only form the examples use) matching labels."""
    if not selector:
        return False
    match = selector.get("matchLabels") or {}
    return bool(match) and not selector.get("matchExpressions") and all(labels.get(k) == v for k, v in match.items())


def resolve_port(port, container: dict) -> int | None:
    if isinstance(port, int):
        return port
    for item in container.get("ports") or []:
        if item.get("name") == port:
            return item.get("containerPort")
    return None


def file_mode(volume: dict) -> int:
    secret = volume.get("secret") or {}
    modes = [item.get("mode") for item in secret.get("items") or [] if item.get("mode") is not None]
    return modes[0] if modes else secret.get("defaultMode", 0o644)


# ------------------------------------------------------------------ checks


def check_secret_file(path: str, setting: str, container: dict, spec: dict, secrets: dict, where: str, problems: Problems):
    """The file at `path` must come from a read-only, whole-directory Secret mount the user can read.

    Returns the value the Secret holds for it, when the Secret is in the manifests.
    """
    mounts = [
        m for m in container.get("volumeMounts") or []
        if path.startswith(str(m.get("mountPath", "")).rstrip("/") + "/")
    ]
    if not mounts:
        problems.add(where, f"{setting} {path} is not inside any volumeMount")
        return None
    mount = max(mounts, key=lambda m: len(m.get("mountPath", "")))
    file_name = path[len(mount["mountPath"].rstrip("/")) + 1:]
    if mount.get("subPath") or mount.get("subPathExpr"):
        problems.add(where, f"{setting}: mount {mount['mountPath']} uses subPath, which never sees Secret updates")
    if mount.get("readOnly") is not True:
        problems.add(where, f"{setting}: mount {mount['mountPath']} must be readOnly: true")
    volume = next((v for v in spec.get("volumes") or [] if v.get("name") == mount.get("name")), None)
    if volume is None or "secret" not in volume:
        problems.add(where, f"{setting} {path} must come from a Secret volume, found {volume}")
        return None
    secret = volume["secret"]
    items = secret.get("items")
    key = file_name
    if items is not None:
        item = next((i for i in items if i.get("path") == file_name), None)
        if item is None:
            problems.add(where, f"{setting}: Secret volume {volume['name']} has no item with path {file_name}")
            return None
        key = item.get("key")
    name = secret.get("secretName")
    value = None
    if name not in secrets:
        problems.add(where, f"{setting}: there is no Secret {name!r} in these manifests")
    elif key not in (secrets[name].get("stringData") or {}) and key not in (secrets[name].get("data") or {}):
        problems.add(where, f"{setting}: Secret {name} has no key {key!r} (for {path})")
    else:
        value = (secrets[name].get("stringData") or {}).get(key)
    mode = file_mode(volume)
    ctx, pod_ctx = container.get("securityContext") or {}, spec.get("securityContext") or {}
    group = ctx.get("runAsGroup", pod_ctx.get("runAsGroup", 65532))
    groups = {group, pod_ctx.get("fsGroup"), *(pod_ctx.get("supplementalGroups") or [])}
    readable = bool(mode & 0o004) or (bool(mode & 0o040) and pod_ctx.get("fsGroup") in groups - {None})
    if not readable:
        problems.add(
            where,
            f"{setting}: Secret files with mode {oct(mode)} are not readable by uid 65532 "
            "(use 0444, or 0440 with pod fsGroup 65532)",
        )
    return value


def check_probes(container: dict, settings: dict, where: str, problems: Problems) -> None:
    admin = settings.get("admin_listen", "off")
    address = host_port(admin) if admin != "off" else None
    if address is None:
        problems.add(where, f"admin_listen is {admin!r}: probes need the admin listener")
        return
    admin_host, admin_port = address
    named = resolve_port("admin", container)
    http_probes = any("httpGet" in (container.get(name) or {}) for name in ADMIN_PATHS)
    if (http_probes or named is not None) and named != admin_port:
        problems.add(where, f"container port named 'admin' is {named}, but admin_listen is on port {admin_port}")
    proxy = host_port(settings.get("listen", ""))
    for probe_name, path in ADMIN_PATHS.items():
        probe = container.get(probe_name)
        if not probe:
            problems.add(where, f"no {probe_name} (expected GET {path} on the admin port)")
            continue
        if "httpGet" in probe:
            get = probe["httpGet"]
            port = resolve_port(get.get("port"), container)
            if port != admin_port:
                problems.add(where, f"{probe_name} probes port {get.get('port')!r} ({port}), not the admin port {admin_port}")
            if get.get("path") != path:
                problems.add(where, f"{probe_name} probes {get.get('path')!r}, expected {path}")
            if is_loopback(admin_host):
                problems.add(
                    where,
                    f"{probe_name} is an HTTP probe but admin_listen {admin} is loopback-only; kubelet "
                    "connects to the pod IP (listen on 0.0.0.0, or use an exec probe with keyrelay health)",
                )
        elif "exec" in probe:
            command = probe["exec"].get("command") or []
            expected = ["/keyrelay", "health", "--url", f"http://127.0.0.1:{admin_port}{path}"]
            if command != expected:
                problems.add(where, f"{probe_name} runs {command}, expected {expected}")
        else:
            problems.add(where, f"{probe_name} must be an httpGet (or keyrelay health exec) probe of the admin port")
        if proxy and probe.get("httpGet", {}).get("port") is not None and resolve_port(probe["httpGet"]["port"], container) == proxy[1]:
            problems.add(where, f"{probe_name} probes the proxy port, which needs the key and the upstream")


def check_security(container: dict, spec: dict, where: str, problems: Problems) -> None:
    ctx = container.get("securityContext") or {}
    pod_ctx = spec.get("securityContext") or {}
    if ctx.get("readOnlyRootFilesystem") is not True:
        problems.add(where, "securityContext.readOnlyRootFilesystem must be true")
    if ctx.get("allowPrivilegeEscalation") is not False:
        problems.add(where, "securityContext.allowPrivilegeEscalation must be false")
    if ctx.get("privileged"):
        problems.add(where, "securityContext.privileged must not be set")
    if ctx.get("runAsNonRoot", pod_ctx.get("runAsNonRoot")) is not True:
        problems.add(where, "securityContext.runAsNonRoot must be true (container or pod)")
    if ctx.get("runAsUser", pod_ctx.get("runAsUser", 65532)) == 0:
        problems.add(where, "securityContext.runAsUser must not be 0")
    drop = (ctx.get("capabilities") or {}).get("drop") or []
    if "ALL" not in drop:
        problems.add(where, f"securityContext.capabilities.drop must contain ALL, found {drop}")
    if (ctx.get("capabilities") or {}).get("add"):
        problems.add(where, "securityContext.capabilities.add must be empty")
    seccomp = (ctx.get("seccompProfile") or pod_ctx.get("seccompProfile") or {}).get("type")
    if seccomp != "RuntimeDefault":
        problems.add(where, f"seccompProfile.type must be RuntimeDefault (container or pod), found {seccomp}")


def check_resources(container: dict, where: str, problems: Problems) -> None:
    resources = container.get("resources") or {}
    requests, limits = resources.get("requests") or {}, resources.get("limits") or {}
    for field in ("cpu", "memory"):
        if field not in requests:
            problems.add(where, f"resources.requests.{field} is not set")
    if "memory" not in limits:
        problems.add(where, "resources.limits.memory is not set")


def check_network_exposure(workload, container, settings, docs, where, problems) -> None:
    """A non-loopback keyrelay: tokens, Host names of its Services, a NetworkPolicy."""
    spec = pod_spec(workload)
    labels = pod_labels(workload)
    ns = namespace(workload)
    if settings.get("allow_unauthenticated_network"):
        problems.add(where, "allow_unauthenticated_network must not be set: use access tokens")
    token_files = settings.get("access_token_files") or []
    token_env = settings.get("access_token_env") or []
    if not token_files and not token_env:
        problems.add(where, f"listen {settings.get('listen')} is not loopback, so access tokens are required (access_token_files)")
    secrets = {d["metadata"]["name"]: d for d in docs if d.get("kind") == "Secret" and namespace(d) == ns}
    for path in token_files:
        value = check_secret_file(path, "access_token_files", container, spec, secrets, where, problems)
        if value is not None and len(str(value)) >= MIN_TOKEN_LEN:
            problems.add(
                where,
                f"the placeholder token for {path} has {len(str(value))} characters, so keyrelay would accept it; "
                f"keep placeholders under {MIN_TOKEN_LEN} so an unedited example fails closed",
            )
    for name in token_env:
        env = next((e for e in container.get("env") or [] if e.get("name") == name), None)
        if not env or "secretKeyRef" not in (env.get("valueFrom") or {}):
            problems.add(where, f"access_token_env {name} must come from a Secret (valueFrom.secretKeyRef)")

    proxy_port = host_port(settings.get("listen", ""))[1]
    hosts = set(settings.get("allowed_hosts") or [])
    services = [d for d in docs if d.get("kind") == "Service" and namespace(d) == ns
                and selects({"matchLabels": d.get("spec", {}).get("selector")}, labels)]
    for service in services:
        name = service["metadata"]["name"]
        svc_ns = namespace(service)
        wanted = {name, f"{name}.{svc_ns}", f"{name}.{svc_ns}.svc", f"{name}.{svc_ns}.svc.cluster.local"}
        missing = sorted(wanted - hosts)
        if missing:
            problems.add(where, f"allowed_hosts lacks {missing}, the DNS names of Service {name} (clients would get 403)")
        for port in service.get("spec", {}).get("ports") or []:
            target = resolve_port(port.get("targetPort", port.get("port")), container)
            if target != proxy_port:
                problems.add(where, f"Service {name} port {port.get('port')} targets {port.get('targetPort')} ({target}), not the proxy port {proxy_port}")

    policies = [d for d in docs if d.get("kind") == "NetworkPolicy" and namespace(d) == ns
                and selects(d.get("spec", {}).get("podSelector"), labels)]
    if not policies:
        problems.add(where, "listens on the network but no NetworkPolicy selects its pods")
    for policy in policies:
        pname = f"NetworkPolicy/{policy['metadata']['name']}"
        pspec = policy.get("spec", {})
        if "Ingress" not in (pspec.get("policyTypes") or []):
            problems.add(where, f"{pname}: policyTypes must include Ingress")
        rules = pspec.get("ingress") or []
        for number, rule in enumerate(rules):
            peers = rule.get("from")
            if not peers:
                problems.add(where, f"{pname}: ingress rule {number} has no 'from', so it admits every source")
                continue
            ports = [resolve_port(p.get("port"), container) for p in rule.get("ports") or []]
            if not rule.get("ports") or proxy_port in ports:
                for peer in peers:
                    labelled = (peer.get("podSelector") or {}).get("matchLabels")
                    if "ipBlock" in peer or not labelled:
                        problems.add(where, f"{pname}: ingress rule {number} admits {peer} to the proxy port; only labelled client pods (podSelector.matchLabels) may reach it")
        if not any(not r.get("ports") or proxy_port in [resolve_port(p.get("port"), container) for p in r.get("ports") or []] for r in rules if r.get("from")):
            problems.add(where, f"{pname}: no ingress rule admits clients to the proxy port {proxy_port}")


def check_workload(file: str, workload: dict, docs: list[dict], problems: Problems) -> None:
    spec = pod_spec(workload)
    wname = f"{file}: {workload['kind']}/{workload['metadata']['name']}"
    found = [("initContainers", c) for c in spec.get("initContainers") or [] if is_keyrelay(c)]
    found += [("containers", c) for c in spec.get("containers") or [] if is_keyrelay(c)]
    if len(found) != 1:
        problems.add(wname, f"expected one keyrelay container, found {len(found)}")
        return
    section, container = found[0]
    where = f"{wname} {section}/{container.get('name')}"
    settings = effective_settings(container, where, problems)

    image = str(container.get("image"))
    if ":" not in image.rsplit("/", 1)[-1] or image.endswith(":latest"):
        problems.add(where, f"image {image} must have a version tag (not latest)")
    if spec.get("enableServiceLinks") is not False:
        problems.add(where, "enableServiceLinks must be false: a Service named keyrelay would inject unknown KEYRELAY_* variables")

    key_file = settings.get("key_file")
    secrets = {d["metadata"]["name"]: d for d in docs if d.get("kind") == "Secret" and namespace(d) == namespace(workload)}
    if not key_file:
        problems.add(where, "key_file is not set: the key must come from a mounted Secret (--key-file)")
    else:
        check_secret_file(key_file, "key_file", container, spec, secrets, where, problems)
    for env in container.get("env") or []:
        if env.get("name") == settings.get("key_env", "BASETEN_API_KEY"):
            problems.add(where, f"the key is also passed as env {env['name']}; use only the key file")

    check_probes(container, settings, where, problems)
    check_security(container, spec, where, problems)
    check_resources(container, where, problems)

    try:
        needed = parse_duration(settings.get("shutdown_delay", "off")) + parse_duration(settings.get("shutdown_grace", "30s"))
        period = spec.get("terminationGracePeriodSeconds", 30)
        if period < needed:
            problems.add(where, f"terminationGracePeriodSeconds {period} < shutdown_delay + shutdown_grace ({needed:g}s): streams would be killed")
    except ValueError as err:
        problems.add(where, f"bad duration: {err}")

    listen = host_port(settings.get("listen", ""))
    if listen is None:
        problems.add(where, f"listen {settings.get('listen')!r} is not an address")
        return
    if section == "initContainers" and container.get("restartPolicy") != "Always":
        problems.add(where, "keyrelay is an initContainer without restartPolicy: Always (not a native sidecar: it would block the pod)")
    if file == SIDECAR:
        if section != "initContainers":
            problems.add(where, "sidecar.yaml must run keyrelay as a native sidecar (an initContainer with restartPolicy: Always)")
        if not container.get("startupProbe"):
            problems.add(where, "a native sidecar needs a startupProbe so the app starts only once keyrelay serves")
        if not is_loopback(listen[0]):
            problems.add(where, f"a sidecar listens on loopback (127.0.0.1:8080), not {listen[0]}: the app is in the same pod")
        apps = spec.get("containers") or []
        if not apps:
            problems.add(where, "no app container next to the sidecar")
        for app in apps:
            for env in app.get("env") or []:
                for host, port in re.findall(r"//(127\.0\.0\.1|localhost):(\d+)", str(env.get("value", ""))):
                    if int(port) != listen[1]:
                        problems.add(where, f"app env {env['name']} points at {host}:{port}, but keyrelay listens on port {listen[1]}")
    if file == SHARED:
        if workload.get("spec", {}).get("replicas") != 2:
            problems.add(where, f"the shared instance runs 2 replicas, found {workload.get('spec', {}).get('replicas')}")
        if is_loopback(listen[0]):
            problems.add(where, "the shared instance must listen on the pod network (--listen 0.0.0.0:8080)")
    if not is_loopback(listen[0]):
        check_network_exposure(workload, container, settings, docs, where, problems)


def check_secrets(file: str, docs: list[dict], problems: Problems) -> None:
    for doc in docs:
        if doc.get("kind") != "Secret":
            continue
        where = f"{file}: Secret/{doc['metadata']['name']}"
        if doc.get("data"):
            problems.add(where, "examples keep placeholders in stringData, never real data")
        for key, value in (doc.get("stringData") or {}).items():
            if not str(value).startswith("REPLACE_ME"):
                problems.add(where, f"{key} must be a REPLACE_ME placeholder, found a real-looking value")


def load(paths: list[Path]) -> dict[str, list[dict]]:
    return {path.name: [d for d in yaml.safe_load_all(path.read_text()) if d] for path in paths}


def check_all(manifests: dict[str, list[dict]]) -> list[str]:
    problems = Problems()
    for required in (SIDECAR, SHARED):
        if required not in manifests:
            problems.add(required, "missing")
    for file, docs in manifests.items():
        workloads = [d for d in docs if d.get("kind") == "Deployment"]
        if not workloads:
            problems.add(file, "no Deployment")
        for workload in workloads:
            check_workload(file, workload, docs, problems)
        check_secrets(file, docs, problems)
        if file == SHARED and not any(d.get("kind") == "Service" for d in docs):
            problems.add(file, "no Service in front of the shared instance")
    return problems.items


# ------------------------------------------------------------------ self-test


def deployment(m, file):
    return next(d for d in m[file] if d.get("kind") == "Deployment")


def keyrelay(m, file):
    spec = pod_spec(deployment(m, file))
    return next(c for c in (spec.get("initContainers") or []) + spec["containers"] if is_keyrelay(c))


def doc(m, file, kind, name=None):
    return next(d for d in m[file] if d.get("kind") == kind and (name is None or d["metadata"]["name"] == name))


def set_arg(m, file, flag, value):
    args = keyrelay(m, file)["args"]
    index = args.index(flag)
    args[index + 1] = value


def drop_arg(m, file, flag):
    args = keyrelay(m, file)["args"]
    index = args.index(flag)
    del args[index:index + 2]


def move_to_containers(m):
    spec = pod_spec(deployment(m, SIDECAR))
    container = spec["initContainers"].pop()
    container.pop("restartPolicy")
    spec["containers"].append(container)


def mount(m, file, name):
    return next(v for v in keyrelay(m, file)["volumeMounts"] if v["name"] == name)


def volume(m, file, name):
    return next(v for v in pod_spec(deployment(m, file))["volumes"] if v["name"] == name)


# (file, mutation, what the problem must mention)
MUTATIONS = [
    (SIDECAR, lambda m: keyrelay(m, SIDECAR).pop("restartPolicy"), "restartPolicy: Always"),
    (SIDECAR, move_to_containers, "native sidecar"),
    (SIDECAR, lambda m: keyrelay(m, SIDECAR)["readinessProbe"]["exec"]["command"].__setitem__(3, "http://127.0.0.1:9901/healthz"), "expected ['/keyrelay', 'health', '--url', 'http://127.0.0.1:9901/readyz']"),
    (SIDECAR, lambda m: keyrelay(m, SIDECAR)["livenessProbe"]["exec"]["command"].__setitem__(3, "http://127.0.0.1:8080/healthz"), "expected ['/keyrelay', 'health', '--url', 'http://127.0.0.1:9901/healthz']"),
    (SIDECAR, lambda m: keyrelay(m, SIDECAR)["startupProbe"]["exec"]["command"].pop(), "expected ['/keyrelay', 'health'"),
    (SIDECAR, lambda m: set_arg(m, SIDECAR, "--admin-listen", "127.0.0.1:9902"), "expected ['/keyrelay', 'health', '--url', 'http://127.0.0.1:9902/healthz']"),
    (SIDECAR, lambda m: set_arg(m, SIDECAR, "--admin-listen", "off"), "admin_listen is 'off'"),
    (SIDECAR, lambda m: keyrelay(m, SIDECAR).pop("startupProbe"), "startupProbe"),
    (SIDECAR, lambda m: keyrelay(m, SIDECAR).pop("readinessProbe"), "no readinessProbe"),
    (SIDECAR, lambda m: keyrelay(m, SIDECAR)["livenessProbe"].update(exec=None, tcpSocket={"port": 9901}) or keyrelay(m, SIDECAR)["livenessProbe"].pop("exec"), "must be an httpGet"),
    (SIDECAR, lambda m: keyrelay(m, SIDECAR)["livenessProbe"].pop("exec") and keyrelay(m, SIDECAR)["livenessProbe"].update(httpGet={"path": "/healthz", "port": 9901}), "kubelet"),
    (SIDECAR, lambda m: drop_arg(m, SIDECAR, "--key-file"), "key_file is not set"),
    (SIDECAR, lambda m: set_arg(m, SIDECAR, "--key-file", "/etc/api-key"), "not inside any volumeMount"),
    (SIDECAR, lambda m: mount(m, SIDECAR, "upstream-key").update(subPath="api-key"), "subPath"),
    (SIDECAR, lambda m: mount(m, SIDECAR, "upstream-key").pop("readOnly"), "readOnly"),
    (SIDECAR, lambda m: volume(m, SIDECAR, "upstream-key").update(secret=None, emptyDir={}) or volume(m, SIDECAR, "upstream-key").pop("secret"), "Secret volume"),
    (SIDECAR, lambda m: volume(m, SIDECAR, "upstream-key")["secret"].update(secretName="other"), "no Secret 'other'"),
    (SIDECAR, lambda m: doc(m, SIDECAR, "Secret")["stringData"].update({"api-key-2": "REPLACE_ME"}) or doc(m, SIDECAR, "Secret")["stringData"].pop("api-key"), "has no key"),
    (SIDECAR, lambda m: volume(m, SIDECAR, "upstream-key")["secret"].update(defaultMode=0o400), "not readable"),
    (SIDECAR, lambda m: keyrelay(m, SIDECAR)["securityContext"].update(readOnlyRootFilesystem=False), "readOnlyRootFilesystem"),
    (SIDECAR, lambda m: keyrelay(m, SIDECAR)["securityContext"].pop("allowPrivilegeEscalation"), "allowPrivilegeEscalation"),
    (SIDECAR, lambda m: keyrelay(m, SIDECAR)["securityContext"].pop("runAsNonRoot") and pod_spec(deployment(m, SIDECAR))["securityContext"].pop("runAsNonRoot"), "runAsNonRoot"),
    (SIDECAR, lambda m: keyrelay(m, SIDECAR)["securityContext"].update(runAsUser=0), "runAsUser"),
    (SIDECAR, lambda m: keyrelay(m, SIDECAR)["securityContext"]["capabilities"].update(drop=["NET_RAW"]), "drop must contain ALL"),
    (SIDECAR, lambda m: keyrelay(m, SIDECAR)["securityContext"].pop("seccompProfile") and pod_spec(deployment(m, SIDECAR))["securityContext"].pop("seccompProfile"), "RuntimeDefault"),
    (SIDECAR, lambda m: keyrelay(m, SIDECAR)["securityContext"]["seccompProfile"].update(type="Unconfined"), "RuntimeDefault"),
    (SIDECAR, lambda m: keyrelay(m, SIDECAR)["resources"].pop("limits"), "limits.memory"),
    (SIDECAR, lambda m: keyrelay(m, SIDECAR)["resources"]["requests"].pop("cpu"), "requests.cpu"),
    (SIDECAR, lambda m: set_arg(m, SIDECAR, "--listen", "0.0.0.0:8080"), "loopback"),
    (SIDECAR, lambda m: set_arg(m, SIDECAR, "--listen", "127.0.0.1:8081"), "keyrelay listens on port 8081"),
    (SIDECAR, lambda m: keyrelay(m, SIDECAR)["args"].append("--key_file=/x"), "not a keyrelay setting"),
    (SIDECAR, lambda m: keyrelay(m, SIDECAR)["args"].append("--no-such-setting=1"), "not a keyrelay setting"),
    (SIDECAR, lambda m: keyrelay(m, SIDECAR)["env"].append({"name": "KEYRELAY_LOGFORMAT", "value": "json"}), "not a keyrelay setting"),
    (SIDECAR, lambda m: keyrelay(m, SIDECAR)["env"].append({"name": "BASETEN_API_KEY", "value": "x"}), "also passed as env"),
    (SIDECAR, lambda m: pod_spec(deployment(m, SIDECAR)).pop("enableServiceLinks"), "enableServiceLinks"),
    (SIDECAR, lambda m: pod_spec(deployment(m, SIDECAR)).update(terminationGracePeriodSeconds=20), "terminationGracePeriodSeconds"),
    (SIDECAR, lambda m: doc(m, SIDECAR, "Secret")["stringData"].update({"api-key": "sk-live-0123456789"}), "placeholder"),
    (SIDECAR, lambda m: keyrelay(m, SIDECAR).update(image="keyrelay:latest"), "version tag"),
    (SIDECAR, lambda m: keyrelay(m, SIDECAR).update(command=["/bin/sh"]), "entrypoint"),
    (SHARED, lambda m: drop_arg(m, SHARED, "--access-token-files"), "access tokens are required"),
    (SHARED, lambda m: keyrelay(m, SHARED)["args"].append("--allow-unauthenticated-network"), "allow_unauthenticated_network"),
    (SHARED, lambda m: set_arg(m, SHARED, "--access-token-files", "/var/run/secrets/keyrelay-tokens/team-x"), "no key 'team-x'"),
    (SHARED, lambda m: mount(m, SHARED, "access-tokens").update(subPath="team-search"), "subPath"),
    (SHARED, lambda m: volume(m, SHARED, "access-tokens")["secret"].update(defaultMode=0o400), "not readable"),
    (SHARED, lambda m: pod_spec(deployment(m, SHARED))["securityContext"].pop("fsGroup"), "not readable"),
    (SHARED, lambda m: doc(m, SHARED, "Secret", "keyrelay-access-tokens")["stringData"].update({"team-chat": "REPLACE_ME_0123456789"}), "fails closed"),
    (SHARED, lambda m: set_arg(m, SHARED, "--allowed-hosts", "keyrelay,keyrelay.models"), "allowed_hosts lacks"),
    (SHARED, lambda m: [d["metadata"].update(namespace="other") for d in m[SHARED]] and None, "allowed_hosts lacks"),
    (SHARED, lambda m: doc(m, SHARED, "Service")["spec"]["ports"][0].update(targetPort="admin"), "not the proxy port"),
    (SHARED, lambda m: m[SHARED].remove(doc(m, SHARED, "NetworkPolicy")), "no NetworkPolicy"),
    (SHARED, lambda m: doc(m, SHARED, "NetworkPolicy")["spec"]["podSelector"]["matchLabels"].update(app="x"), "no NetworkPolicy"),
    (SHARED, lambda m: doc(m, SHARED, "NetworkPolicy")["spec"].update(policyTypes=["Egress"]), "Ingress"),
    (SHARED, lambda m: doc(m, SHARED, "NetworkPolicy")["spec"]["ingress"][0].pop("from"), "admits every source"),
    (SHARED, lambda m: doc(m, SHARED, "NetworkPolicy")["spec"]["ingress"][0].update({"from": [{"podSelector": {}}]}), "only labelled client pods"),
    (SHARED, lambda m: doc(m, SHARED, "NetworkPolicy")["spec"]["ingress"][0]["from"].append({"ipBlock": {"cidr": "0.0.0.0/0"}}), "only labelled client pods"),
    (SHARED, lambda m: doc(m, SHARED, "NetworkPolicy")["spec"]["ingress"][1].pop("ports"), "only labelled client pods"),
    (SHARED, lambda m: deployment(m, SHARED)["spec"].update(replicas=1), "2 replicas"),
    (SHARED, lambda m: set_arg(m, SHARED, "--listen", "127.0.0.1:8080"), "pod network"),
    (SHARED, lambda m: set_arg(m, SHARED, "--shutdown-delay", "30s"), "terminationGracePeriodSeconds"),
    (SHARED, lambda m: keyrelay(m, SHARED)["readinessProbe"]["httpGet"].update(port="http"), "not the admin port"),
    (SHARED, lambda m: keyrelay(m, SHARED)["readinessProbe"]["httpGet"].update(path="/healthz"), "expected /readyz"),
    (SHARED, lambda m: keyrelay(m, SHARED)["livenessProbe"]["httpGet"].update(path="/"), "expected /healthz"),
    (SHARED, lambda m: keyrelay(m, SHARED)["startupProbe"]["httpGet"].update(port=8080), "not the admin port"),
    (SHARED, lambda m: keyrelay(m, SHARED)["ports"][1].update(containerPort=9902), "named 'admin'"),
    (SHARED, lambda m: set_arg(m, SHARED, "--admin-listen", "127.0.0.1:9901"), "kubelet"),
    (SHARED, lambda m: drop_arg(m, SHARED, "--admin-listen"), "kubelet"),  # falls back to the image's loopback default
    (SHARED, lambda m: pod_spec(deployment(m, SHARED)).pop("enableServiceLinks"), "enableServiceLinks"),
    (SHARED, lambda m: m[SHARED].remove(doc(m, SHARED, "Service")), "no Service"),
]


def self_test(manifests: dict[str, list[dict]]) -> list[str]:
    failures = []
    for number, (file, mutate, expected) in enumerate(MUTATIONS):
        mutated = copy.deepcopy(manifests)
        mutate(mutated)
        problems = check_all(mutated)
        if not any(expected in problem for problem in problems):
            failures.append(f"mutation {number} of {file} (expecting a problem mentioning {expected!r}) was not caught; problems: {problems}")
    return failures


def check_schemas(manifests: dict[str, list[dict]]) -> list[str]:
    """Strict OpenAPI validation of every document: catches misspelt fields anywhere."""
    try:
        import kubernetes_validate
    except ImportError:
        print(f"check_manifests: installing {KUBERNETES_VALIDATE}", file=sys.stderr)
        subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", KUBERNETES_VALIDATE], check=True)
        import kubernetes_validate
    problems = []
    for file, docs in manifests.items():
        for document in docs:
            name = f"{document.get('kind')}/{document.get('metadata', {}).get('name')}"
            for version in SCHEMA_VERSIONS:
                version = kubernetes_validate.latest_version() if version == "latest" else version
                try:
                    kubernetes_validate.validate(document, version, strict=True)
                except kubernetes_validate.ValidationError as err:
                    path = ".".join(str(p) for p in err.path)
                    problems.append(f"{file}: {name}: not valid Kubernetes {version} at {path or '(top)'}: {err.message}")
    return problems


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def admin_status(port: int, path: str) -> int | None:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=2)
    try:
        conn.request("GET", path)
        return conn.getresponse().status
    except OSError:
        return None
    finally:
        conn.close()


def dry_run_one(binary: Path, file: str, workload: dict, docs: list[dict], real_tokens: bool) -> list[str]:
    """Starts `binary` as the manifest's keyrelay container would run (on loopback)."""
    spec = pod_spec(workload)
    container = next(c for c in (spec.get("initContainers") or []) + spec["containers"] if is_keyrelay(c))
    where = f"{file}: {workload['kind']}/{workload['metadata']['name']} (dry run, {'real-length' if real_tokens else 'placeholder'} tokens)"
    secrets = {d["metadata"]["name"]: d for d in docs if d.get("kind") == "Secret"}
    settings = effective_settings(container, where, Problems())
    token_paths = set(settings.get("access_token_files") or [])
    with tempfile.TemporaryDirectory(prefix="keyrelay-manifest-") as tmp:
        mounts = {}
        for mount in container.get("volumeMounts") or []:
            volume = next(v for v in spec["volumes"] if v["name"] == mount["name"])
            secret = secrets[volume["secret"]["secretName"]]
            directory = Path(tmp, mount["name"])
            directory.mkdir()
            data = secret.get("stringData") or {}
            items = volume["secret"].get("items") or [{"key": k, "path": k} for k in data]
            for item in items:
                target = directory / item["path"]
                value = data[item["key"]]
                if real_tokens and f"{mount['mountPath']}/{item['path']}" in token_paths:
                    value = random_secrets.token_hex(16)
                target.write_text(value + "\n")
            mounts[mount["mountPath"].rstrip("/")] = str(directory)

        def local(value: str) -> str:
            items = []
            for item in value.split(","):
                for mount_path, directory in mounts.items():
                    if item.startswith(mount_path + "/"):
                        item = directory + item[len(mount_path):]
                items.append(item)
            return ",".join(items)

        proxy, admin = free_port(), free_port()
        args = [local(str(a)) for a in container.get("args") or []]
        for flag, address in (("--listen", f"127.0.0.1:{proxy}"), ("--admin-listen", f"127.0.0.1:{admin}")):
            if flag in args:
                args[args.index(flag) + 1] = address
            else:
                args += [flag, address]
        env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin")}
        env.update({k: v for k, v in IMAGE_ENV.items() if k.startswith("KEYRELAY_")})
        env.update({e["name"]: local(str(e.get("value", ""))) for e in container.get("env") or []})
        proc = subprocess.Popen([str(binary), *args], env=env, stdin=subprocess.DEVNULL,
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            return watch_dry_run(proc, where, admin, bool(token_paths) and not real_tokens, container, binary)
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()


def run_probes(container: dict, binary: Path, admin: int, where: str) -> list[str]:
    """Runs the manifest's own probes against the running binary (admin port moved to `admin`)."""
    problems = []
    for name in ADMIN_PATHS:
        probe = container.get(name) or {}
        if "httpGet" in probe:
            status = admin_status(admin, probe["httpGet"].get("path", "/"))
            if status != 200:
                problems.append(f"{where}: {name} GET {probe['httpGet'].get('path')} answered {status}")
        elif "exec" in probe:
            command = [str(binary) if arg == "/keyrelay" else re.sub(r"//127\.0\.0\.1:\d+/", f"//127.0.0.1:{admin}/", arg)
                       for arg in probe["exec"].get("command") or []]
            result = subprocess.run(command, capture_output=True, timeout=30)
            if result.returncode != 0:
                problems.append(f"{where}: {name} command {probe['exec']['command']} exited {result.returncode}: "
                                f"{(result.stdout + result.stderr).decode(errors='replace').strip()}")
    return problems


def watch_dry_run(proc: subprocess.Popen, where: str, admin: int, must_refuse: bool, container: dict, binary: Path) -> list[str]:
    def output() -> str:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        return proc.communicate()[0].decode(errors="replace").strip()

    if must_refuse:
        try:
            code = proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            return [f"{where}: keyrelay started with the placeholder access tokens; they must fail closed"]
        text = output()
        if code != 64 or "shorter than" not in text:
            return [f"{where}: expected exit 64 naming the too-short placeholder tokens, got {code}: {text}"]
        return []
    deadline = time.monotonic() + 15
    while admin_status(admin, "/healthz") != 200:
        if proc.poll() is not None or time.monotonic() > deadline:
            return [f"{where}: keyrelay did not come up with the manifest's settings (status {proc.poll()}): {output()}"]
        time.sleep(0.1)
    if admin_status(admin, "/readyz") != 200:
        return [f"{where}: /readyz is not 200 after start"]
    probe_problems = run_probes(container, binary, admin, where)
    if probe_problems:
        return probe_problems
    proc.send_signal(signal.SIGTERM)
    try:
        code = proc.wait(timeout=60)
    except subprocess.TimeoutExpired:
        return [f"{where}: keyrelay did not exit within 60s of SIGTERM"]
    if code != 0:
        return [f"{where}: keyrelay exited {code} after SIGTERM: {output()}"]
    return []


def dry_run(manifests: dict[str, list[dict]], binary: Path) -> list[str]:
    if not os.access(binary, os.X_OK):
        return [f"--binary {binary} is not an executable (build it first: cargo build)"]
    problems = []
    for file, docs in manifests.items():
        for workload in (d for d in docs if d.get("kind") == "Deployment"):
            for real_tokens in (False, True):
                problems += dry_run_one(binary, file, workload, docs, real_tokens)
    return problems


def main(argv: list[str]) -> int:
    paths = sorted(MANIFESTS.glob("*.yaml"))
    manifests = load(paths)
    problems = check_all(manifests)
    if "--schema" in argv:
        problems += check_schemas(manifests)
    binary = None
    if "--binary" in argv:
        index = argv.index("--binary") + 1
        if index >= len(argv):
            print("deploy/check_manifests.py: --binary needs a path", file=sys.stderr)
            return 64
        binary = Path(argv[index])
    if binary is not None and not problems:
        problems += dry_run(manifests, binary)
    if problems:
        print("deploy/check_manifests.py: FAILED", file=sys.stderr)
        for problem in problems:
            print(f"  - {problem}", file=sys.stderr)
        return 1
    schema = f", strict Kubernetes {' and '.join(SCHEMA_VERSIONS)} schemas" if "--schema" in argv else ""
    if binary is not None:
        schema += f", started by {binary} with their own settings"
    print(f"deploy/check_manifests.py: {', '.join(p.name for p in paths)} pass every check "
          f"({len(SETTINGS)} keyrelay settings known{schema})")
    if "--self-test" in argv:
        failures = self_test(manifests)
        if failures:
            print("deploy/check_manifests.py --self-test: FAILED", file=sys.stderr)
            for failure in failures:
                print(f"  - {failure}", file=sys.stderr)
            return 1
        print(f"deploy/check_manifests.py --self-test: all {len(MUTATIONS)} mutations caught")
        if "--schema" in argv:
            mutated = copy.deepcopy(manifests)
            context = keyrelay(mutated, SHARED)["securityContext"]
            context["readOnlyRootFileSystem"] = context.pop("readOnlyRootFilesystem")
            caught = [p for p in check_schemas(mutated) if "readOnlyRootFileSystem" in p]
            if not caught:
                print("deploy/check_manifests.py --self-test: FAILED: the schema check missed a misspelt field", file=sys.stderr)
                return 1
            print("deploy/check_manifests.py --self-test: the schema check catches a misspelt field")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
