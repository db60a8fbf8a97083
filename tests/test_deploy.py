"""What ``deploy/`` runs (SPEC O1), checked without Docker or Kubernetes (neither
runs here): the files parse, every setting they name exists, the services and
objects have what running them needs, and the real nginx and systemd accept
their configuration."""

from __future__ import annotations

import dataclasses
import importlib.util
import ipaddress
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from idp.settings import Settings
from tests import live, servers

try:
    import httpx2 as httpx
except ImportError:  # pragma: no cover
    import httpx

ROOT = Path(__file__).resolve().parent.parent
DEPLOY = ROOT / "deploy"
SETTINGS = {"IDP_" + f.name.upper() for f in dataclasses.fields(Settings)}
HINT = "Run `make test`, which installs it (scripts/bootstrap.sh --test)."


def _files():
    return [p for p in DEPLOY.rglob("*") if p.is_file() and "dev" not in p.relative_to(DEPLOY).parts
            and "__pycache__" not in p.parts and p.suffix != ".py"]


def _yaml(name: str) -> list[dict]:
    return [d for d in yaml.safe_load_all((DEPLOY / name).read_text()) if d]


def _k8s() -> dict[tuple[str, str], dict]:
    objects = {}
    for path in sorted((DEPLOY / "kubernetes").glob("*.yaml")):
        for doc in yaml.safe_load_all(path.read_text()):
            if doc and doc["kind"] != "Kustomization":
                objects[(doc["kind"], doc["metadata"]["name"])] = doc
    return objects


# -- every file ----------------------------------------------------------------------------------
def test_every_yaml_file_parses():
    found = [p for p in _files() if p.suffix in (".yaml", ".yml")]
    assert len(found) >= 5
    for path in found:
        assert list(yaml.safe_load_all(path.read_text())), path


def test_every_setting_named_in_deploy_exists():
    named = {name: path for path in _files() for name in re.findall(r"\bIDP_[A-Z0-9_]+", path.read_text())}
    assert "IDP_DATABASE_URL" in named and "IDP_REDIS_URL" in named
    unknown = {name: str(path.relative_to(ROOT)) for name, path in named.items() if name not in SETTINGS}
    assert not unknown, f"not settings in idp/settings.py: {unknown}"


# -- docker compose ------------------------------------------------------------------------------
def test_compose_runs_two_providers_on_one_database_redis_and_key_volume():
    [compose] = _yaml("compose.yaml")
    services = compose["services"]
    assert {"idp-1", "idp-2", "postgres", "redis", "nginx", "school-portal", "commerce-portal"} <= set(services)
    for name, service in services.items():
        assert service.get("healthcheck", {}).get("test"), f"{name} has no healthcheck"
        assert service.get("image") or service.get("build"), name
    providers = [services["idp-1"], services["idp-2"]]
    for provider in providers:
        env = provider["environment"]
        assert set(k for k in env if k.startswith("IDP_")) <= SETTINGS
        assert env["IDP_DATABASE_URL"].startswith("postgresql+psycopg://") and "@postgres:" in env["IDP_DATABASE_URL"]
        assert env["IDP_REDIS_URL"].startswith("redis://redis:")
        assert "/readyz" in " ".join(provider["healthcheck"]["test"])
        assert f"keys:{env['IDP_KEYS_DIR']}" in provider["volumes"]  # one key directory for every process
        assert provider["depends_on"]["postgres"]["condition"] == "service_healthy"
        assert "ports" not in provider  # reached through nginx only (it is the one trusted proxy)
    assert providers[0]["environment"] == providers[1]["environment"]
    nginx = services["nginx"]
    assert "./nginx:/etc/nginx/idp:ro" in nginx["volumes"] and "/etc/nginx/idp/nginx.conf" in nginx["command"]
    assert {"80:80", "443:443"} == set(nginx["ports"])
    for portal in ("school-portal", "commerce-portal"):
        module = services[portal]["command"][-1]
        assert module == "clients." + portal.replace("-", "_") and importlib.util.find_spec(module + ".__main__")
    for portal in ("school-portal", "commerce-portal"):
        assert services[portal]["environment"]["PORTAL_ISSUER"] == providers[0]["environment"]["IDP_ISSUER"]
    assert set(compose["volumes"]) >= {"keys", "pgdata"}


