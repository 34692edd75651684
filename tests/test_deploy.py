"""Static checks of the deployment files: Dockerfile, docker-compose.yml, deploy/k8s. No network, no Docker."""

from __future__ import annotations

import ast
import fnmatch
import json
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
K8S = ROOT / "deploy" / "k8s"
GUNICORN_CMD = ["gunicorn", "main:app", "-c", "gunicorn_config.py"]


def _instructions() -> list[tuple[str, str]]:
    """Return the Dockerfile's (KEYWORD, arguments) pairs, continuation lines joined."""
    text = (ROOT / "Dockerfile").read_text()
    lines = [line for line in text.splitlines() if not line.lstrip().startswith("#")]
    joined = re.sub(r"\\\n", " ", "\n".join(lines))
    pairs = []
    for line in joined.splitlines():
        if line.strip():
            keyword, _, args = line.strip().partition(" ")
            pairs.append((keyword.upper(), args.strip()))
    return pairs


def _copy_sources() -> list[str]:
    sources = []
    for keyword, args in _instructions():
        if keyword in ("COPY", "ADD"):
            words = json.loads(args) if args.startswith("[") else shlex.split(args)
            sources += [w for w in words[:-1] if not w.startswith("--")]
    return sources


def _compose() -> dict[str, Any]:
    compose: dict[str, Any] = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    return compose


def _seconds(duration: str) -> float:
    match = re.fullmatch(r"(\d+)s", duration)
    assert match, f"write durations in whole seconds, like '40s', not {duration!r}"
    return float(match[1])


def _manifests() -> list[dict[str, Any]]:
    return [doc for path in sorted(K8S.glob("*.yaml")) for doc in yaml.safe_load_all(path.read_text()) if doc]


def _manifest(kind: str) -> dict[str, Any]:
    (found,) = [doc for doc in _manifests() if doc["kind"] == kind]
    return found


def _validate_k8s(doc: dict[str, Any]) -> None:
    kubernetes_validate.validate(doc, kubernetes_validate.latest_version(), strict=True)


def test_hadolint_passes() -> None:
    hadolint = Path(sys.executable).parent / "hadolint"
    if not hadolint.exists():
        found = shutil.which("hadolint")
        if found is None:
            pytest.fail(f"hadolint not found at {hadolint} or on PATH: pip install -r requirements-test.txt")
        hadolint = Path(found)
    result = subprocess.run(
        [str(hadolint), "--no-color", "Dockerfile"], cwd=ROOT, capture_output=True, text=True, timeout=30
    )
    assert result.returncode == 0 and not result.stdout.strip(), result.stdout + result.stderr


def test_every_copy_source_exists() -> None:
    sources = _copy_sources()
    assert sources
    missing = [src for src in sources if not any(ROOT.glob(src.rstrip("/")))]
    assert not missing, f"Dockerfile copies files the repo lacks: {missing}"


def test_image_has_every_project_module_the_app_imports() -> None:
    copied = {src.rstrip("/").removesuffix(".py") for src in _copy_sources()}
    files = [path for src in copied for path in [ROOT / f"{src}.py", *(ROOT / src).rglob("*.py")] if path.is_file()]
    imported = {"classification"}  # the default TASK_MODULE, loaded by name rather than imported
    for node in (node for f in files for node in ast.walk(ast.parse(f.read_text()))):
        if isinstance(node, ast.Import):
            imported |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            imported.add(node.module.split(".")[0])
    ours = {name for name in imported if (ROOT / f"{name}.py").exists() or (ROOT / name / "__init__.py").exists()}
    assert ours <= copied, f"the app imports project modules the Dockerfile does not copy: {sorted(ours - copied)}"


def test_dockerignore_keeps_copy_sources() -> None:
    patterns = [p.strip() for p in (ROOT / ".dockerignore").read_text().splitlines()]
    patterns = [p.rstrip("/") for p in patterns if p and not p.startswith(("#", "!"))]
    excluded = [s for s in _copy_sources() for p in patterns if fnmatch.fnmatch(s.rstrip("/"), p)]
    assert not excluded, f".dockerignore excludes files the Dockerfile copies: {excluded}"


