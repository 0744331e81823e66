"""The operator kit, checked without a Docker engine: compose files against the Compose
Specification, the Dockerfile with hadolint and against the CLI, the Prometheus config and
rules with promtool (including its rule unit tests), and the Grafana dashboard against the
metric contract."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path
from typing import Any

import aiohttp
import click
import pytest
import yaml
from prometheus_client import CollectorRegistry

from ollama_meter.cli import main
from ollama_meter.config import Config, parse_listen
from ollama_meter.gateway.admission import Admission
from ollama_meter.gateway.fleet import Fleet
from ollama_meter.gateway.fleet_metrics import FleetMetrics
from ollama_meter.gateway.ledger import Rollup
from ollama_meter.gateway.ledger_metrics import LedgerMetrics
from ollama_meter.gateway.ledger_store import SqliteStore
from ollama_meter.gateway.ledger_writer import LedgerWriter
from ollama_meter.gateway.limit_metrics import LimitMetrics, anonymous_label
from ollama_meter.gateway.usage import KeyUsage
from ollama_meter.ollama import ENDPOINTS

from .conftest import Meter
from .fake_ollama import FakeOllama

ROOT = Path(__file__).parent.parent
COMPOSE_FILES = ["compose.yaml", "compose.gpu.yaml", "compose.host-ollama.yaml"]
GOLDEN = Path(__file__).parent / "golden" / "families.txt"


def tool(name: str) -> str:
    """A command-line tool the checks need; in CI its absence is a failure, not a skip."""
    found = shutil.which(name) or shutil.which(name, path=str(Path(sys.executable).parent))
    if found is None:
        if os.environ.get("CI"):
            pytest.fail(f"{name} is required in CI")
        pytest.skip(f"{name.upper()} NOT INSTALLED: this check did not run")
    return found


def run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(args, capture_output=True, text=True, check=False, cwd=ROOT)


def load_yaml(name: str) -> Any:
    return yaml.safe_load((ROOT / name).read_text())


def readme() -> str:
    """README.md with its lines joined: prose is checked whatever its line breaks."""
    return " ".join((ROOT / "README.md").read_text().split())


def cli_default(name: str) -> Any:
    [default] = [param.default for param in main.params if param.name == name]
    return default


def cli_envvars() -> dict[str, str]:
    """OLLAMA_METER_* variable -> option name, from the click command itself."""
    return {
        str(param.envvar): str(param.name)
        for param in main.params
        if isinstance(param, click.Option) and param.envvar
    }


# --- Compose ---------------------------------------------------------------------------------


def test_compose_files_follow_the_compose_specification(tmp_path: Path) -> None:
    checker = tool("check-jsonschema")
    result = run(checker, "--builtin-schema", "vendor.compose-spec", *COMPOSE_FILES)
    assert result.returncode == 0, result.stdout + result.stderr
    # The check can fail: a misspelt key is caught.
    broken = tmp_path / "compose.yaml"
    broken.write_text((ROOT / "compose.yaml").read_text().replace("healthcheck:", "healthchek:"))
    result = run(checker, "--builtin-schema", "vendor.compose-spec", str(broken))
    assert result.returncode != 0


def test_compose_stack_is_wired_together() -> None:
    compose = load_yaml("compose.yaml")
    assert "version" not in compose  # the Compose Specification has no version key
    services = compose["services"]
    assert set(services) == {"ollama", "ollama-meter", "prometheus", "alertmanager", "grafana"}
    for name, service in services.items():
        if "image" in service and "build" not in service:
            repo, _, tag = service["image"].rpartition(":")
            assert repo, name
            assert re.search(r"\d", tag), f"{name}: image {service['image']} is not pinned"
    # Ollama is reachable only through the proxy.
    assert "ports" not in services["ollama"]
    assert "healthcheck" in services["ollama"]
    assert any(v.startswith("ollama-models:") for v in services["ollama"]["volumes"])

    meter = services["ollama-meter"]
    env = meter["environment"]
    known = cli_envvars()
    assert set(env) <= set(known), f"unknown variables: {set(env) - set(known)}"
    config = Config.build(listen=env["OLLAMA_METER_LISTEN"], upstream=env["OLLAMA_METER_UPSTREAM"])
    assert (config.upstream.host, config.upstream.port) == ("ollama", 11434)
    [published] = meter["ports"]
    assert published.rsplit(":", 2)[-2:] == [str(config.listen.port)] * 2
    assert meter["depends_on"]["ollama"]["condition"] == "service_healthy"
    # The usage ledger is on a named volume (it outlives the container), at a directory the
    # image creates for its user (a volume copies its owner).
    ledger = Path(env["OLLAMA_METER_LEDGER"])
    [volume] = [v for v in meter["volumes"] if v.endswith(f":{ledger.parent}")]
    assert volume.split(":")[0] in compose["volumes"]
    assert (
        f"install -d -o 10001 -g 10001 -m 0750 {ledger.parent}" in (ROOT / "Dockerfile").read_text()
    )
    assert f"VOLUME {ledger.parent}" in (ROOT / "Dockerfile").read_text()

    # Prometheus scrapes the service on its listen port and loads our rules, read-only.
    prometheus = services["prometheus"]
    assert "./prometheus:/etc/prometheus:ro" in prometheus["volumes"]
    # Counters that start between two scrapes count from 0 (ollama-meter's _created samples).
    assert "--enable-feature=created-timestamp-zero-ingestion" in prometheus["command"]
    scrape = load_yaml("prometheus/prometheus.yml")
    [job] = [j for j in scrape["scrape_configs"] if j["job_name"] == "ollama-meter"]
    assert job["static_configs"][0]["targets"] == [f"ollama-meter:{config.listen.port}"]

    # Prometheus sends alerts to the Alertmanager service, which reads our config, read-only.
    alertmanager = services["alertmanager"]
    [alerting] = scrape["alerting"]["alertmanagers"]
    assert alerting["static_configs"][0]["targets"] == ["alertmanager:9093"]
    assert "alertmanager" in prometheus["depends_on"]
    [published] = alertmanager["ports"]
    assert published == "127.0.0.1:9093:9093"  # loopback only, like Prometheus and Grafana
    assert "./alertmanager:/etc/alertmanager:ro" in alertmanager["volumes"]
    assert "--config.file=/etc/alertmanager/alertmanager.yml" in alertmanager["command"]
    assert (ROOT / "alertmanager" / "alertmanager.yml").is_file()

    # Grafana: provisioned datasource and dashboards, password from the environment.
    grafana = services["grafana"]
    assert grafana["environment"]["GF_SECURITY_ADMIN_PASSWORD"].startswith(
        "${GRAFANA_ADMIN_PASSWORD:-"
    )
    mounts = dict(v.rsplit(":", 2)[:2] for v in grafana["volumes"] if v.startswith("./"))
    for source in mounts:
        assert (ROOT / source).is_dir(), source
    datasource = load_yaml("grafana/provisioning/datasources/prometheus.yml")["datasources"][0]
    assert datasource["url"] == "http://prometheus:9090"
    provider = load_yaml("grafana/provisioning/dashboards/ollama-meter.yml")["providers"][0]
    assert mounts["./grafana/dashboards"] == provider["options"]["path"]


def test_compose_variants() -> None:
    gpu = load_yaml("compose.gpu.yaml")["services"]["ollama"]
    [device] = gpu["deploy"]["resources"]["reservations"]["devices"]
    assert device["driver"] == "nvidia"
    assert device["capabilities"] == ["gpu"]
    host = load_yaml("compose.host-ollama.yaml")["services"]
    assert host["ollama"]["profiles"]  # the bundled Ollama is left out
    upstream = host["ollama-meter"]["environment"]["OLLAMA_METER_UPSTREAM"]
    assert Config.build(listen="0.0.0.0:11435", upstream=upstream).upstream.host == (
        "host.docker.internal"
    )
    base = load_yaml("compose.yaml")["services"]["ollama-meter"]["depends_on"]["ollama"]
    assert base["required"] is False  # so leaving the bundled Ollama out is allowed


# --- Dockerfile ------------------------------------------------------------------------------


def dockerfile_final_stage() -> list[str]:
    """Instructions of the last stage, with continuation lines joined."""
    text = (ROOT / "Dockerfile").read_text().replace("\\\n", " ")
    lines = [
        line.strip() for line in text.splitlines() if line.strip() and not line.startswith("#")
    ]
    last_from = max(i for i, line in enumerate(lines) if line.startswith("FROM "))
    return lines[last_from:]


def test_hadolint_passes() -> None:
    result = run(tool("hadolint"), "Dockerfile")
    assert result.returncode == 0, result.stdout + result.stderr


def test_image_agrees_with_the_cli() -> None:
    stage = dockerfile_final_stage()
    by_instruction: dict[str, list[str]] = {}
    for line in stage:
        keyword, _, rest = line.partition(" ")
        by_instruction.setdefault(keyword, []).append(rest.strip())

    base = by_instruction["FROM"][0]
    assert re.fullmatch(r"python:\d+\.\d+\.\d+-slim-\w+", base), base
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    [entrypoint] = by_instruction["ENTRYPOINT"]
    assert json.loads(entrypoint) == [next(iter(scripts))] == ["ollama-meter"]

    env = dict(re.findall(r"(\w+)=(\S+)", " ".join(by_instruction["ENV"])))
    meter_env = {k: v for k, v in env.items() if k.startswith("OLLAMA_METER_")}
    assert set(meter_env) <= set(cli_envvars())
    listen = parse_listen(meter_env["OLLAMA_METER_LISTEN"])
    assert listen.host == "0.0.0.0"
    assert by_instruction["EXPOSE"] == [str(listen.port)]

    [healthcheck] = by_instruction["HEALTHCHECK"]
    assert f"http://127.0.0.1:{listen.port}/-/healthy" in healthcheck

    [user] = by_instruction["USER"]
    assert user not in ("root", "0")
    # No compilers or build tools in the final stage: it installs prebuilt wheels only.
    assert not any(
        tool_name in " ".join(stage) for tool_name in ("gcc", "build-essential", "apt-get")
    )


# --- Prometheus ------------------------------------------------------------------------------


def test_promtool_checks_config_and_rules() -> None:
    promtool = tool("promtool")
    for args in (
        ("check", "config", "prometheus/prometheus.yml"),
        ("check", "rules", "prometheus/rules/ollama-meter.yml"),
        ("test", "rules", "prometheus/tests/ollama-meter.test.yml"),
    ):
        result = run(promtool, *args)
        assert result.returncode == 0, f"promtool {' '.join(args)}:\n{result.stdout}{result.stderr}"


def test_amtool_checks_the_alertmanager_config_and_its_examples(tmp_path: Path) -> None:
    amtool = tool("amtool")
    shipped = (ROOT / "alertmanager" / "alertmanager.yml").read_text()
    result = run(amtool, "check-config", "alertmanager/alertmanager.yml")
    assert result.returncode == 0, result.stdout + result.stderr
    config = yaml.safe_load(shipped)
    # The default receiver does nothing: no notifications until someone says where to.
    [default] = [r for r in config["receivers"] if r["name"] == config["route"]["receiver"]]
    assert set(default) == {"name"}

    # The commented receivers (webhook, email, Slack) are valid once uncommented.
    examples = re.sub(r"(?m)^  # (- name:|  )", r"  \1", shipped)
    names = [r["name"] for r in yaml.safe_load(examples)["receivers"]]
    assert names == ["none", "webhook", "email", "slack"]
    (tmp_path / "examples.yml").write_text(examples)
    result = run(amtool, "check-config", str(tmp_path / "examples.yml"))
    assert result.returncode == 0, result.stdout + result.stderr

    # The check can fail: a route to a receiver that is not defined.
    (tmp_path / "broken.yml").write_text(shipped.replace("receiver: none", "receiver: nobody"))
    assert run(amtool, "check-config", str(tmp_path / "broken.yml")).returncode != 0


def test_every_alert_has_a_unit_test_that_fires_it() -> None:
    rules = load_yaml("prometheus/rules/ollama-meter.yml")
    alerts = {r["alert"] for g in rules["groups"] for r in g["rules"] if "alert" in r}
    tests = load_yaml("prometheus/tests/ollama-meter.test.yml")["tests"]
    fired = {
        case["alertname"]
        for test in tests
        for case in test.get("alert_rule_test", [])
        if case.get("exp_alerts")
    }
    silent = {
        case["alertname"]
        for test in tests
        for case in test.get("alert_rule_test", [])
        if not case.get("exp_alerts")
    }
    assert alerts == fired == silent
    for group in rules["groups"]:
        for rule in group["rules"]:
            if "alert" in rule:
                assert rule.get("for"), rule["alert"]
                assert {"summary", "description", "runbook"} <= set(rule["annotations"])


def inhibited(target: dict[str, str], source: dict[str, str]) -> bool:
    """Whether an inhibit rule of alertmanager/alertmanager.yml mutes an alert with labels
    ``target`` while one with labels ``source`` fires (matchers ``name = value`` only)."""

    def matches(matchers: list[str], labels: dict[str, str]) -> bool:
        pairs = [m.split("=", 1) for m in matchers]
        assert all(len(p) == 2 and p[0][-1:] != "!" and p[1][:1] != "~" for p in pairs), matchers
        return all(labels.get(k.strip()) == v.strip().strip('"') for k, v in pairs)

    config = load_yaml("alertmanager/alertmanager.yml")
    return any(
        matches(rule["source_matchers"], source)
        and matches(rule["target_matchers"], target)
        and all(k in source and target.get(k) == source[k] for k in rule["equal"])
        for rule in config["inhibit_rules"]
    )


def test_no_upstream_answering_is_one_notification_not_one_per_upstream() -> None:
    """In a fleet whose upstreams are all down, OllamaMeterUpstreamDown (critical, per target)
    and OllamaMeterFleetUpstreamDown (a warning per upstream) both fire; Alertmanager delivers
    the critical one only. The fleet's other warnings are muted with it."""
    rules = load_yaml("prometheus/rules/ollama-meter.yml")
    alerts = [r for g in rules["groups"] for r in g["rules"] if "alert" in r]
    severity = {r["alert"]: r["labels"]["severity"] for r in alerts}
    target = {"job": "ollama-meter", "instance": "meter:11435"}
    down = {**target, "alertname": "OllamaMeterUpstreamDown", "severity": "critical"}
    assert severity["OllamaMeterUpstreamDown"] == "critical"
    fleet_alerts = [name for name in severity if name.startswith("OllamaMeterFleet")]
    assert len(fleet_alerts) == 3
    for name in fleet_alerts:
        alert = {**target, "upstream": "gpu-1", "alertname": name, "severity": severity[name]}
        assert inhibited(alert, down), name
        # Another target's Ollama being down mutes nothing here.
        assert not inhibited(alert, {**down, "instance": "meter-2:11435"}), name
    # And a fleet alert mutes nothing: one upstream down explains no other alert.
    warning = {**target, "alertname": "OllamaMeterHighErrorRatio", "severity": "warning"}
    for name in fleet_alerts:
        source = {**target, "upstream": "gpu-1", "alertname": name, "severity": severity[name]}
        assert not inhibited(warning, source), name