def test_compose_providers_believe_proxy_headers_from_nginx_alone():
    """Whatever may send X-Forwarded-For or the client certificate to a provider, and be
    believed, can log in as any card holder: nginx alone, at its fixed address on the one
    network the providers share with nothing else that takes requests."""
    [compose] = _yaml("compose.yaml")
    services = compose["services"]
    nginx = services["nginx"]["networks"]
    for name in ("idp-1", "idp-2"):
        networks = set(services[name]["networks"])
        for other, service in services.items():
            if other not in ("idp-1", "idp-2", "nginx", "postgres", "redis"):
                assert not networks & set(service.get("networks", ["default"])), f"{other} reaches {name}"
        trusted = [ipaddress.ip_network(n.strip()) for n in services[name]["environment"]["IDP_TRUSTED_PROXIES"].split(",")]
        [edge] = [n for n in networks & set(nginx) if (nginx[n] or {}).get("ipv4_address")]
        address = ipaddress.ip_address(nginx[edge]["ipv4_address"])
        assert trusted == [ipaddress.ip_network(address)]
        [pool] = compose["networks"][edge]["ipam"]["config"]
        assert address in ipaddress.ip_network(pool["subnet"])
        # Outside the range Docker hands out: a provider starting first cannot take it.
        assert address not in ipaddress.ip_network(pool["ip_range"])


def test_dockerfile_installs_the_package_and_serves_it_unprivileged():
    text = (DEPLOY / "Dockerfile").read_text()
    assert re.search(r"^USER 10001$", text, re.M)
    assert 'CMD ["idp", "serve", "--host", "0.0.0.0", "--port", "8000"]' in text
    assert "COPY keys/trust" in text and "/healthz" in text
    ignored = (DEPLOY / "Dockerfile.dockerignore").read_text().split()
    assert ignored[ignored.index("*") + 1:].count("!keys/trust") == 1 and "!keys" not in ignored  # never the signing keys


