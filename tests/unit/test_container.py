"""The container image and the deployment examples (issue 7, item 7), checked without Docker.

No Docker engine runs on the development machines or in CI, so the image is never built here.
These tests read the Dockerfile and the deploy/ files and check what can be checked statically:
the image's shape (stages, user, ports, health check, entrypoint), that its build-time scripts
do what they claim when run against this checkout (the C-extension check passes on the
installed aiohttp, the requirements it installs are the runtime dependencies only), that every
path it COPYs exists and is in the build context, and that the deployment examples agree with
the image and with each other (ports, trusted proxies, grace periods). The YAML checks need
PyYAML, which is not a project dependency: they are skipped where it is not importable.
"""

from __future__ import annotations

import ipaddress
import json
import os
import re
import shlex
import subprocess
import sys
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from proxy.migrate import DEFAULT_SQL_DIR
from proxy.settings import Settings, parse_settings

ROOT = Path(__file__).resolve().parents[2]
DOCKERFILE = ROOT / "Dockerfile"
DOCKERIGNORE = ROOT / ".dockerignore"
DEPLOY = ROOT / "deploy"
BASE_IMAGE = "python:3.11-slim-bookworm"
RUNTIME_UID = "10001"

# --------------------------------------------------------------------------- Dockerfile parsing


@dataclass
class Instruction:
    keyword: str  # upper case
    args: str  # the logical line after the keyword, continuations joined
    heredocs: list[str] = field(default_factory=list)  # bodies of <<EOF documents, in order

    def flags(self) -> dict[str, list[str]]:
        """``--name=value`` options at the start of ``args`` (COPY --from, RUN --mount)."""
        found: dict[str, list[str]] = {}
        for word in shlex.split(self.args):
            if not word.startswith("--"):
                break
            name, _, value = word[2:].partition("=")
            found.setdefault(name, []).append(value)
        return found

    def words(self) -> list[str]:
        """``args`` without its leading options; the JSON (exec) form decoded."""
        text = self.args
        while text.startswith("--"):
            text = text.split(None, 1)[1] if " " in text else ""
        # The exec (JSON) form, also after a leading word (HEALTHCHECK ... CMD [...]).
        head, _, rest = text.partition(" ")
        for prefix, candidate in (([], text), ([head], rest.lstrip())):
            if candidate.startswith("["):
                value = json.loads(candidate)
                assert isinstance(value, list)
                return prefix + [str(v) for v in value]
        return shlex.split(text)


@dataclass
class Stage:
    base: str
    name: str | None
    instructions: list[Instruction]

    def all(self, keyword: str) -> list[Instruction]:
        return [i for i in self.instructions if i.keyword == keyword]

    def env(self) -> dict[str, str]:
        values: dict[str, str] = {}
        for inst in self.all("ENV"):
            for word in shlex.split(inst.args):
                name, _, value = word.partition("=")
                values[name] = value
        return values


_HEREDOC = re.compile(r"<<(-?)(['\"]?)([A-Za-z_][A-Za-z0-9_]*)\2")


def parse_dockerfile(text: str) -> list[Instruction]:
    """Logical instructions: comments dropped, ``\\`` continuations joined, heredocs collected."""
    lines = text.splitlines()
    out: list[Instruction] = []
    i = 0
    while i < len(lines):
        line = lines[i]
        i += 1
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        logical = line.strip()
        while logical.endswith("\\") and i < len(lines):
            logical = logical[:-1].rstrip()
            while i < len(lines) and lines[i].lstrip().startswith("#"):
                i += 1  # a comment inside a continued instruction is dropped
            if i < len(lines):
                logical += " " + lines[i].strip()
                i += 1
        keyword, _, args = logical.partition(" ")
        inst = Instruction(keyword.upper(), args.strip())
        for match in _HEREDOC.finditer(inst.args):
            strip_tabs, delimiter = match.group(1) == "-", match.group(3)
            body: list[str] = []
            while i < len(lines):
                candidate = lines[i].lstrip("\t") if strip_tabs else lines[i]
                i += 1
                if candidate == delimiter:
                    break
                body.append(candidate)
            else:
                raise AssertionError(f"heredoc {delimiter} never closed")
            inst.heredocs.append("\n".join(body) + "\n")
        out.append(inst)
    return out