#: Routes that run a model: what stream errors and time to first token are about.
INFERENCE_ROUTES = {
    "/api/generate",
    "/api/chat",
    "/v1/chat/completions",
    "/v1/completions",
    "/v1/responses",
    "/v1/messages",
}
#: Routes that manage models.
MODEL_MANAGEMENT_ROUTES = {
    "/api/pull",
    "/api/push",
    "/api/create",
    "/api/delete",
    "/api/copy",
    "/api/blobs/{digest}",
}
SELECTOR = re.compile(r"\b(ollama_meter_[a-z0-9_]+)(\{[^}]*\})?")
ENDPOINT_MATCHER = re.compile(r'endpoint=~"([^"$]*)"')


def selected_routes(expr: str) -> list[set[str]]:
    """For each ollama_meter_* selector of expr: the endpoint labels its fixed endpoint
    matchers let through (every endpoint when it has none)."""
    selected = []
    for _, matchers in SELECTOR.findall(expr):
        routes = set(ENDPOINTS)
        for pattern in ENDPOINT_MATCHER.findall(matchers):
            routes &= {e for e in ENDPOINTS if re.fullmatch(pattern, e)}
        selected.append(routes)
    return selected


def test_inference_rules_and_panels_select_exactly_their_routes() -> None:
    rules = load_yaml("prometheus/rules/ollama-meter.yml")
    exprs = {r.get("record") or r["alert"]: r["expr"] for g in rules["groups"] for r in g["rules"]}
    for record in (
        "ollama_meter:stream_error_ratio:rate10m",
        "ollama_meter:time_to_first_token_seconds_bucket:rate5m",
    ):
        selected = selected_routes(exprs[record])
        assert selected, record
        assert all(routes == INFERENCE_ROUTES for routes in selected), (record, selected)
    [panel] = [p for p in dashboard()["panels"] if p["title"] == "Model-management failures"]
    assert selected_routes(panel["targets"][0]["expr"]) == [MODEL_MANAGEMENT_ROUTES]