def test_dockerfile_installs_requirements_before_code_and_runs_gunicorn() -> None:
    instructions = _instructions()
    keywords = [keyword for keyword, _ in instructions]
    installs = [i for i, (kw, args) in enumerate(instructions) if kw == "RUN" and "pip install" in args]
    assert len(installs) == 1 and "-r requirements.txt" in instructions[installs[0]][1]
    copies = [i for i, (kw, _) in enumerate(instructions) if kw == "COPY"]
    # requirements.txt alone before the install, the code after: code edits keep the torch layer cached.
    assert instructions[copies[0]][1].split() == ["requirements.txt", "./"] and copies[0] < installs[0] < copies[1]
    user = [args for kw, args in instructions if kw == "USER"][-1]
    assert user.split(":")[0] not in ("root", "0")
    assert "EXPOSE" in keywords and "HEALTHCHECK" in keywords
    cmd = [args for kw, args in instructions if kw == "CMD"][-1]
    assert json.loads(cmd) == GUNICORN_CMD


def test_compose_matches_vendored_spec() -> None:
    schema = json.loads((ROOT / "deploy" / "compose-spec.json").read_text())
    validator = jsonschema.validators.validator_for(schema)
    validator.check_schema(schema)
    errors = [f"{list(e.absolute_path)}: {e.message}" for e in validator(schema).iter_errors(_compose())]
    assert not errors, errors


def test_compose_classifier_service() -> None:
    service = _compose()["services"]["classifier"]
    assert "timeout=1.0" in service["environment"]
    assert "5001:5001" in service["ports"]
    assert "/readyz" in " ".join(service["healthcheck"]["test"])
    assert service["restart"] == "unless-stopped"
    assert _seconds(service["stop_grace_period"]) > 30  # gunicorn's GRACEFUL_TIMEOUT


def test_compose_gpu_service_is_opt_in() -> None:
    service = _compose()["services"]["classifier-gpu"]
    assert service["profiles"] == ["gpu"]
    assert "DEVICE=cuda" in service["environment"]
    (device,) = service["deploy"]["resources"]["reservations"]["devices"]
    assert device == {"driver": "nvidia", "count": 1, "capabilities": ["gpu"]}


@pytest.mark.parametrize("path", sorted(K8S.glob("*.yaml")), ids=lambda p: p.name)
def test_k8s_manifest_validates(path: Path) -> None:
    for doc in yaml.safe_load_all(path.read_text()):
        _validate_k8s(doc)


def test_k8s_hpa_queue_depth_block_validates() -> None:
    text = (K8S / "hpa.yaml").read_text()
    start = text.index("    # - type: Pods")
    block = yaml.safe_load("\n".join(line.replace("# ", "", 1) for line in text[start:].splitlines()))
    hpa = _manifest("HorizontalPodAutoscaler")
    hpa["spec"]["metrics"] += block
    _validate_k8s(hpa)
    assert block[0]["pods"]["metric"]["name"] == "batch_queue_depth"


def test_k8s_deployment_probes_and_drain() -> None:
    pod = _manifest("Deployment")["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    assert container["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert container["livenessProbe"]["httpGet"]["path"] == "/healthz"
    assert "startupProbe" in container
    assert {p["containerPort"] for p in container["ports"]} == {5001}
    sleep, seconds = container["lifecycle"]["preStop"]["exec"]["command"]
    env = {e["name"]: e["value"] for e in container["env"]}
    graceful_s = int(env.get("GRACEFUL_TIMEOUT", "30"))
    assert sleep == "sleep" and pod["terminationGracePeriodSeconds"] > int(seconds) + graceful_s


def test_k8s_service_targets_the_container_port() -> None:
    (port,) = _manifest("Service")["spec"]["ports"]
    (container,) = _manifest("Deployment")["spec"]["template"]["spec"]["containers"]
    named = {p.get("name"): p["containerPort"] for p in container["ports"]}
    assert port["port"] == 80 and named.get(port["targetPort"], port["targetPort"]) == 5001