def stages_of(instructions: list[Instruction]) -> list[Stage]:
    args: dict[str, str] = {}
    stages: list[Stage] = []
    for inst in instructions:
        if inst.keyword == "ARG" and not stages:
            arg, _, default = inst.args.partition("=")
            args[arg.strip()] = default.strip()
        elif inst.keyword == "FROM":
            words = inst.words()
            base = re.sub(r"\$\{(\w+)\}|\$(\w+)", lambda m: args[m[1] or m[2]], words[0])
            alias = words[2] if len(words) >= 3 and words[1].upper() == "AS" else None
            stages.append(Stage(base, alias, []))
        else:
            assert stages, f"{inst.keyword} before the first FROM"
            stages[-1].instructions.append(inst)
    return stages


@pytest.fixture(scope="module")
def stages() -> list[Stage]:
    return stages_of(parse_dockerfile(DOCKERFILE.read_text()))


@pytest.fixture(scope="module")
def runtime(stages: list[Stage]) -> Stage:
    return stages[-1]


def _run_words(stage: Stage) -> str:
    """Every RUN command of a stage, heredoc bodies included, as one text."""
    return "\n".join(i.args + "\n" + "".join(i.heredocs) for i in stage.all("RUN"))


def test_parser_reads_continuations_comments_and_heredocs() -> None:
    text = (
        "# syntax=docker/dockerfile:1\nFROM a AS b\nRUN one \\\n    # note\n    two\n"
        "RUN python - > out <<'EOF'\nprint('# not a comment')\nEOF\nUSER 1\n"
    )
    insts = parse_dockerfile(text)
    assert [i.keyword for i in insts] == ["FROM", "RUN", "RUN", "USER"]
    assert insts[1].args == "one two"
    assert insts[2].heredocs == ["print('# not a comment')\n"]


# --------------------------------------------------------------------------- the image's shape


def test_multi_stage_on_the_slim_python_311_base(stages: list[Stage]) -> None:
    assert len(stages) >= 2
    assert all(s.base == BASE_IMAGE for s in stages), [s.base for s in stages]
    assert stages[0].name == "builder"
    assert stages[-1].name == "runtime"


def test_runtime_runs_as_a_numeric_non_root_user(runtime: Stage) -> None:
    users = runtime.all("USER")
    assert users, "the runtime stage never leaves root"
    # Numeric, so that Kubernetes' runAsNonRoot can verify it.
    assert users[-1].args == f"{RUNTIME_UID}:{RUNTIME_UID}"
    assert re.search(rf"useradd\b.*--uid {RUNTIME_UID}\b", _run_words(runtime))
    # Nothing after the switch runs as root again, and the code stays root-owned; the one
    # command run as the user is the configuration check, which writes nothing.
    last_user = max(i for i, inst in enumerate(runtime.instructions) if inst.keyword == "USER")
    after = runtime.instructions[last_user + 1 :]
    assert not [i for i in after if i.keyword in ("COPY", "ADD")]
    assert [i.args for i in after if i.keyword == "RUN"] == ["python -m proxy check"]
    assert all("--chown" not in i.args for i in runtime.all("COPY"))


def test_workdir_ports_entrypoint_and_command(runtime: Stage) -> None:
    assert runtime.all("WORKDIR")[-1].args == "/app"
    exposed = {w for inst in runtime.all("EXPOSE") for w in inst.words()}
    assert exposed == {"8080", "9901"}
    assert runtime.all("ENTRYPOINT")[-1].words() == ["python", "-m", "proxy"]
    assert runtime.all("CMD")[-1].words() == [
        "serve",
        "--listen",
        "0.0.0.0:8080",
        "--admin-listen",
        "0.0.0.0:9901",
    ]


def test_the_shipped_configuration_is_checked_as_the_runtime_user(runtime: Stage) -> None:
    keywords = [i.keyword for i in runtime.instructions]
    runs = [(n, i) for n, i in enumerate(runtime.instructions) if i.keyword == "RUN"]
    (at,) = [n for n, i in runs if i.words() == ["python", "-m", "proxy", "check"]]
    user = max(n for n, k in enumerate(keywords) if k == "USER")
    copies = [n for n, k in enumerate(keywords) if k == "COPY"]
    assert user < at and max(copies) < at
    assert runtime.instructions[user].args == f"{RUNTIME_UID}:{RUNTIME_UID}"


def test_healthcheck_asks_healthz_on_the_admin_port_with_urllib(runtime: Stage) -> None:
    (check,) = runtime.all("HEALTHCHECK")
    assert check.flags().keys() >= {"interval", "timeout"}
    words = check.words()
    assert words[0] == "CMD", words
    command = words[1:]
    assert command[:2] == ["python", "-c"]
    assert "urllib.request.urlopen('http://127.0.0.1:9901/healthz'" in command[2]
    # The script itself is valid Python.
    compile(command[2], "HEALTHCHECK", "exec")