# --- Grafana ---------------------------------------------------------------------------------


def dashboard() -> dict[str, Any]:
    doc: dict[str, Any] = json.loads((ROOT / "grafana/dashboards/ollama-meter.json").read_text())
    return doc


def test_dashboard_json_is_what_the_generator_writes() -> None:
    result = subprocess.run(
        [sys.executable, "-c", "import generate_dashboard as g; print(g.render(), end='')"],
        capture_output=True,
        text=True,
        check=True,
        cwd=ROOT / "grafana",
    )
    assert result.stdout == (ROOT / "grafana/dashboards/ollama-meter.json").read_text(), (
        "run: python grafana/generate_dashboard.py"
    )


def test_dashboard_panels_have_units_and_use_the_datasource_variable() -> None:
    doc = dashboard()
    names = {v["name"] for v in doc["templating"]["list"]}
    assert names == {"datasource", "instance", "model", "endpoint"}
    rows = [p["title"] for p in doc["panels"] if p["type"] == "row"]
    assert [r.split(":")[0] for r in rows] == [
        "Traffic",
        "Latency",
        "Tokens",
        "Models",
        "Fleet",
        "Proxy",
        "Capacity",
        "Keys",
        "Ledger",
    ]
    for panel in doc["panels"]:
        if panel["type"] == "row":
            continue
        assert panel["fieldConfig"]["defaults"]["unit"], panel["title"]
        assert panel["datasource"]["uid"] == "${datasource}"
        assert panel["targets"], panel["title"]