# -- Kubernetes ----------------------------------------------------------------------------------
def test_kubernetes_provider_deployment():
    objects = _k8s()
    deployment = objects[("Deployment", "idp")]
    pod = deployment["spec"]["template"]
    labels = pod["metadata"]["labels"]
    assert deployment["spec"]["selector"]["matchLabels"].items() <= labels.items()
    [container] = pod["spec"]["containers"]
    assert container["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert container["livenessProbe"]["httpGet"]["path"] == "/healthz"
    assert container["command"][:2] == ["idp", "serve"]
    # A rolling update loses no request: the pod serves on while it leaves the endpoints.
    sleep, seconds = container["lifecycle"]["preStop"]["exec"]["command"]
    assert sleep == "sleep" and 0 < int(seconds) < pod["spec"]["terminationGracePeriodSeconds"]
    assert pod["spec"]["securityContext"]["runAsNonRoot"] is True
    [migrate] = pod["spec"]["initContainers"]
    assert migrate["command"] == ["idp", "migrate"]
    assert objects[("Job", "idp-migrate")]["spec"]["template"]["spec"]["containers"][0]["command"] == ["idp", "migrate"]
    # Settings come from a ConfigMap and a Secret that exist here and name real settings.
    for source in container["envFrom"]:
        kind, name = ("Secret", source["secretRef"]["name"]) if "secretRef" in source else \
            ("ConfigMap", source["configMapRef"]["name"])
        data = objects[(kind, name)].get("stringData") or objects[(kind, name)]["data"]
        assert set(data) <= SETTINGS, (kind, name)
    keys = {v["name"]: v for v in pod["spec"]["volumes"]}["keys"]
    assert keys["secret"]["secretName"] == "idp-keys"
    mount = {m["name"]: m for m in container["volumeMounts"]}["keys"]
    assert mount["readOnly"] is True
    assert objects[("ConfigMap", "idp-config")]["data"]["IDP_KEYS_DIR"] == mount["mountPath"]
    assert "idp-keys" in (DEPLOY / "README.md").read_text()  # made from files, as the README says


def test_kubernetes_provider_keeps_its_crl_cache_on_a_volume():
    """The pod's root filesystem is read-only: IDP_CRL_CACHE_DIR at its default (var/crl under
    the image's WORKDIR) kept no CRL ("not kept" in the log), and every new pod downloaded
    MOICA's 100k-entry CRL again, which the setting is there to avoid."""
    objects = _k8s()
    [container] = objects[("Deployment", "idp")]["spec"]["template"]["spec"]["containers"]
    assert container["securityContext"]["readOnlyRootFilesystem"] is True
    crl = Path(objects[("ConfigMap", "idp-config")]["data"]["IDP_CRL_CACHE_DIR"])
    writable = [Path(m["mountPath"]) for m in container["volumeMounts"] if not m.get("readOnly")]
    assert crl.is_absolute() and any(crl == w or w in crl.parents for w in writable), crl


def test_kubernetes_service_autoscaler_disruption_budget_and_ingress_fit_the_deployment():
    objects = _k8s()
    labels = objects[("Deployment", "idp")]["spec"]["template"]["metadata"]["labels"]
    service = objects[("Service", "idp")]
    assert service["spec"]["selector"].items() <= labels.items()
    hpa = objects[("HorizontalPodAutoscaler", "idp")]["spec"]
    assert hpa["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment", "name": "idp"}
    assert 2 <= hpa["minReplicas"] < hpa["maxReplicas"]
    pdb = objects[("PodDisruptionBudget", "idp")]["spec"]
    assert pdb["selector"]["matchLabels"].items() <= labels.items() and pdb["minAvailable"] >= 1
    services = {name: obj for (kind, name), obj in objects.items() if kind == "Service"}
    for (kind, name), ingress in objects.items():
        if kind != "Ingress":
            continue
        assert ingress["spec"]["tls"], name
        for rule in ingress["spec"]["rules"]:
            for path in rule["http"]["paths"]:
                backend = path["backend"]["service"]
                ports = {p["name"] for p in services[backend["name"]]["spec"]["ports"]}
                assert backend["port"]["name"] in ports, (name, backend)
    annotations = objects[("Ingress", "idp")]["metadata"]["annotations"]
    assert annotations["nginx.ingress.kubernetes.io/auth-tls-verify-client"] == "optional"
    portals = {obj["spec"]["template"]["spec"]["containers"][0]["command"][-1]
               for (kind, _), obj in objects.items() if kind == "Deployment" and obj["metadata"]["name"] != "idp"}
    assert portals == {"clients.school_portal", "clients.commerce_portal"}
    assert all(importlib.util.find_spec(module + ".__main__") for module in portals)
    kustomization = yaml.safe_load((DEPLOY / "kubernetes/kustomization.yaml").read_text())
    assert all((DEPLOY / "kubernetes" / r).is_file() for r in kustomization["resources"])
    # The pods believe proxy headers from any pod address: only the controller's pods and
    # Prometheus's may reach them (each by its labels, never a whole namespace), not the portals.
    policy = objects[("NetworkPolicy", "idp")]["spec"]
    assert policy["podSelector"]["matchLabels"].items() <= labels.items() and policy["policyTypes"] == ["Ingress"]
    [rule] = policy["ingress"]
    assert {(*peer["namespaceSelector"]["matchLabels"].values(), *peer["podSelector"]["matchLabels"].values())
            for peer in rule["from"]} == {("ingress-nginx", "ingress-nginx"), ("monitoring", "prometheus")}
    # ingress-nginx refuses snippet annotations by default (1.9 on): none may be needed.
    assert not [name for (kind, _), obj in objects.items() if kind == "Ingress"
                for name in obj["metadata"].get("annotations", {}) if name.endswith("-snippet")]


# -- nginx and systemd, checked by the real programs ---------------------------------------------
def _self_signed(directory: Path) -> None:
    """nginx.conf's tls/server.crt and server.key, for the three sites it serves."""
    directory.mkdir()
    servers.server_certificate(directory, "login.example.tw", "school.example.tw", "commerce.example.tw",
                               cert_file="server.crt")


def test_nginx_accepts_the_configuration(tmp_path):
    nginx = _nginx_binary()
    conf = (DEPLOY / "nginx/nginx.conf").read_text()
    assert re.search(r"^\s*include client-cert\S*conf;", conf, re.M)  # the client-certificate login's part
    directives = re.sub(r"#.*", "", conf)
    assert "ssl_verify_client" not in directives  # ...which is client-cert.conf's to set
    shutil.copytree(DEPLOY / "nginx", tmp_path / "nginx")
    _self_signed(tmp_path / "nginx/tls")
    # The upstreams' names exist only on the compose network; nginx resolves them at start.
    local = re.sub(r"(\bserver )[a-z][a-z0-9-]*(:\d+)", r"\g<1>127.0.0.1\2", conf)
    assert local.count("127.0.0.1") == 4
    (tmp_path / "nginx/nginx.conf").write_text(local)
    result = subprocess.run([nginx, "-t", "-c", str(tmp_path / "nginx/nginx.conf"), "-p", str(tmp_path / "nginx")],
                            capture_output=True, text=True, timeout=30)
    assert result.returncode == 0, result.stderr
    assert "test is successful" in result.stderr


def test_systemd_steps_give_the_provider_its_trust_anchors():
    """A pip install holds the package, not keys/, and the unit's working directory is
    /var/lib/idp: IDP_TRUST_DIR's relative default (keys/trust) was not there, so `idp serve`
    stopped ("has no anchors.toml") and no step said where the anchors go."""
    unit = (DEPLOY / "systemd/idp@.service").read_text()
    [trust] = re.findall(r"^Environment=IDP_TRUST_DIR=(/\S+)$", unit, re.M)
    readme = (DEPLOY / "README.md").read_text()
    steps = readme[readme.index("## systemd"):readme.index("## Watching it")]
    assert re.findall(r"cp -r \S*/keys/trust (\S+)", steps) == [trust]


def test_the_systemd_steps_make_what_the_unit_reads(tmp_path):
    """On a fresh machine `install -m 0600 /dev/null /etc/idp/idp.env` stopped with "No such file
    or directory" (no step made /etc/idp): the unit's EnvironmentFile was missing and the
    instances did not start. The steps that make files run here with tmp_path as the root."""
    unit = (DEPLOY / "systemd/idp@.service").read_text()
    [env_file] = re.findall(r"^EnvironmentFile=(/\S+)$", unit, re.M)
    [trust] = re.findall(r"^Environment=IDP_TRUST_DIR=(/\S+)$", unit, re.M)
    readme = (DEPLOY / "README.md").read_text()
    steps = readme[readme.index("## systemd"):readme.index("## Watching it")]
    commands = [command.strip() for line in steps.splitlines() for command in line.split("#")[0].split("&&")
                if command.split()[:1] in (["install"], ["cp"])]
    rooted = [re.sub(r"(?<= )/(?=etc/|usr/)", f"{tmp_path}/", c.replace("/path/to/this/repository", str(ROOT)))
              for c in commands]
    (tmp_path / "etc/systemd/system").mkdir(parents=True)  # on every machine that runs systemd
    for command in rooted:
        result = subprocess.run(command, shell=True, cwd=ROOT, capture_output=True, text=True, timeout=30)
        assert result.returncode == 0, (command, result.stderr)
    made = tmp_path / env_file.lstrip("/")
    assert made.is_file() and made.stat().st_mode & 0o777 == 0o600
    assert (tmp_path / trust.lstrip("/") / "anchors.toml").is_file()
    assert (tmp_path / "etc/systemd/system/idp@.service").read_text() == unit


def test_systemd_accepts_the_unit(tmp_path):
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        pytest.fail("systemd-analyze is missing: scripts/bootstrap.sh --test installs it (Debian's systemd)")
    unit = (DEPLOY / "systemd/idp@.service").read_text()
    assert "ExecStart=/opt/idp/bin/idp serve --host 127.0.0.1 --port %i" in unit
    # verify wants the program to exist: point it at this checkout's.
    (tmp_path / "idp@8000.service").write_text(unit.replace("/opt/idp/bin/idp", str(Path(sys.executable).parent / "idp")))
    result = subprocess.run([analyze, "verify", str(tmp_path / "idp@8000.service")], capture_output=True, text=True,
                            timeout=60)
    assert result.returncode == 0 and not result.stderr.strip(), result.stderr


def _nginx_binary() -> str:
    nginx = shutil.which("nginx") or ("/usr/sbin/nginx" if Path("/usr/sbin/nginx").exists() else None)
    if nginx is None:
        pytest.fail(f"nginx is missing. {HINT}", pytrace=False)
    return nginx


def test_nginx_in_front_of_a_provider(tmp_path, caplog):
    """The shipped nginx.conf, running, in front of a real provider: its upstreams and ports
    moved to this machine's loopback, everything else as shipped."""
    from idp.web.app import create_app

    conf = (DEPLOY / "nginx/nginx.conf").read_text()
    with live.reserve() as (sock, url):
        app = create_app(Settings.from_env({}, database_url=f"sqlite:///{tmp_path}/idp.sqlite3",
                                           keys_dir=str(tmp_path / "keys"), issuer="https://login.example.tw",
                                           access_log=True, crl_cache_dir=str(tmp_path / "crl")))
        port = url.rsplit(":", 1)[1]
        http_port, https_port = servers.free_port(), servers.free_port()
        local = re.sub(r"(\bserver )[a-z][a-z0-9-]*:\d+", rf"\g<1>127.0.0.1:{port}", conf)
        local = local.replace("listen 80 ", f"listen 127.0.0.1:{http_port} ")
        local = re.sub(r"listen 443 ssl", f"listen 127.0.0.1:{https_port} ssl", local)
        local = local.replace("pid /tmp/nginx-idp.pid;", f"pid {tmp_path}/nginx.pid;")
        shutil.copytree(DEPLOY / "nginx", tmp_path / "nginx")
        _self_signed(tmp_path / "nginx/tls")
        (tmp_path / "nginx/nginx.conf").write_text(local)
        with live.serve(app, sock, url):
            proc = subprocess.Popen([_nginx_binary(), "-c", str(tmp_path / "nginx/nginx.conf"), "-p",
                                     str(tmp_path / "nginx"), "-g", "daemon off;"], stdout=subprocess.PIPE,
                                    stderr=subprocess.PIPE)
            try:
                base = f"https://127.0.0.1:{https_port}"
                with httpx.Client(verify=False, timeout=10, headers={"Host": "login.example.tw"}) as http:
                    deadline = time.monotonic() + 30
                    while True:
                        try:
                            answer = http.get(base + "/healthz", headers={"X-Forwarded-For": "6.6.6.6"})
                            break
                        except httpx.HTTPError:
                            if proc.poll() is not None or time.monotonic() > deadline:
                                proc.kill()  # so that its stderr can be read to the end
                                pytest.fail("nginx did not answer: " + proc.communicate()[1].decode()[-2000:])
                            time.sleep(0.05)
                    assert answer.status_code == 200 and answer.text == "ok"
                    assert re.fullmatch(r"[0-9a-f]{32}", answer.headers["x-request-id"])  # nginx's $request_id
                    assert http.get(base + "/metrics").status_code == 404
                    plain = http.get(f"http://127.0.0.1:{http_port}/healthz")
                    assert plain.status_code == 301 and plain.headers["location"] == "https://login.example.tw/healthz"
                    http.get(base + "/password/reset?token=SECRET-RESET-TOKEN")
            finally:
                proc.terminate()
                access_log = proc.communicate(timeout=30)[0].decode()
    assert '"GET /password/reset HTTP/1.1"' in access_log and "SECRET" not in access_log  # the path, not the token
    [seen] = [r for r in caplog.records if r.name == "idp.access" and r.request_id == answer.headers["x-request-id"]]
    assert seen.ip == "127.0.0.1"  # nginx's own address: the X-Forwarded-For the client made up is dropped


@pytest.mark.parametrize("path", ["idp-keys/data.secret", "deploy/.env", "deploy/tls/server.key"])
def test_the_secrets_deploy_readme_has_you_make_are_never_committed(path):
    """Its steps write private keys and passwords into the checkout: git ignores them."""
    assert subprocess.run(["git", "check-ignore", "-q", path], cwd=ROOT).returncode == 0, f"{path} is not ignored"