def test_the_c_extension_check_runs_after_the_install_and_passes_here(runtime: Stage) -> None:
    runs = runtime.all("RUN")
    install = next(i for i, r in enumerate(runs) if "pip install" in r.args)
    checks = [i for i, r in enumerate(runs) if any("_http_parser" in h for h in r.heredocs)]
    assert checks and checks[0] > install, "no C-extension check after the pip install"
    script = runs[checks[0]].heredocs[0]
    for needle in (
        "hp.HttpRequestParser is hp_c.HttpRequestParser",
        "aiohttp._websocket.reader_c",
        "hw._serialize_headers is hw_c._serialize_headers",
    ):
        assert needle in script
    # The same script against this checkout's aiohttp (installed from wheels, like the image):
    # proves the module and attribute names are right for the aiohttp version in use.
    env = {k: v for k, v in os.environ.items() if k != "AIOHTTP_NO_EXTENSIONS"}
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=60
    )
    assert done.returncode == 0, done.stderr
    assert "C extensions in use: aiohttp" in done.stdout
    # And it does fail when aiohttp runs on its pure-Python fallbacks.
    done = subprocess.run(
        [sys.executable, "-c", script],
        capture_output=True,
        text=True,
        env={**env, "AIOHTTP_NO_EXTENSIONS": "1"},
        timeout=60,
    )
    assert done.returncode != 0