def sample_names(family: str, kind: str) -> set[str]:
    if kind == "counter":
        return {family + "_total"}
    if kind == "histogram":
        return {family + suffix for suffix in ("_bucket", "_sum", "_count")}
    return {family}


def core_names() -> set[str]:
    """Sample names of the core's families (the golden list)."""
    names: set[str] = set()
    for line in GOLDEN.read_text().splitlines():
        names.update(sample_names(*line.split()[:2]))
    return names


def fleet_names() -> set[str]:
    """Sample names of the families that only fleet mode exposes (from the collector of an
    empty fleet); upstream_up, loaded_models and model_* are the core's too, unlabelled."""
    families = FleetMetrics(Fleet([], probe_timeout=1.0)).collect()
    names = {n for family in families for n in sample_names(family.name, family.type)}
    return names - core_names()


def limits_names() -> set[str]:
    """Sample names of the families that limits and the queue add (a fresh LimitMetrics,
    with Redis, watching an empty queue)."""
    registry = CollectorRegistry()
    metrics = LimitMetrics(registry, anonymous_label, redis=True)
    metrics.watch(Admission({}, lambda target: None, 1, 1.0, 1, clock=lambda: 0.0))
    return {n for family in registry.collect() for n in sample_names(family.name, family.type)}


def known_names() -> set[str]:
    """Series names a query may read: our families (with their sample suffixes), those that
    access control and fleet mode add (read from a fresh KeyUsage and FleetMetrics: the golden
    list is the core's), the recording rules, and the standard process series."""
    names = {"up", "process_resident_memory_bytes", "process_cpu_seconds_total"}
    names |= core_names() | fleet_names() | limits_names()
    registry = CollectorRegistry()
    KeyUsage(registry, max_key_labels=1)
    writer = LedgerWriter(Rollup(1), SqliteStore(Path("unused.sqlite")), "r", 10.0, 3600.0)
    registry.register(LedgerMetrics(writer))
    for family in registry.collect():
        names.update(sample_names(family.name, family.type))
    rules = load_yaml("prometheus/rules/ollama-meter.yml")
    names.update(r["record"] for g in rules["groups"] for r in g["rules"] if "record" in r)
    return names


