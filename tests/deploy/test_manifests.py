"""docker-compose.yml, deploy/k8s and deploy/prometheus, cross-checked against the code.

No Docker or Kubernetes here: the manifests are parsed and every command line is run
through the real `llmfleet` argument parser, every LLMFLEET_* variable must name a real
flag, and names and ports must agree across files (the image, NATS URLs and users,
gateway/worker ports vs containerPort vs Service vs Prometheus, KEDA's stream and
consumer vs common.names). The closed defaults are checked too: every published port on
the host's loopback, no password without which compose would still start, monitoring on
loopback except inside compose's containers, no Secret applied by `kubectl apply -k`.
"""

from __future__ import annotations

import argparse
import re
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
import yaml

from common import names
from llmfleet.cli import build_parser
from tests.deploy.natsconf import password_env

REPO = Path(__file__).resolve().parents[2]
COMPOSE = REPO / "docker-compose.yml"
K8S = REPO / "deploy" / "k8s"
NATS_DIR = REPO / "deploy" / "nats"
ACCOUNTS = (NATS_DIR / "accounts.conf").read_text()
HUB_CONF = (NATS_DIR / "hub.conf").read_text()
LEAF_CONF = (NATS_DIR / "leaf.conf").read_text()
COMPOSE_CONF = (NATS_DIR / "compose.conf").read_text()
COMPOSE_NATS_CONF = "/etc/nats/compose.conf"
ENV = password_env()
"""What `.env` holds for compose: one password per NATS user (the names accounts.conf reads)."""
IMAGE_REPO = "llmfleet"
ROLE_OF = {"gateway": "gateway", "worker": "worker", "status": "admin", "drain": "admin"}


# ---- helpers ------------------------------------------------------------------------------


class MissingVariable(Exception):
    """`${VAR:?message}` with VAR unset or empty: compose refuses to start."""


_VARIABLE = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?:(:?[-?])([^}]*))?\}")


def _interpolate(text: str, env: dict[str, str]) -> str:
    """Compose's `${VAR}`, `${VAR:-default}`, `${VAR-default}`, `${VAR:?err}`, `${VAR?err}`."""

    def one(m: re.Match[str]) -> str:
        name, op, arg = m.group(1), m.group(2), m.group(3)
        value = env.get(name)
        empty = value is None or (value == "" and op is not None and op.startswith(":"))
        if op in ("-", ":-"):
            return arg if empty else str(value)
        if op in ("?", ":?"):
            if empty:
                raise MissingVariable(f"required variable {name} is missing a value: {arg}")
            return str(value)
        return value or ""

    return _VARIABLE.sub(one, text)


def _interpolate_values(node: Any, env: dict[str, str]) -> Any:
    """As compose does: parse first, then interpolate every string value (not comments)."""
    if isinstance(node, dict):
        return {k: _interpolate_values(v, env) for k, v in node.items()}
    if isinstance(node, list):
        return [_interpolate_values(v, env) for v in node]
    return _interpolate(node, env) if isinstance(node, str) else node


def _compose(text: str | None = None, env: dict[str, str] | None = None) -> dict[str, Any]:
    parsed = yaml.safe_load(text or COMPOSE.read_text())
    doc: dict[str, Any] = _interpolate_values(parsed, ENV if env is None else env)
    return doc


def _compose_with_gpu_example() -> dict[str, Any]:
    """The compose file with its commented vLLM example uncommented."""
    lines = COMPOSE.read_text().splitlines()
    start = lines.index("  # vllm:")
    end = next(i for i in range(start, len(lines)) if lines[i].startswith("  # (and add"))
    for i in range(start, end):
        assert lines[i].startswith("  #"), lines[i]
        lines[i] = "  " + lines[i][4:] if lines[i].startswith("  # ") else ""
    return _compose("\n".join(lines) + "\n")


def _subparsers() -> dict[str, argparse.ArgumentParser]:
    top = build_parser()
    action = next(a for a in top._actions if isinstance(a, argparse._SubParsersAction))
    return dict(action.choices)