def test_only_runtime_dependencies_are_built_and_installed(
    stages: list[Stage], runtime: Stage, tmp_path: Path
) -> None:
    builder = stages[0]
    (generate,) = [r for r in builder.all("RUN") if "requirements.txt" in r.args and r.heredocs]
    # Run the builder's script on this checkout's pyproject.toml.
    (tmp_path / "pyproject.toml").write_bytes((ROOT / "pyproject.toml").read_bytes())
    done = subprocess.run(
        [sys.executable, "-c", generate.heredocs[0]],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert done.stdout.split("\n")[:-1] == project["dependencies"]
    test_tools = {re.split(r"[<>=\[ ]", r)[0] for r in project["optional-dependencies"]["test"]}
    assert not test_tools & {re.split(r"[<>=\[ ]", r)[0] for r in done.stdout.split()}

    builder_runs = _run_words(builder)
    assert "pip wheel" in builder_runs and "--wheel-dir /wheels" in builder_runs
    # The project is never installed (see the Dockerfile: migrate must find sql/ beside it),
    # and no extras are: no `pip install .`, no `.[test]`.
    for stage in stages:
        text = _run_words(stage)
        assert "[test]" not in text
        assert not re.search(r"pip (install|wheel)[^\n]*\s\.(\s|$|\[)", text)

    (install,) = [r for r in runtime.all("RUN") if "pip install" in r.args]
    assert "--no-index" in install.args and "--find-links /wheels" in install.args
    mounts = install.flags().get("mount", [])
    assert any("from=builder" in m and "target=/wheels" in m for m in mounts), mounts
    assert runtime.env().get("PIP_NO_CACHE_DIR") == "1"
    # No toolchain in the runtime image.
    assert not re.search(r"apt-get|build-essential|gcc", _run_words(runtime))


def test_sql_sits_beside_the_package_in_the_runtime_layout(runtime: Stage) -> None:
    # migrate looks for the migrations next to the directory that holds proxy/.
    assert DEFAULT_SQL_DIR == ROOT / "sql"
    copies = {tuple(c.words()) for c in runtime.all("COPY") if "from" not in c.flags()}
    assert ("proxy/", "proxy/") in copies
    assert ("sql/", "sql/") in copies
    assert ("config/", "config/") in copies  # the default EDGE_CONFIG, config/edge.toml
    workdirs = [i for i, inst in enumerate(runtime.instructions) if inst.keyword == "WORKDIR"]
    first_copy = min(i for i, inst in enumerate(runtime.instructions) if inst.keyword == "COPY")
    assert workdirs and workdirs[0] < first_copy
    assert runtime.env().get("PYTHONPATH") == "/app"
    # The one directory the proxy writes belongs to its user.
    assert re.search(rf"chown {RUNTIME_UID}:{RUNTIME_UID} var\b", _run_words(runtime))


# --------------------------------------------------------------------------- build context


def _dockerignore_patterns() -> list[tuple[bool, re.Pattern[str]]]:
    """.dockerignore as (exclude?, regex) pairs, in order (moby's patternmatcher rules)."""
    patterns: list[tuple[bool, re.Pattern[str]]] = []
    for raw in DOCKERIGNORE.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        include = line.startswith("!")
        glob = line.lstrip("!").strip().strip("/")
        regex = ""
        j = 0
        while j < len(glob):
            if glob.startswith("**/", j):
                regex, j = regex + "(?:.*/)?", j + 3
            elif glob.startswith("**", j):
                regex, j = regex + ".*", j + 2
            elif glob[j] == "*":
                regex, j = regex + "[^/]*", j + 1
            elif glob[j] == "?":
                regex, j = regex + "[^/]", j + 1
            elif glob[j] == "[":
                end = glob.index("]", j)
                regex, j = regex + glob[j : end + 1], end + 1
            else:
                regex, j = regex + re.escape(glob[j]), j + 1
        patterns.append((not include, re.compile(regex)))
    return patterns


def in_context(path: str) -> bool:
    """Whether ``path`` (relative to the repository root) is sent to the Docker builder."""
    parts = path.strip("/").split("/")
    prefixes = ["/".join(parts[: n + 1]) for n in range(len(parts))]
    excluded = False
    for exclude, regex in _dockerignore_patterns():
        if any(regex.fullmatch(p) for p in prefixes):
            excluded = exclude
    return not excluded


def test_dockerignore_keeps_the_context_to_what_the_image_needs() -> None:
    for path in (
        ".venv/bin/python",
        ".git/HEAD",
        "tests/unit/test_container.py",
        "var/audit.jsonl",
        ".pytest_cache/v/cache",
        ".mypy_cache/3.11/x.json",
        ".ruff_cache/CACHEDIR.TAG",
        ".hypothesis/examples/x",
        "flatrender_edge.egg-info/PKG-INFO",
        "proxy/__pycache__/app.cpython-311.pyc",
        "loadtests/echo_upstream.py",
        "deploy/compose.yaml",
        ".env",
    ):
        assert not in_context(path), path
    for path in ("pyproject.toml", "proxy/app.py", "sql/001_prelude.sql", "config/edge.toml"):
        assert in_context(path), path


def test_every_copied_path_exists_and_is_in_the_context(stages: list[Stage]) -> None:
    seen = 0
    for stage in stages:
        for copy in stage.all("COPY") + stage.all("ADD"):
            if "from" in copy.flags():
                continue
            *sources, _dest = copy.words()
            for source in sources:
                path = ROOT / source
                assert path.exists(), f"COPY {source}: not in the repository"
                files = [p for p in path.rglob("*") if p.is_file()] if path.is_dir() else [path]
                assert files, f"COPY {source}: empty"
                rel = [p.relative_to(ROOT).as_posix() for p in files]
                assert any(in_context(r) for r in rel), f"COPY {source}: excluded by .dockerignore"
                seen += 1
    assert seen >= 4  # pyproject.toml, sql/, config/, proxy/


# --------------------------------------------------------------------------- deploy/, no YAML


def _settings(path: Path | str, text: str | None = None) -> Settings:
    data = tomllib.loads(text if text is not None else Path(path).read_text())
    env = {"DATABASE_URL": "postgresql://u:p@db:5432/x", "REDIS_URL": "redis://redis:6379/0"}
    return parse_settings(data, env, Path(path))


def _compose_text() -> str:
    return (DEPLOY / "compose.yaml").read_text()


def test_compose_edge_toml_is_valid_and_trusts_exactly_the_front() -> None:
    settings = _settings(DEPLOY / "edge.toml")
    assert str(settings.server.listen) == "0.0.0.0:8080"
    assert str(settings.server.admin_listen) == "0.0.0.0:9901"
    text = _compose_text()
    (subnet,) = re.findall(r"subnet:\s*([\d./]+)", text)
    (ip_range,) = re.findall(r"ip_range:\s*([\d./]+)", text)
    (front,) = re.findall(r"ipv4_address:\s*([\d.]+)", text)
    network = ipaddress.ip_network(subnet)
    front_ip = ipaddress.ip_address(front)
    assert front_ip in network
    # Outside the dynamic range: no other container can be handed the front's address.
    assert front_ip not in ipaddress.ip_network(ip_range)
    assert ipaddress.ip_network(ip_range).subnet_of(network)  # type: ignore[arg-type]
    trusted = settings.server.trusted_proxies
    assert any(front_ip in n for n in trusted)
    assert all(n.subnet_of(network) for n in trusted)  # type: ignore[arg-type]
    (upstream,) = settings.upstreams["render-api"].urls
    assert upstream == "http://upstream:9001"


def test_haproxy_balances_over_the_public_port_and_checks_readiness() -> None:
    cfg = (DEPLOY / "haproxy.cfg").read_text()
    assert re.search(r"^\s*balance roundrobin$", cfg, re.M)
    assert re.search(r"^\s*server-template edge 2 edge:8080$", cfg, re.M)
    assert re.search(r"^\s*option httpchk GET /readyz$", cfg, re.M)
    assert re.search(r"check port 9901\b", cfg)
    # A TCP front that names the client with PROXY v2, which the edge accepts from it alone.
    assert re.search(r"^\s*mode tcp$", cfg, re.M)
    assert re.search(r"^\s*default-server send-proxy-v2 ", cfg, re.M)
    settings = _settings(DEPLOY / "edge.toml")
    assert settings.server.proxy_protocol
    # haproxy's server timeout outlasts the proxy's upstream read timeout (its 504 wins), and
    # its idle timeouts do not undercut the edge's keep-alive.
    (server_timeout,) = re.findall(r"^\s*timeout server (\d+)s$", cfg, re.M)
    (client_timeout,) = re.findall(r"^\s*timeout client (\d+)s$", cfg, re.M)
    assert int(server_timeout) > settings.upstreams["render-api"].read_timeout_s
    assert min(int(server_timeout), int(client_timeout)) >= settings.server.keepalive_timeout_s


# --------------------------------------------------------------------------- deploy/, YAML


def _yaml() -> Any:
    return pytest.importorskip("yaml", reason="PyYAML is not installed (not a project dependency)")


def _seconds(value: str) -> float:
    match = re.fullmatch(r"(\d+)s", value)
    assert match, value
    return float(match[1])


def test_compose_stack() -> None:
    compose = _yaml().safe_load(_compose_text())
    services = compose["services"]
    assert set(services) == {
        "postgres",
        "redis",
        "migrate",
        "check",
        "upstream",
        "edge",
        "front",
    }
    assert services["postgres"]["image"].startswith("postgres:15")
    assert services["redis"]["image"].startswith("redis:7")
    for name in ("migrate", "check", "upstream", "edge"):
        assert services[name]["build"] == {"context": "..", "dockerfile": "Dockerfile"}
        assert (DEPLOY / services[name]["build"]["context"] / "Dockerfile").is_file()
    edge = services["edge"]
    assert edge["deploy"]["replicas"] == 2
    assert edge["environment"]["EDGE_CONFIG"] == "/etc/flatrender-edge/edge.toml"
    assert edge["environment"]["DATABASE_URL"].startswith("postgresql://")
    assert edge["environment"]["REDIS_URL"].startswith("redis://redis:6379")
    assert edge["depends_on"] == {
        "check": {"condition": "service_completed_successfully"},
        "redis": {"condition": "service_healthy"},
        "upstream": {"condition": "service_healthy"},
    }
    assert services["migrate"]["command"] == ["migrate"]
    # check runs on the edge's own file and stores, after migrate, before any replica.
    check = services["check"]
    assert check["command"] == ["check"]
    assert check["environment"] == edge["environment"]
    assert check["volumes"] == [v for v in edge["volumes"] if "edge.toml" in v]
    assert check["depends_on"]["migrate"]["condition"] == "service_completed_successfully"
    assert services["migrate"]["depends_on"]["postgres"]["condition"] == "service_healthy"
    assert services["front"]["depends_on"]["edge"]["condition"] == "service_healthy"
    # One published port, on the front; the admin port is published nowhere.
    published = {name: s["ports"] for name, s in services.items() if "ports" in s}
    assert published == {"front": ["127.0.0.1:8080:8080"]}
    assert "9901" not in json.dumps(published)
    for name in ("postgres", "redis", "upstream", "front"):
        assert services[name]["healthcheck"]["test"][0] == "CMD", name
    # SIGTERM gets longer than the proxy's own drain.
    settings = _settings(DEPLOY / "edge.toml")
    assert _seconds(edge["stop_grace_period"]) > settings.server.shutdown_timeout_s + 5
    # Every bind-mounted file exists (paths are relative to deploy/).
    for name, service in services.items():
        for volume in service.get("volumes", []):
            source = volume.split(":")[0]
            if source.startswith("."):
                assert (DEPLOY / source).is_file(), f"{name}: {source}"
    upstream = services["upstream"]
    assert upstream["entrypoint"][:2] == ["python", "/opt/demo/echo_upstream.py"]
    front_net = services["front"]["networks"]["edge"]["ipv4_address"]
    assert compose["networks"]["edge"]["ipam"]["config"][0]["subnet"] == "172.28.0.0/24"
    assert front_net == "172.28.0.10"


def _k8s(name: str) -> dict[str, dict[str, Any]]:
    docs = list(_yaml().safe_load_all((DEPLOY / "k8s" / name).read_text()))
    return {d["kind"]: d for d in docs}


def test_kubernetes_deployment_service_and_config() -> None:
    objects = _k8s("edge.yaml")
    assert set(objects) >= {"ConfigMap", "Deployment", "Service"}
    deployment = objects["Deployment"]["spec"]
    assert deployment["replicas"] == 2
    pod = deployment["template"]["spec"]
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert str(pod["securityContext"]["runAsUser"]) == RUNTIME_UID
    (container,) = pod["containers"]
    assert container["securityContext"]["readOnlyRootFilesystem"] is True
    assert container["securityContext"]["allowPrivilegeEscalation"] is False
    assert container["resources"]["requests"] and container["resources"]["limits"]
    mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert "emptyDir" in volumes[mounts["/app/var"]]
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert ports == {"http": 8080, "admin": 9901}
    assert container["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "admin"}
    assert container["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "admin"}
    env = {e["name"]: e for e in container["env"]}
    for name in ("DATABASE_URL", "REDIS_URL"):
        assert env[name]["valueFrom"]["secretKeyRef"]["key"] == name
    # The ConfigMap is a valid edge.toml, mounted where EDGE_CONFIG points.
    config_dir = next(p for p, n in mounts.items() if "configMap" in volumes[n])
    key = next(iter(objects["ConfigMap"]["data"]))
    assert env["EDGE_CONFIG"]["value"] == f"{config_dir}/{key}"
    settings = _settings(key, objects["ConfigMap"]["data"][key])
    assert settings.server.admin_listen.port == ports["admin"]
    assert settings.server.admin_listen.host == "0.0.0.0"  # the kubelet probes the pod IP
    # Draining completes before the kubelet's SIGKILL: preStop sleep + shutdown + audit drain.
    pre_stop = container["lifecycle"]["preStop"]["exec"]["command"]
    assert pre_stop[0] == "sleep"
    budget = float(pre_stop[1]) + settings.server.shutdown_timeout_s
    budget += settings.audit.drain_timeout_s
    assert pod["terminationGracePeriodSeconds"] > budget
    # The Service exposes the public port only.
    service_ports = objects["Service"]["spec"]["ports"]
    assert [p["port"] for p in service_ports] == [8080]
    selector = objects["Service"]["spec"]["selector"]
    assert selector.items() <= deployment["template"]["metadata"]["labels"].items()


def test_kubernetes_checks_before_the_proxy_starts() -> None:
    pod = _k8s("edge.yaml")["Deployment"]["spec"]["template"]["spec"]
    (check,) = pod["initContainers"]
    (edge,) = pod["containers"]
    assert check["args"] == ["check"] and check["image"] == edge["image"]
    env = {e["name"]: e for e in check["env"]}
    edge_env = {e["name"]: e for e in edge["env"]}
    # The same file and database as the proxy; Redis is left out (fail-open serves without it).
    assert env == {name: edge_env[name] for name in ("EDGE_CONFIG", "DATABASE_URL")}
    config = next(m for m in edge["volumeMounts"] if m["name"] == "config")
    assert check["volumeMounts"] == [config]
    assert check["securityContext"] == edge["securityContext"]


def test_kubernetes_migrate_job() -> None:
    job = _k8s("migrate.yaml")["Job"]["spec"]
    pod = job["template"]["spec"]
    assert pod["restartPolicy"] in ("Never", "OnFailure")
    assert pod["securityContext"]["runAsNonRoot"] is True
    (container,) = pod["containers"]
    assert container["args"] == ["migrate"]
    assert container["env"][0]["name"] == "DATABASE_URL"
    deployment_image = _k8s("edge.yaml")["Deployment"]["spec"]["template"]["spec"]
    assert container["image"] == deployment_image["containers"][0]["image"]