SERIES_NAME = re.compile(r"\b(ollama_meter[a-z0-9_:]*|process_[a-z_]+|up)\b")


def test_dashboard_and_rules_use_only_metrics_that_exist() -> None:
    known = known_names()
    exprs = [t["expr"] for p in dashboard()["panels"] for t in p.get("targets", [])]
    exprs += [v["definition"] for v in dashboard()["templating"]["list"] if "definition" in v]
    rules = load_yaml("prometheus/rules/ollama-meter.yml")
    exprs += [r["expr"] for g in rules["groups"] for r in g["rules"]]
    used = {name for expr in exprs for name in SERIES_NAME.findall(expr)}
    assert used - known == set()
    assert len(used) > 20


# --- README ----------------------------------------------------------------------------------


def test_readme_says_how_a_refused_start_exits() -> None:
    text = readme()
    assert "`Usage: ollama-meter [OPTIONS]`" in text
    assert "and it exits with status 2" in text
    assert "one line, `Error: ...`, and it exits with status 1" in text
    ollama_meter = (str(Path(sys.executable).parent / "ollama-meter"),)  # the installed script
    # A value click rejects: its usage text, status 2.
    for args in (("--read-timeout", "soon"), ("--log-format", "xml")):
        rejected = run(*ollama_meter, *args)
        assert rejected.returncode == 2, args
        usage = "Usage: ollama-meter [OPTIONS] [COMMAND]"
        assert rejected.stderr.startswith(usage), rejected.stderr
        assert "Error: Invalid value for" in rejected.stderr
    # A start that cannot work: one line, status 1.
    loop = run(*ollama_meter, "--listen", "127.0.0.1:11434", "--upstream", "localhost")
    assert loop.returncode == 1
    assert loop.stderr.startswith("Error: ")
    assert len(loop.stderr.splitlines()) == 1, loop.stderr