def _env_names(p: argparse.ArgumentParser) -> set[str]:
    """LLMFLEET_* variables a parser reads, from its flags' help (`[env NAME ...]`)."""
    found = set()
    for action in p._actions:
        found.update(re.findall(r"\[env (LLMFLEET_[A-Z0-9_]+)", action.help or ""))
    return found


def _parse(argv: list[str], env: dict[str, str], where: str) -> argparse.Namespace:
    """Parse an llmfleet command line; its LLMFLEET_* variables must be real flags."""
    try:
        args = build_parser().parse_args([str(a) for a in argv])
    except SystemExit as exc:
        raise AssertionError(f"{where}: `llmfleet {' '.join(map(str, argv))}` fails") from exc
    known = _env_names(_subparsers()[args.command]) | _env_names(build_parser())
    unknown = {k for k in env if k.startswith("LLMFLEET_")} - known
    assert not unknown, f"{where}: {sorted(unknown)} are no flags of `llmfleet {args.command}`"
    return args


def _flag(argv: list[str], flag: str) -> str | None:
    """The value of `flag` in argv (`--flag v` or `--flag=v`), or None."""
    for i, a in enumerate(map(str, argv)):
        if a == flag:
            return str(argv[i + 1])
        if a.startswith(flag + "="):
            return a.split("=", 1)[1]
    return None


def _nats_urls(args: argparse.Namespace, env: dict[str, str]) -> list[Any]:
    raw = env.get("LLMFLEET_NATS_URL") or args.nats_url
    return [urlsplit(u.strip()) for u in raw.split(",")]


def _account_users() -> set[str]:
    return set(re.findall(r'\{ user: "([^"]+)"', ACCOUNTS))


def _password_vars() -> set[str]:
    return set(re.findall(r"\$(NATS_[A-Z_]+_PASSWORD)", ACCOUNTS))


def _k8s_docs() -> dict[str, list[dict[str, Any]]]:
    return {
        f.name: [d for d in yaml.safe_load_all(f.read_text()) if d]
        for f in sorted(K8S.glob("*.yaml"))
    }


def _k8s(kind: str) -> list[dict[str, Any]]:
    return [d for docs in _k8s_docs().values() for d in docs if d.get("kind") == kind]


def _llmfleet_containers(dep: dict[str, Any]) -> list[dict[str, Any]]:
    cs = dep["spec"]["template"]["spec"]["containers"]
    return [c for c in cs if c["image"].split(":")[0].split("/")[-1] == IMAGE_REPO]


def _k8s_env(container: dict[str, Any]) -> dict[str, str]:
    return {e["name"]: e.get("value", "") for e in container.get("env", [])}