async def test_readme_curl_pull_is_a_metered_pull(fake: FakeOllama, meter: Meter) -> None:
    [(url, body)] = re.findall(r"curl (http://\S+) -d '([^']+)'", readme())
    address, _, path = url.removeprefix("http://").partition("/")
    assert address == cli_default("listen")
    # What curl -d sends: the body as given, labelled as a form.
    headers = {"Content-Type": "application/x-www-form-urlencoded"}
    async with (
        aiohttp.ClientSession() as session,
        session.post(f"{meter.url}/{path}", data=body.encode(), headers=headers) as response,
    ):
        assert response.status == 200
        lines = [json.loads(line) async for line in response.content]
    assert lines[-1] == {"status": "success"}
    labels = {"endpoint": "/api/pull", "model": "llama3.2:latest", "stream": "true"}
    assert meter.value("requests_total", **labels, status="200") == 1


def test_readme_dashboard_import_and_open_webui_agree_with_the_kit() -> None:
    text = readme()
    # The dashboard asks for nothing on import: its data source is a variable.
    assert "asks for the data source" not in text
    assert "The import asks for nothing: the dashboard has a *Data source* variable" in text
    doc = dashboard()
    assert "__inputs" not in doc
    [source] = [v for v in doc["templating"]["list"] if v["type"] == "datasource"]
    assert (source["label"], source["query"]) == ("Data source", "prometheus")
    # Open WebUI goes through the proxy port, or the proxy service inside the compose stack.
    port = parse_listen(cli_default("listen")).port
    meter = load_yaml("compose.yaml")["services"]["ollama-meter"]
    in_stack = parse_listen(meter["environment"]["OLLAMA_METER_LISTEN"]).port
    assert f"`OLLAMA_BASE_URL=http://<proxy>:{port}`" in text
    assert f"`http://ollama-meter:{in_stack}`" in text