def _llmfleet_services(compose: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {
        n: s
        for n, s in compose["services"].items()
        if str(s.get("image", "")).split(":")[0] == IMAGE_REPO
    }


# ---- docker-compose.yml -------------------------------------------------------------------


def test_compose_llmfleet_services_use_real_commands_flags_and_env() -> None:
    compose = _compose()
    services = _llmfleet_services(compose)
    assert {"gateway", "worker-sim"} <= set(services)
    for name, svc in services.items():
        assert svc["build"]["dockerfile"] == "deploy/Dockerfile"
        assert (REPO / svc["build"]["dockerfile"]).is_file()
        args = _parse(svc["command"], svc.get("environment", {}), f"compose {name}")
        assert args.command in ("gateway", "worker")
        # A cluster of three: the stream and the body store are replicated.
        assert args.stream_replicas == 3, name


def test_compose_gpu_example_is_valid_when_uncommented() -> None:
    compose = _compose_with_gpu_example()
    svc = compose["services"]["worker-qwen"]
    args = _parse(svc["command"], svc["environment"], "compose worker-qwen")
    assert (args.command, args.engine, args.model) == ("worker", "openai", ["qwen2.5:7b"])
    upstream = urlsplit(args.upstream)
    assert upstream.hostname == "vllm"
    vllm = compose["services"]["vllm"]
    assert f"{upstream.port}" == _flag(vllm["command"], "--port")
    assert _flag(vllm["command"], "--served-model-name") == "qwen2.5:7b"
    assert set(svc["depends_on"]) <= set(compose["services"])


def test_compose_nats_urls_name_the_cluster_and_the_role_users() -> None:
    compose = _compose()
    nats_services = sorted(n for n in compose["services"] if re.fullmatch(r"nats-\d", n))
    assert nats_services == ["nats-1", "nats-2", "nats-3"]
    server_env = compose["services"]["nats-1"]["environment"]
    for name, svc in _llmfleet_services(compose).items():
        env = svc.get("environment", {})
        args = _parse(svc["command"], env, name)
        urls = _nats_urls(args, env)
        assert sorted(u.hostname for u in urls) == nats_services, name
        role = ROLE_OF[args.command]
        assert role in _account_users()
        for u in urls:
            assert (u.scheme, u.port, u.username) == ("nats", 4222, role), name
            # the same password (from .env) the servers get for that user
            assert u.password == server_env[f"NATS_{role.upper()}_PASSWORD"], name
            assert u.password == ENV[f"NATS_{role.upper()}_PASSWORD"], name


def test_compose_nats_nodes_load_the_deployed_configs() -> None:
    compose = _compose()
    routes = re.findall(r"nats-route://([a-z0-9-]+):(\d+)", HUB_CONF)
    assert sorted(h for h, _ in routes) == ["nats-1", "nats-2", "nats-3"]
    assert {p for _, p in routes} == {"6222"}
    for n in ("nats-1", "nats-2", "nats-3"):
        svc = compose["services"][n]
        assert svc["image"].startswith("nats:")
        host_paths = [v.split(":")[:2] for v in svc["volumes"] if v.startswith("./")]
        mounts = {container: host for host, container in host_paths}
        conf = _flag(svc["command"], "--config")
        assert conf is not None
        host_dir = mounts[str(Path(conf).parent)]
        assert (REPO / host_dir).resolve() == NATS_DIR
        # compose.conf (hub.conf, monitoring open in the container); the name from --name
        assert conf == COMPOSE_NATS_CONF
        assert _flag(svc["command"], "--name") == n
        assert 'include "hub.conf"' in (NATS_DIR / Path(conf).name).read_text()
        # store_dir "/data" is a volume; every password accounts.conf reads is set
        assert any(v.endswith(":/data") for v in svc["volumes"])
        assert set(svc["environment"]) == _password_vars()
        container_ports = {p.split(":")[-1] for p in svc["ports"]}
        assert container_ports == {"4222", "7422", "8222"}
    # The nodes' files outside compose: the same hub.conf, the name set in the file.
    for n in ("nats-1", "nats-2", "nats-3"):
        node_conf = (NATS_DIR / f"{n}.conf").read_text()
        assert f"server_name: {n}\n" in node_conf and 'include "hub.conf"' in node_conf
    for listen in ('listen: "0.0.0.0:4222"', 'listen: "0.0.0.0:6222"', 'http: "127.0.0.1:8222"'):
        assert listen in HUB_CONF
    assert "leafnodes {" in HUB_CONF and "port: 7422" in HUB_CONF


def test_compose_gateway_replicas_ports_and_healthcheck() -> None:
    compose = _compose()
    gw = compose["services"]["gateway"]
    args = _parse(gw["command"], gw["environment"], "gateway")
    assert args.host == "0.0.0.0"
    replicas = gw["deploy"]["replicas"]
    assert replicas == 2
    (mapping,) = gw["ports"]
    address, host, container = mapping.split(":")
    assert address == "127.0.0.1"
    assert int(container) == args.port
    first, last = (int(p) for p in host.split("-"))
    assert last - first + 1 == replicas  # one host port per replica
    probe = " ".join(gw["healthcheck"]["test"])
    assert f"127.0.0.1:{args.port}/healthz" in probe
    assert int(gw["stop_grace_period"].rstrip("s")) > 30  # open streams get 30 s


def _published(compose: dict[str, Any]) -> dict[str, list[str]]:
    return {n: [str(p) for p in s.get("ports", [])] for n, s in compose["services"].items()}


@pytest.mark.parametrize("gpu_example", [False, True])
def test_compose_publishes_every_port_on_the_hosts_loopback_only(gpu_example: bool) -> None:
    compose = _compose_with_gpu_example() if gpu_example else _compose()
    published = _published(compose)
    assert {"nats-1", "gateway", "prometheus"} <= {n for n, ps in published.items() if ps}
    for service, ports in published.items():
        for mapping in ports:
            # "127.0.0.1:HOST:CONTAINER": a bare "HOST:CONTAINER" means every interface
            assert mapping.startswith("127.0.0.1:") and mapping.count(":") == 2, (service, mapping)


def test_compose_has_no_default_nats_passwords() -> None:
    raw = "\n".join(line.split(" #")[0] for line in COMPOSE.read_text().splitlines()
                    if not line.lstrip().startswith("#"))  # fmt: skip
    uses = re.findall(r"\$\{(NATS_[A-Z_]+_PASSWORD)([^}]*)\}", raw)
    assert {name for name, _ in uses} == _password_vars()
    for name, rest in uses:
        # `${VAR:?...}`: compose stops when the password is unset or empty; no `:-` default
        assert rest.startswith(":?"), f"${{{name}{rest}}}"
    # Nothing else falls back silently except the documented empty, off-by-default ones.
    defaults = {m.group(1) for m in _VARIABLE.finditer(raw) if m.group(2) in ("-", ":-")}
    assert defaults <= {"LLMFLEET_API_KEY", "HF_TOKEN"}, defaults
    assert all(not m.group(3) for m in _VARIABLE.finditer(raw) if m.group(2) in ("-", ":-"))
    for dev in ("gateway-dev", "worker-dev", "admin-dev", "sys-dev", "leaf-dev"):
        assert dev not in raw
    # Without .env, compose fails and names a password; with it, it starts.
    with pytest.raises(MissingVariable, match=r"NATS_[A-Z_]+_PASSWORD"):
        _compose(env={})
    for name in sorted(_password_vars()):
        with pytest.raises(MissingVariable, match=name):
            _compose(env={**ENV, name: ""})
    _compose(env=ENV)


def test_deploy_readme_generates_every_password_compose_needs() -> None:
    """The documented .env one-liners set exactly the variables compose requires."""
    readme = (REPO / "deploy" / "README.md").read_text()
    roles = re.findall(r'for r in "([A-Z_ ]+)"\.split\(\)', readme)
    roles += re.findall(r"for r in ([A-Z_ ]+); do", readme)
    assert len(roles) >= 2, "the python and the shell one-liner"
    for found in roles:
        assert {f"NATS_{r}_PASSWORD" for r in found.split()} == _password_vars()
    assert "openssl rand -hex 24" in readme and "secrets.token_hex(24)" in readme


def _conf_http(text: str) -> list[str]:
    """The monitoring listen addresses a nats-server config sets (`http:`/`https:`)."""
    return re.findall(r'^\s*https?\s*[:=]\s*"?([^"\s]+)"?', text, re.M)


def test_monitoring_listens_on_loopback_except_inside_compose_containers() -> None:
    confs = {f.name: f.read_text() for f in sorted(NATS_DIR.glob("*.conf"))}
    assert {"hub.conf", "leaf.conf", "compose.conf", "nats-1.conf", "tls.conf"} <= set(confs)
    for name, text in confs.items():
        for addr in _conf_http(text):
            if name == "compose.conf":
                continue
            assert addr.startswith("127.0.0.1:"), (name, addr)
        # a bare port would listen on the client address (0.0.0.0 in hub.conf)
        code = re.sub(r"#.*", "", text)
        assert not re.search(r"^\s*(https?_port|monitor_port)\s*[:=]", code, re.M), name
    assert _conf_http(confs["hub.conf"]) == ["127.0.0.1:8222"]
    assert _conf_http(confs["leaf.conf"]) == []  # no monitoring on a GPU host's leaf
    # compose.conf opens it inside the container, after hub.conf (the later one wins) ...
    compose_conf = confs["compose.conf"]
    assert _conf_http(compose_conf) == ["0.0.0.0:8222"]
    assert compose_conf.index('include "hub.conf"') < compose_conf.index('http: "0.0.0.0:8222"')
    # ... and only services that publish 8222 on the host's loopback load it.
    compose = _compose()
    users = [n for n, s in compose["services"].items() if COMPOSE_NATS_CONF in s.get("command", [])]
    assert users == ["nats-1", "nats-2", "nats-3"]
    for n in users:
        monitor = [p for p in compose["services"][n]["ports"] if p.endswith(":8222")]
        assert len(monitor) == 1 and monitor[0].startswith("127.0.0.1:"), (n, monitor)


def test_prometheus_scrapes_the_real_services_and_ports() -> None:
    compose = _compose()
    prom = compose["services"]["prometheus"]
    assert prom["image"].startswith("prom/prometheus:")
    src, dst = prom["volumes"][0].split(":")[:2]
    assert _flag(prom["command"], "--config.file") == dst
    config = yaml.safe_load((REPO / src).read_text())
    jobs = {j["job_name"]: j for j in config["scrape_configs"]}
    gw = compose["services"]["gateway"]
    _parse(gw["command"], gw["environment"], "gateway")  # a valid command line
    worker = compose["services"]["worker-sim"]
    w_args = _parse(worker["command"], worker["environment"], "worker-sim")
    assert w_args.metrics_port == 9100 and w_args.metrics_host == "0.0.0.0"
    # The gateway's metrics come from its private listener (no auth, not published).
    listen = gw["environment"]["LLMFLEET_METRICS_LISTEN"]
    metrics_port = int(listen.rpartition(":")[2])
    assert listen.startswith("0.0.0.0:")
    assert not [p for p in gw["ports"] if str(metrics_port) in p]
    expected = {"llmfleet-gateway": ("gateway", metrics_port),
                "llmfleet-worker": ("worker-sim", w_args.metrics_port)}  # fmt: skip
    for job, (service, port) in expected.items():
        (sd,) = jobs[job]["dns_sd_configs"]
        assert (sd["names"], sd["type"], sd["port"]) == ([service], "A", port)
        assert jobs[job].get("metrics_path", "/metrics") == "/metrics"
        assert service in compose["services"]


# ---- deploy/k8s ---------------------------------------------------------------------------


def test_k8s_yaml_parses_and_kustomization_lists_real_files() -> None:
    docs = _k8s_docs()
    assert len(docs) >= 7
    kust = docs["kustomization.yaml"][0]
    for res in kust["resources"]:
        assert (K8S / res).is_file(), res
    assert "worker-vllm.yaml" in docs  # the GPU example, outside the default resources
    assert [i["name"] for i in kust["images"]] == [IMAGE_REPO]


def test_kustomization_applies_no_secret_and_no_example() -> None:
    docs = _k8s_docs()
    kust = docs["kustomization.yaml"][0]
    assert "nats-secret.yaml" not in kust["resources"]
    assert not (K8S / "nats-secret.yaml").exists()
    assert not set(kust) & {"secretGenerator", "configMapGenerator"}
    for res in kust["resources"]:
        assert ".example." not in res, res
        assert all(d.get("kind") != "Secret" for d in docs[res]), res
    examples = sorted(n for n in docs if ".example." in n)
    assert examples == ["nats-networkpolicy.example.yaml", "nats-secret.example.yaml"]


def test_k8s_secret_is_created_out_of_band_with_the_keys_the_pods_read() -> None:
    """Every secretKeyRef of the llmfleet pods names `llmfleet-nats` and a key that the
    documented `kubectl create secret` command creates; the example holds no password."""
    (example,) = _k8s_docs()["nats-secret.example.yaml"]
    assert example["metadata"]["name"] == "llmfleet-nats"
    refs = set()
    for dep in _k8s("Deployment"):
        for c in _llmfleet_containers(dep):
            for e in c.get("env", []):
                ref = e.get("valueFrom", {}).get("secretKeyRef")
                if ref and not ref.get("optional"):
                    refs.add((ref["name"], ref["key"]))
    assert refs == {("llmfleet-nats", "gateway-password"), ("llmfleet-nats", "worker-password")}
    assert {k for _, k in refs} <= set(example["stringData"])
    for value in example["stringData"].values():
        assert value.startswith("REPLACE-WITH-"), value
    docs = [(K8S / "nats-secret.example.yaml").read_text(), (REPO / "deploy/README.md").read_text()]
    for text in docs:
        create = re.search(
            r"create secret generic llmfleet-nats(.*?)(?:\n\n|\n```|\n#\n)", text, re.S
        )
        assert create, "the kubectl command is documented"
        keys = set(re.findall(r"--from-literal=([a-z-]+)=", create.group(1)))
        assert keys == set(example["stringData"]), keys
    # The NATS servers' Secret: its keys are the variables accounts.conf reads.
    values = (K8S / "nats-values.yaml").read_text()
    assert "create secret generic nats-llmfleet-passwords --from-env-file=.env" in values


def test_nats_network_policy_example_covers_the_hub_ports() -> None:
    (policy,) = _k8s_docs()["nats-networkpolicy.example.yaml"]
    assert policy["kind"] == "NetworkPolicy" and policy["metadata"]["namespace"] == "nats"
    rules = {r["ports"][0]["port"]: r for r in policy["spec"]["ingress"]}
    cfg = _nats_values()["config"]
    assert set(rules) == {4222, 6222, cfg["leafnodes"]["port"], cfg["monitor"]["port"]}
    # Monitoring has no authentication: only KEDA's namespace, never everyone.
    (monitor_from,) = rules[cfg["monitor"]["port"]]["from"]
    assert monitor_from == {
        "namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "keda"}}
    }
    assert "from" in rules[4222] and "from" in rules[6222]
    assert "from" not in rules[cfg["leafnodes"]["port"]]  # GPU hosts from anywhere (TLS)


def test_image_is_the_same_in_compose_and_k8s() -> None:
    images = {s["image"] for s in _llmfleet_services(_compose()).values()}
    deployments = _k8s("Deployment")
    assert len(deployments) >= 3
    for dep in deployments:
        cs = _llmfleet_containers(dep)
        assert cs, dep["metadata"]["name"]
        for c in cs:
            images.add(c["image"])
            # args only: the image's ENTRYPOINT is `llmfleet`
            assert "command" not in c
    assert {i.split(":")[0] for i in images} == {IMAGE_REPO}
    assert len(images) == 1, images
    dockerfile = (REPO / "deploy" / "Dockerfile").read_text()
    assert 'ENTRYPOINT ["llmfleet"]' in dockerfile


def _nats_values() -> dict[str, Any]:
    return _k8s_docs()["nats-values.yaml"][0]


def test_k8s_llmfleet_pods_use_real_flags_nats_urls_and_secrets() -> None:
    # The shape of the Secret created out of band (nats-secret.example.yaml)
    secret = next(s for s in _k8s("Secret") if s["metadata"]["name"] == "llmfleet-nats")
    values = _nats_values()
    replicas = values["config"]["cluster"]["replicas"]
    assert replicas == 3
    expected_hosts = [f"nats-{i}.nats-headless.nats.svc.cluster.local" for i in range(replicas)]
    for dep in _k8s("Deployment"):
        for c in _llmfleet_containers(dep):
            where = f"{dep['metadata']['name']}/{c['name']}"
            env = _k8s_env(c)
            args = _parse(c["args"], env, where)
            role = ROLE_OF[args.command]
            assert args.stream_replicas == replicas, where
            urls = _nats_urls(args, env)
            assert [u.hostname for u in urls] == expected_hosts, where
            for u in urls:
                assert (u.port, u.username, u.password) == (4222, role, "$(NATS_PASSWORD)")
            # $(NATS_PASSWORD) is defined before use, from the role's key of the Secret
            order = [e["name"] for e in c["env"]]
            assert order.index("NATS_PASSWORD") < order.index("LLMFLEET_NATS_URL"), where
            ref = next(e for e in c["env"] if e["name"] == "NATS_PASSWORD")["valueFrom"]
            ref = ref["secretKeyRef"]
            assert ref["name"] == "llmfleet-nats" and ref["key"] == f"{role}-password"
            assert ref["key"] in secret["stringData"]


def _container_port(c: dict[str, Any], name_or_port: str | int) -> int:
    for p in c["ports"]:
        if name_or_port in (p.get("name"), p["containerPort"]):
            return int(p["containerPort"])
    raise AssertionError(f"no port {name_or_port!r} in {c['name']}")


def test_k8s_gateway_ports_probes_and_service_agree() -> None:
    (dep,) = [d for d in _k8s("Deployment") if d["metadata"]["name"] == "llmfleet-gateway"]
    assert dep["spec"]["replicas"] == 2
    (c,) = _llmfleet_containers(dep)
    args = _parse(c["args"], _k8s_env(c), "gateway")
    assert args.command == "gateway" and args.host == "0.0.0.0"
    assert _container_port(c, "http") == args.port
    assert c["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert c["livenessProbe"]["httpGet"]["path"] == "/healthz"
    for probe in ("readinessProbe", "livenessProbe"):
        assert _container_port(c, c[probe]["httpGet"]["port"]) == args.port
    ann = dep["spec"]["template"]["metadata"]["annotations"]
    assert ann["prometheus.io/scrape"] == "true"
    # scraped on the metrics listener, a pod port the Service does not expose
    listen = {e["name"]: e.get("value") for e in c["env"]}["LLMFLEET_METRICS_LISTEN"]
    assert int(ann["prometheus.io/port"]) == int(listen.rpartition(":")[2])
    assert _container_port(c, "metrics") == int(ann["prometheus.io/port"])
    assert ann["prometheus.io/path"] == "/metrics"
    spec = dep["spec"]["template"]["spec"]
    assert 30 < spec["terminationGracePeriodSeconds"] <= 60
    (svc,) = [s for s in _k8s("Service") if s["metadata"]["name"] == "llmfleet-gateway"]
    assert svc["spec"]["selector"] == dep["spec"]["selector"]["matchLabels"]
    (port,) = svc["spec"]["ports"]
    assert _container_port(c, port["targetPort"]) == args.port


def _worker_deployments() -> dict[str, tuple[dict[str, Any], argparse.Namespace]]:
    out = {}
    for dep in _k8s("Deployment"):
        for c in _llmfleet_containers(dep):
            args = _parse(c["args"], _k8s_env(c), dep["metadata"]["name"])
            if args.command == "worker":
                out[dep["metadata"]["name"]] = (dep, args)
    return out


def test_k8s_workers_metrics_drain_and_gpu() -> None:
    workers = _worker_deployments()
    assert {"llmfleet-worker-sim-model", "llmfleet-worker-qwen2-5-7b"} <= set(workers)
    for name, (dep, args) in workers.items():
        (c,) = _llmfleet_containers(dep)
        assert args.metrics_host == "0.0.0.0", name
        assert _container_port(c, "metrics") == args.metrics_port == 9100, name
        ann = dep["spec"]["template"]["metadata"]["annotations"]
        assert int(ann["prometheus.io/port"]) == args.metrics_port, name
        # SIGTERM drains: the pod must outlive --drain-grace
        grace = dep["spec"]["template"]["spec"]["terminationGracePeriodSeconds"]
        assert grace > args.drain_grace, name
        assert "LLMFLEET_WORKER_ID" in _k8s_env(c)
        assert len(args.model) == 1, "one model per Deployment, so KEDA scales per model"
    dep, args = workers["llmfleet-worker-qwen2-5-7b"]
    pod = dep["spec"]["template"]["spec"]
    vllm = next(c for c in pod["containers"] if c["name"] == "vllm")
    assert vllm["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert args.engine == "openai"
    assert urlsplit(args.upstream).port == int(_flag(vllm["args"], "--port") or 0)
    assert _flag(vllm["args"], "--served-model-name") == args.model[0]


def test_keda_scales_each_worker_deployment_on_its_models_consumer() -> None:
    workers = _worker_deployments()
    scaled = _k8s("ScaledObject")
    assert {s["spec"]["scaleTargetRef"]["name"] for s in scaled} == set(workers)
    monitor_port = _nats_values()["config"]["monitor"]["port"]
    for so in scaled:
        _, args = workers[so["spec"]["scaleTargetRef"]["name"]]
        (trigger,) = so["spec"]["triggers"]
        assert trigger["type"] == "nats-jetstream"
        meta = trigger["metadata"]
        assert meta["stream"] == names.REQUEST_STREAM
        assert meta["consumer"] == names.consumer_name(args.model[0])
        assert f"\n  {meta['account']}: {{" in ACCOUNTS  # the account llmfleet's users are in
        host, port = meta["natsServerMonitoringEndpoint"].rsplit(":", 1)
        assert host == "nats-headless.nats.svc.cluster.local"
        assert int(port) == monitor_port
        assert int(meta["lagThreshold"]) > 0
        assert so["spec"]["minReplicaCount"] >= 1


def test_nats_helm_values_match_the_hub_config() -> None:
    values = _nats_values()
    cfg = values["config"]
    assert cfg["jetstream"]["enabled"] and cfg["leafnodes"]["enabled"]
    domain = cfg["jetstream"]["merge"]["domain"]
    assert f'domain: "{domain}"' in HUB_CONF
    assert f'"$JS.API.>": "$JS.{domain}.API.>"' in LEAF_CONF
    assert cfg["leafnodes"]["port"] == 7422 and cfg["monitor"]["port"] == 8222
    assert cfg["merge"]["max_payload"] == "<< 8MB >>"
    assert cfg["merge"]["00$include"] == "accounts.conf"
    assert set(values["container"]["env"]) == _password_vars()


@pytest.mark.parametrize("path", ["README.md", "docs/protocol.md", "deploy/README.md"])
def test_docs_link_deploy_files_that_exist(path: str) -> None:
    text = (REPO / path).read_text()
    base = (REPO / path).parent
    links = re.findall(r"\]\(((?:\.\./)*(?:deploy/)?[\w./-]+\.(?:conf|ya?ml|md))\)", text)
    deploy_links = [link for link in links if "deploy" in link or path.startswith("deploy/")]
    assert deploy_links, path
    for link in deploy_links:
        assert (base / link).is_file(), f"{path} links {link}"


def test_the_image_build_copies_every_package_the_project_ships() -> None:
    import tomllib  # noqa: PLC0415

    meta = tomllib.loads((REPO / "pyproject.toml").read_text())
    top = {p.split(".")[0] for p in meta["tool"]["setuptools"]["packages"]}
    copied = set(
        re.findall(r"^COPY (\w+) \./\1$", (REPO / "deploy" / "Dockerfile").read_text(), re.M)
    )
    assert top == {"common", "control", "gateway", "worker", "llmfleet"}
    assert top <= copied, f"deploy/Dockerfile does not copy {sorted(top - copied)}"
