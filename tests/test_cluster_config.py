"""Static checks of the cluster configuration; nothing here needs AWS, Kubernetes, Docker or a network.

- ``cluster.yaml`` goes through the Ray cluster launcher's own preparation and validation
  (``prepare_config`` + ``validate_config``, as ``ray up`` does before touching AWS), and every
  ``node_config`` through botocore's offline model of EC2 ``RunInstances``.
- ``cluster/kuberay/*.yaml`` are checked for the fields KubeRay (``ray.io/v1``) needs.
- Every ``spai ...`` command in the RayJobs, in ``cluster.yaml`` and in ``cluster/README.md`` code blocks is
  parsed by the real CLI parser, and the GPUs it asks for must fit the cluster it is written for.
- ``cluster/Dockerfile`` must build on the official Ray GPU image of the installed Ray's minor version and
  install this project.

Each checker returns a list of problems; the ``*_rejects_*`` tests feed it broken inputs to show it fails.
"""
from __future__ import annotations

import contextlib
import copy
import io
import re
import shlex
import tomllib
from pathlib import Path
from typing import Any, Iterator

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
CLUSTER_YAML = REPO / "cluster.yaml"
CLUSTER_DIR = REPO / "cluster"
KUBERAY_DIR = CLUSTER_DIR / "kuberay"
DOCKERFILE = CLUSTER_DIR / "Dockerfile"
DOCKERIGNORE = CLUSTER_DIR / "Dockerfile.dockerignore"
README = CLUSTER_DIR / "README.md"
RUNTIME_ENV = CLUSTER_DIR / "runtime_env.yaml"
KUBERAY_FILES = sorted(KUBERAY_DIR.glob("*.yaml"))
RAYJOB_FILES = [p for p in KUBERAY_FILES if p.name.startswith("rayjob-")]

# Where cluster/Dockerfile puts the repository inside the image (RayJobs refer to configs there).
IMAGE_REPO_DIR = "/home/ray/spai"

# vCPUs and GPUs of the instance types we use or suggest, to catch resources that do not match the
# hardware (the launcher trusts the declared resources). Types not listed are not checked.
INSTANCE_SPECS = {
    "m7i.xlarge": (4, 0), "m7i.2xlarge": (8, 0), "m7i.4xlarge": (16, 0),
    "g6e.xlarge": (4, 1), "g6e.2xlarge": (8, 1), "g6e.4xlarge": (16, 1), "g6e.8xlarge": (32, 1),
    "g6e.12xlarge": (48, 4), "g6e.16xlarge": (64, 1), "g6e.24xlarge": (96, 4), "g6e.48xlarge": (192, 8),
    "p4d.24xlarge": (96, 8), "p4de.24xlarge": (96, 8),
    "c7i.4xlarge": (16, 0), "c7i.8xlarge": (32, 0), "c7i.12xlarge": (48, 0), "c7i.16xlarge": (64, 0),
    "c7i.24xlarge": (96, 0), "c7i.48xlarge": (192, 0),
}

SECRET_NAME_RE = re.compile(r"(SECRET|PASSWORD|TOKEN|ACCESS_KEY|PRIVATE_KEY|CREDENTIAL)", re.I)
AWS_KEY_ID_RE = re.compile(r"\b(AKIA|ASIA)[0-9A-Z]{16}\b")


def _load_yaml(path: Path) -> Any:
    with open(path) as f:
        return yaml.safe_load(f)


def _ray_version() -> tuple[int, int]:
    import ray

    major, minor = ray.__version__.split(".")[:2]
    return int(major), int(minor)


def _major_minor(version: str) -> tuple[int, int]:
    parts = version.split(".")
    return int(parts[0]), int(parts[1])


# ---------------------------------------------------------------------------------------------------
# (a) cluster.yaml: Ray's launcher validation + EC2 RunInstances model + our own policy
# ---------------------------------------------------------------------------------------------------

def launcher_problems(config: dict) -> list[str]:
    """What ``ray up`` would reject before calling AWS, plus EC2 parameter errors and our policy."""
    from ray.autoscaler._private.util import check_legacy_fields, prepare_config, validate_config

    try:
        prepared = prepare_config(copy.deepcopy(config))
        validate_config(prepared)
        check_legacy_fields(prepared)
    except Exception as exc:  # jsonschema.ValidationError, ValueError, AssertionError, KeyError, ...
        return [f"Ray launcher validation failed: {type(exc).__name__}: {str(exc).splitlines()[0]}"]
    problems = _ec2_problems(prepared)
    problems += _policy_problems(prepared)
    return problems


def _ec2_problems(prepared: dict) -> list[str]:
    """Validate each node_config as the ``create_instances`` call Ray's AWS provider makes from it."""
    import botocore.session
    from botocore.exceptions import ParamValidationError
    from botocore.validate import validate_parameters

    if prepared["provider"].get("type") != "aws":
        return [f"provider.type is {prepared['provider'].get('type')!r}, expected 'aws'"]
    shape = botocore.session.get_session().get_service_model("ec2").operation_model("RunInstances").input_shape
    known_types = set(shape.members["InstanceType"].enum)
    problems = []
    for name, node_type in prepared["available_node_types"].items():
        conf = dict(node_type["node_config"])
        # Ray's AWS provider turns SubnetIds (not an EC2 field) into one SubnetId and adds the counts.
        subnets = conf.pop("SubnetIds", None)
        if subnets:
            conf["SubnetId"] = subnets[0]
        conf.update(MinCount=1, MaxCount=1)
        try:
            validate_parameters(conf, shape)
        except ParamValidationError as exc:
            problems.append(f"{name}: node_config is not valid for EC2 RunInstances: {exc}")
        if conf.get("InstanceType") not in known_types:
            problems.append(f"{name}: unknown EC2 instance type {conf.get('InstanceType')!r}")
        if not conf.get("ImageId"):
            # Without it Ray falls back to an old Ubuntu 18.04 DLAMI whose driver predates L40S.
            problems.append(f"{name}: node_config has no ImageId")
    return problems


def _policy_problems(prepared: dict) -> list[str]:
    problems = []
    types = prepared["available_node_types"]
    head = types[prepared["head_node_type"]]
    if head["resources"].get("CPU") != 0 or head["resources"].get("GPU", 0) != 0:
        problems.append(f"head must advertise CPU 0 and no GPU (no work on the head), has {head['resources']}")
    kinds: dict[str, list[str]] = {"l40s": [], "a100": [], "cpu": []}
    for name, node_type in types.items():
        resources = node_type["resources"]
        itype = node_type["node_config"].get("InstanceType", "")
        if "CPU" not in resources or "GPU" not in resources:
            problems.append(f"{name}: declare CPU and GPU in resources (the autoscaler plans with them)")
        if itype in INSTANCE_SPECS:
            vcpus, gpus = INSTANCE_SPECS[itype]
            if resources.get("GPU", 0) != gpus:
                problems.append(f"{name}: {itype} has {gpus} GPUs, resources say {resources.get('GPU', 0)}")
            if resources.get("CPU", 0) > vcpus:
                problems.append(f"{name}: {itype} has {vcpus} vCPUs, resources say {resources.get('CPU')}")
        if name == prepared["head_node_type"]:
            continue
        if node_type["min_workers"] > node_type["max_workers"]:
            problems.append(f"{name}: min_workers > max_workers")
        if itype.startswith("g6e.") and resources.get("GPU", 0) > 0:
            kinds["l40s"].append(name)
        elif itype.startswith(("p4d.", "p4de.")) and resources.get("GPU", 0) > 0:
            kinds["a100"].append(name)
        elif itype.startswith("c7i.") and resources.get("GPU", 0) == 0:
            kinds["cpu"].append(name)
            if resources.get("decode") != resources.get("CPU"):
                problems.append(f"{name}: decode nodes advertise one `decode` unit per CPU")
    for kind, names in kinds.items():
        if not names:
            problems.append(f"no worker node type for {kind}")
    if not prepared.get("idle_timeout_minutes"):
        problems.append("idle_timeout_minutes must be set (idle GPU nodes cost money)")
    # The project must be installed on the nodes: a custom image, or a pip install in the setup commands.
    image = prepared.get("docker", {}).get("image", "")
    setup = " ".join(prepared.get("setup_commands", []) + prepared.get("worker_setup_commands", []))
    if not image:
        problems.append("docker.image is not set")
    elif image.startswith("rayproject/") and not re.search(r"pip install .*spai-ray", setup):
        problems.append(f"{image} does not contain the project and no setup command installs spai-ray")
    run_options = " ".join(prepared.get("docker", {}).get("run_options", []))
    start = " ".join(prepared.get("initialization_commands", []) + prepared.get("head_start_ray_commands", []))
    if "MLFLOW_TRACKING_URI" not in run_options + start:
        problems.append("MLFLOW_TRACKING_URI is not passed to the nodes")
    for item in prepared.get("docker", {}).get("run_options", []):
        match = re.match(r"-e\s+(\w+)=", item)
        if match and SECRET_NAME_RE.search(match.group(1)):
            problems.append(f"credential {match.group(1)} written into cluster.yaml")
    return problems


def test_cluster_yaml_passes_ray_launcher_validation():
    problems = launcher_problems(_load_yaml(CLUSTER_YAML))
    assert not problems, "\n".join(problems)


def _mutated(config: dict, path: tuple, value: Any) -> dict:
    config = copy.deepcopy(config)
    node = config
    for key in path[:-1]:
        node = node[key]
    if value is _DELETE:
        del node[path[-1]]
    else:
        node[path[-1]] = value
    return config


_DELETE = object()


@pytest.mark.parametrize(
    "path, value, expect",
    [
        (("max_worker",), 3, "Ray launcher validation failed"),  # unknown top-level key (schema)
        (("available_node_types", "gpu_l40s", "resources", "CPU"), "lots", "Ray launcher validation failed"),
        (("head_node_type",), "ray.head.default", "Ray launcher validation failed"),
        # sum of min_workers above the global max_workers
        (("available_node_types", "cpu_decode", "min_workers"), 30, "Ray launcher validation failed"),
        (("available_node_types", "gpu_l40s", "node_config", "InstanceTyp"), "g6e.12xlarge", "RunInstances"),
        (("available_node_types", "gpu_l40s", "node_config", "InstanceType"), "g6e.13xlarge", "unknown EC2"),
        (("available_node_types", "gpu_a100", "node_config", "ImageId"), _DELETE, "no ImageId"),
        (("available_node_types", "head", "resources", "CPU"), 8, "head must advertise CPU 0"),
        (("available_node_types", "gpu_l40s", "resources", "GPU"), 1, "has 4 GPUs"),
        (("available_node_types", "cpu_decode", "resources", "GPU"), 1, "no worker node type for cpu"),
        (("docker", "run_options"), [], "MLFLOW_TRACKING_URI"),
        (("docker", "image"), "rayproject/ray:2.60.0-py311-gpu", "does not contain the project"),
    ],
)
def test_launcher_validation_rejects_broken_configs(path, value, expect):
    problems = launcher_problems(_mutated(_load_yaml(CLUSTER_YAML), path, value))
    assert any(expect in p for p in problems), problems


# ---------------------------------------------------------------------------------------------------
# (b) KubeRay manifests
# ---------------------------------------------------------------------------------------------------

DNS1123 = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
SUBMISSION_MODES = {"K8sJobMode", "HTTPMode", "InteractiveMode", "SidecarMode"}


def _containers(template: dict) -> list[dict]:
    return (template or {}).get("spec", {}).get("containers") or []


def _group_problems(where: str, group: dict, is_head: bool) -> list[str]:
    problems = []
    params = group.get("rayStartParams")
    if not isinstance(params, dict):
        problems.append(f"{where}: rayStartParams missing")
    elif not all(isinstance(v, str) for v in params.values()):
        problems.append(f"{where}: rayStartParams values must be strings (KubeRay passes them to ray start)")
    containers = _containers(group.get("template"))
    if not containers:
        problems.append(f"{where}: template.spec.containers missing")
    pod_spec = (group.get("template") or {}).get("spec", {})
    volume_names = {v.get("name") for v in pod_spec.get("volumes") or []}
    gpu_group = not is_head and str(group.get("groupName", "")).startswith("gpu")
    for c in containers:
        cname = f"{where}/{c.get('name')}"
        if not c.get("image"):
            problems.append(f"{cname}: no image")
        resources = c.get("resources") or {}
        limits, requests = resources.get("limits") or {}, resources.get("requests") or {}
        if "cpu" not in limits or "memory" not in limits:
            problems.append(f"{cname}: set cpu and memory limits (Ray sizes the node from them)")
        gpus = limits.get("nvidia.com/gpu", 0)
        if gpu_group and not gpus:
            problems.append(f"{cname}: GPU group without nvidia.com/gpu limit")
        if not gpu_group and gpus:
            problems.append(f"{cname}: GPUs requested outside a gpu-* group")
        if "nvidia.com/gpu" in requests and requests["nvidia.com/gpu"] != gpus:
            problems.append(f"{cname}: nvidia.com/gpu requests must equal limits")
        env = {e.get("name"): e for e in c.get("env") or []}
        if "MLFLOW_TRACKING_URI" not in env:
            problems.append(f"{cname}: MLFLOW_TRACKING_URI not set")
        for name, entry in env.items():
            if SECRET_NAME_RE.search(name or "") and "value" in entry:
                problems.append(f"{cname}: {name} written in the manifest; take it from a Secret")
            ref = (entry.get("valueFrom") or {}).get("secretKeyRef")
            if name.startswith(("AWS_", "MLFLOW_")) and not ref and "value" not in entry:
                problems.append(f"{cname}: {name} has neither a value nor a secretKeyRef")
        for mount in c.get("volumeMounts") or []:
            if mount.get("name") not in volume_names:
                problems.append(f"{cname}: volumeMount {mount.get('name')} has no volume")
    if not is_head:
        if not group.get("groupName"):
            problems.append(f"{where}: groupName missing")
        counts = [group.get(k) for k in ("minReplicas", "replicas", "maxReplicas")]
        if not all(isinstance(n, int) and n >= 0 for n in counts):
            problems.append(f"{where}: replicas, minReplicas and maxReplicas must be non-negative integers")
        elif not counts[0] <= counts[1] <= counts[2]:
            problems.append(f"{where}: need minReplicas <= replicas <= maxReplicas, got {counts}")
    return problems


def kuberay_problems(doc: dict, ray_version: tuple[int, int]) -> list[str]:
    """Fields KubeRay's ray.io/v1 RayCluster / RayJob need, and our conventions for them."""
    if not isinstance(doc, dict):
        return ["not a YAML mapping"]
    problems = []
    if doc.get("apiVersion") != "ray.io/v1":
        problems.append(f"apiVersion is {doc.get('apiVersion')!r}, expected 'ray.io/v1'")
    kind = doc.get("kind")
    name = (doc.get("metadata") or {}).get("name", "")
    if not DNS1123.match(name or ""):
        problems.append(f"metadata.name {name!r} is not a DNS-1123 label")
    spec = doc.get("spec") or {}
    if kind == "RayJob":
        if not isinstance(spec.get("entrypoint"), str) or not spec["entrypoint"].strip():
            problems.append("RayJob without entrypoint")
        if spec.get("shutdownAfterJobFinishes") is not True:
            problems.append("shutdownAfterJobFinishes must be true (free the GPUs when the job ends)")
        if not isinstance(spec.get("ttlSecondsAfterFinished"), int) or spec["ttlSecondsAfterFinished"] < 0:
            problems.append("ttlSecondsAfterFinished must be a non-negative integer")
        if spec.get("submissionMode") not in SUBMISSION_MODES:
            problems.append(f"submissionMode {spec.get('submissionMode')!r} not one of {sorted(SUBMISSION_MODES)}")
        cluster = spec.get("rayClusterSpec")
        if not isinstance(cluster, dict):
            return problems + ["RayJob without rayClusterSpec"]
    elif kind == "RayCluster":
        cluster = spec
        if cluster.get("enableInTreeAutoscaling") is not True:
            problems.append("the interactive RayCluster should autoscale (enableInTreeAutoscaling: true)")
    else:
        return problems + [f"kind {kind!r} is neither RayCluster nor RayJob"]
    version = str(cluster.get("rayVersion", ""))
    if not re.match(r"^\d+\.\d+\.\d+$", version) or _major_minor(version) != ray_version:
        problems.append(f"rayVersion {version!r} does not match the installed Ray {ray_version}")
    head = cluster.get("headGroupSpec")
    if not isinstance(head, dict):
        return problems + ["headGroupSpec missing"]
    problems += _group_problems("headGroupSpec", head, is_head=True)
    if (head.get("rayStartParams") or {}).get("num-cpus") != "0":
        problems.append('headGroupSpec: rayStartParams num-cpus must be "0" (no work on the head)')
    workers = cluster.get("workerGroupSpecs")
    if not isinstance(workers, list) or not workers:
        return problems + ["workerGroupSpecs missing"]
    names = [g.get("groupName") for g in workers]
    if len(set(names)) != len(names):
        problems.append(f"duplicate groupName in {names}")
    for group in workers:
        problems += _group_problems(f"workerGroupSpecs[{group.get('groupName')}]", group, is_head=False)
    if not any(str(n).startswith("gpu") for n in names):
        problems.append("no gpu-* worker group")
    return problems


@pytest.mark.parametrize("path", KUBERAY_FILES, ids=lambda p: p.name)
def test_kuberay_manifest_has_required_fields(path):
    problems = kuberay_problems(_load_yaml(path), _ray_version())
    assert not problems, f"{path.name}:\n" + "\n".join(problems)


def test_kuberay_manifests_present():
    names = {p.name for p in KUBERAY_FILES}
    expected = {"raycluster.yaml", "rayjob-train.yaml", "rayjob-tune.yaml", "rayjob-score.yaml"}
    assert expected <= names, f"missing: {sorted(expected - names)}"
    kinds = {p.name: _load_yaml(p)["kind"] for p in KUBERAY_FILES}
    assert kinds["raycluster.yaml"] == "RayCluster"
    assert all(kinds[n] == "RayJob" for n in expected - {"raycluster.yaml"})


def _gpu_worker(doc: dict) -> dict:
    cluster = doc["spec"].get("rayClusterSpec", doc["spec"])
    return next(g for g in cluster["workerGroupSpecs"] if g["groupName"].startswith("gpu"))


@pytest.mark.parametrize(
    "mutate, expect",
    [
        (lambda d: d.update(apiVersion="ray.io/v1alpha1"), "apiVersion"),
        (lambda d: d["spec"].pop("entrypoint"), "without entrypoint"),
        (lambda d: d["spec"].update(shutdownAfterJobFinishes=False), "shutdownAfterJobFinishes"),
        (lambda d: d["spec"].update(submissionMode="BatchMode"), "submissionMode"),
        (lambda d: d["spec"]["rayClusterSpec"].update(rayVersion="2.9.3"), "rayVersion"),
        (lambda d: _gpu_worker(d)["template"]["spec"]["containers"][0]["resources"]["limits"].pop("nvidia.com/gpu"),
         "without nvidia.com/gpu"),
        (lambda d: _gpu_worker(d).update(replicas=9), "minReplicas <= replicas <= maxReplicas"),
        (lambda d: _gpu_worker(d).pop("rayStartParams"), "rayStartParams missing"),
        (lambda d: _gpu_worker(d)["template"]["spec"]["containers"][0].pop("image"), "no image"),
        (lambda d: d["spec"]["rayClusterSpec"]["headGroupSpec"]["rayStartParams"].update({"num-cpus": "8"}),
         "num-cpus"),
        (lambda d: _gpu_worker(d)["template"]["spec"]["containers"][0].update(
            env=[{"name": "MLFLOW_TRACKING_URI", "value": "http://m"},
                 {"name": "AWS_SECRET_ACCESS_KEY", "value": "hunter2"}]), "take it from a Secret"),
    ],
)
def test_kuberay_checker_rejects_broken_manifests(mutate, expect):
    doc = copy.deepcopy(_load_yaml(KUBERAY_DIR / "rayjob-train.yaml"))
    mutate(doc)
    problems = kuberay_problems(doc, _ray_version())
    assert any(expect in p for p in problems), problems


def test_one_image_everywhere():
    """cluster.yaml and every KubeRay container run the same image (the one cluster/Dockerfile builds)."""
    images = {"cluster.yaml": _load_yaml(CLUSTER_YAML)["docker"]["image"]}
    for path in KUBERAY_FILES:
        doc = _load_yaml(path)
        cluster = doc["spec"].get("rayClusterSpec", doc["spec"])
        groups = [cluster["headGroupSpec"], *cluster["workerGroupSpecs"]]
        for group in groups:
            for c in _containers(group["template"]):
                images[f"{path.name}:{group.get('groupName', 'head')}/{c['name']}"] = c["image"]
    assert len(set(images.values())) == 1, images


# ---------------------------------------------------------------------------------------------------
# (c) every `spai ...` command resolves to a real CLI command
# ---------------------------------------------------------------------------------------------------

CONTROL_TOKENS = {"&&", "||", ";", "|", "&", ">", ">>", "<", "(", ")", ";;", "|&"}
ASSIGNMENT = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*=")
MAYBE_SPAI = re.compile(r"(?<![\w/.:-])spai(?=\s)")


def _shell_tokens(line: str) -> list[str]:
    lexer = shlex.shlex(line, posix=True, punctuation_chars=True)
    lexer.whitespace_split = True
    lexer.commenters = "#"
    return list(lexer)


def spai_commands_in_line(line: str) -> list[list[str]]:
    """argv lists (after `spai`) of every `spai` invoked as a command on one shell line.

    A command position is the start of the line, after `--` (``ray job submit ... -- spai ...``), after
    a control operator (``&&``, ``;``, ``|``) or after ``VAR=value`` prefixes at a command position.
    """
    if not MAYBE_SPAI.search(line):
        return []
    tokens = _shell_tokens(line)
    found, at_command, i = [], True, 0
    while i < len(tokens):
        tok = tokens[i]
        if tok in CONTROL_TOKENS or tok == "--":
            at_command = True
        elif at_command and ASSIGNMENT.match(tok):
            pass
        elif at_command and tok == "spai":
            j = i + 1
            while j < len(tokens) and tokens[j] not in CONTROL_TOKENS:
                j += 1
            found.append(tokens[i + 1:j])
            i = j
            continue
        else:
            at_command = False
        i += 1
    return found


def _logical_lines(lines: list[str]) -> Iterator[str]:
    """Join shell continuation lines (trailing backslash)."""
    buffer = ""
    for line in lines:
        stripped = line.rstrip()
        if stripped.endswith("\\"):
            buffer += stripped[:-1] + " "
            continue
        yield buffer + stripped
        buffer = ""
    if buffer:
        yield buffer


def readme_code_lines(text: str) -> list[str]:
    lines, inside = [], False
    for line in text.splitlines():
        if line.lstrip().startswith("```"):
            inside = not inside
            continue
        if inside:
            lines.append(line)
    return list(_logical_lines(lines))


def yaml_comment_lines(text: str) -> list[str]:
    """The text of every YAML comment, with the comment marker and prompt-like indentation removed."""
    comments = []
    for line in text.splitlines():
        match = re.search(r"(?:^|\s)#(.*)$", line)
        if match:
            comments.append(match.group(1).strip())
    return list(_logical_lines(comments))


def _yaml_strings(node: Any) -> Iterator[str]:
    if isinstance(node, str):
        yield node
    elif isinstance(node, dict):
        for value in node.values():
            yield from _yaml_strings(value)
    elif isinstance(node, list):
        for value in node:
            yield from _yaml_strings(value)


def collect_commands() -> dict[str, list[list[str]]]:
    """Every spai command of each source, keyed by a label for messages."""
    sources: dict[str, list[list[str]]] = {}
    text = CLUSTER_YAML.read_text()
    lines = yaml_comment_lines(text) + [s for v in _yaml_strings(yaml.safe_load(text)) for s in v.splitlines()]
    sources["cluster.yaml"] = [cmd for line in lines for cmd in spai_commands_in_line(line)]
    sources["cluster/README.md"] = [cmd for line in readme_code_lines(README.read_text())
                                    for cmd in spai_commands_in_line(line)]
    for path in KUBERAY_FILES:
        text = path.read_text()
        doc = yaml.safe_load(text)
        lines = yaml_comment_lines(text) + list(_yaml_strings(doc))
        sources[f"cluster/kuberay/{path.name}"] = [cmd for line in lines for cmd in spai_commands_in_line(line)]
    sources["cluster/runtime_env.yaml"] = [cmd for line in yaml_comment_lines(RUNTIME_ENV.read_text())
                                           for cmd in spai_commands_in_line(line)]
    return sources


def parse_spai(argv: list[str]):
    """The argparse Namespace (config flags also under their field's name, as plain options are), or the error text
    argparse printed."""
    from spai_cli.main import build_parser
    from spai_cli.options import flag_values

    err = io.StringIO()
    try:
        with contextlib.redirect_stderr(err):
            ns = build_parser(argv[0] if argv else None).parse_args(argv)  # the command's own parser, as spai does
    except SystemExit:
        return err.getvalue().strip().splitlines()[-1] if err.getvalue().strip() else "argparse exited"
    for key, value in flag_values(ns).items():
        setattr(ns, key.rsplit(".", 1)[-1], value)
    return ns


def command_problems(argv: list[str]) -> list[str]:
    result = parse_spai(argv)
    if isinstance(result, str):
        return [f"`spai {shlex.join(argv)}` does not parse: {result}"]
    return []


def test_spai_commands_parse_with_the_real_cli():
    sources = collect_commands()
    problems = [f"{label}: {p}" for label, cmds in sources.items() for argv in cmds for p in command_problems(argv)]
    assert not problems, "\n".join(problems)


def test_spai_commands_cover_train_tune_score():
    """The extraction must find the commands we document, or the parse test above proves nothing."""
    sources = collect_commands()
    subcommands = {label: {argv[0] for argv in cmds if argv} for label, cmds in sources.items()}
    assert {"train", "tune", "score", "evaluate"} <= subcommands["cluster/README.md"], subcommands
    assert {"train", "score"} <= subcommands["cluster.yaml"], subcommands
    for path in RAYJOB_FILES:
        kind = path.stem.removeprefix("rayjob-")
        entry = _load_yaml(path)["spec"]["entrypoint"]
        cmds = [c for line in entry.splitlines() for c in spai_commands_in_line(line)]
        assert [c[0] for c in cmds] == [kind], f"{path.name}: entrypoint {entry!r} should run `spai {kind}`"


@pytest.mark.parametrize(
    "line",
    [
        "spai trian --manifest m",
        "ray job submit -- spai train --manifest m --workers eight",
        "spai score --weights w --input i --output o --gpus many",
        "RAY_ADDRESS=http://h:8265 spai tune --manifest m --trials eight",
        "cd /x && spai score --weights w --input i --output o --precision fp16",
    ],
)
def test_command_checker_rejects_bad_commands(line):
    commands = spai_commands_in_line(line)
    assert commands, f"no spai command found in {line!r}"
    assert any(command_problems(argv) for argv in commands)


def test_command_extraction_finds_commands_in_context():
    text = ("# usage:\n#   ray job submit --working-dir . -- \\\n"
            "#     spai score --weights w \\\n#     --input i --output o\n")
    assert [c for line in yaml_comment_lines(text) for c in spai_commands_in_line(line)] == [
        ["score", "--weights", "w", "--input", "i", "--output", "o"]]
    readme = "text spai train outside a block\n```bash\nX=1 spai evaluate a.parquet && echo spai done\n```\n"
    assert [c for line in readme_code_lines(readme) for c in spai_commands_in_line(line)] == [
        ["evaluate", "a.parquet"]]
    assert spai_commands_in_line('pip install "spai-ray @ git+https://x/spai.git"') == []


def _gpus_needed(ns) -> float:
    if ns.command == "train":
        return (ns.workers or 1) * (ns.gpus_per_worker or 0)
    if ns.command == "tune":
        return ((getattr(ns, "max_concurrent", None) or 1) * (getattr(ns, "workers_per_trial", None) or 1)
                * (getattr(ns, "gpus_per_worker", None) or 0))
    if ns.command == "score":
        return (getattr(ns, "workers", None) or 1) * (getattr(ns, "gpus_per_worker", None) or 0)
    return 0


def _kuberay_gpu_capacity(doc: dict) -> int:
    cluster = doc["spec"].get("rayClusterSpec", doc["spec"])
    total = 0
    for group in cluster["workerGroupSpecs"]:
        per_pod = sum(int(c.get("resources", {}).get("limits", {}).get("nvidia.com/gpu", 0))
                      for c in _containers(group["template"]))
        total += per_pod * group["maxReplicas"]
    return total


def _local_paths(ns) -> list[str]:
    """``--manifest/--input/--output`` values of a parsed command that are not on shared storage (``s3://``)."""
    return [f"--{field} {value}" for field in ("manifest", "input", "output")
            if (value := getattr(ns, field, None)) is not None and not value.startswith("s3://")]


def test_rayjob_commands_fit_their_cluster_and_use_shared_storage():
    problems = []
    for path in RAYJOB_FILES:
        doc = _load_yaml(path)
        for argv in spai_commands_in_line(doc["spec"]["entrypoint"]):
            ns = parse_spai(argv)
            assert not isinstance(ns, str), ns
            need, have = _gpus_needed(ns), _kuberay_gpu_capacity(doc)
            if need > have:
                problems.append(f"{path.name}: `spai {ns.command}` needs {need} GPUs, the cluster has {have}")
            if need == 0:
                problems.append(f"{path.name}: `spai {ns.command}` asks for no GPUs")
            problems += [f"{path.name}: {arg} is not on shared storage (s3://)" for arg in _local_paths(ns)]
    assert not problems, "\n".join(problems)


def test_launcher_commands_fit_cluster_yaml():
    config = _load_yaml(CLUSTER_YAML)
    capacity = sum(t.get("max_workers", 0) * t["resources"].get("GPU", 0)
                   for t in config["available_node_types"].values())
    sources = collect_commands()
    problems = []
    for label in ("cluster.yaml", "cluster/README.md"):
        for argv in sources[label]:
            ns = parse_spai(argv)
            if not isinstance(ns, str) and _gpus_needed(ns) > capacity:
                problems.append(f"{label}: `spai {shlex.join(argv)}` needs more than {capacity} GPUs")
            if label == "cluster.yaml" and not isinstance(ns, str):
                problems += [f"cluster.yaml: {arg} is not on shared storage" for arg in _local_paths(ns)]
    assert not problems, "\n".join(problems)


def test_referenced_configs_exist():
    """`--config` paths (relative, or inside the image) must name files of this repository."""
    referenced = set()
    for cmds in collect_commands().values():
        for argv in cmds:
            ns = parse_spai(argv)
            for field in ("config", "space"):
                value = getattr(ns, field, None) if not isinstance(ns, str) else None
                if value:
                    referenced.add(value.removeprefix(IMAGE_REPO_DIR + "/"))
    assert referenced, "no --config in the documented commands"
    absolute = sorted(p for p in referenced if p.startswith("/"))
    assert not absolute, f"config paths outside {IMAGE_REPO_DIR}: {absolute}"
    missing = sorted(p for p in referenced if not (REPO / p).is_file())
    if missing and not any((REPO / "configs").glob("*.yaml")):
        pytest.skip(f"configs/ not written yet; referenced: {sorted(referenced)}")
    assert not missing, f"referenced configs missing from the repository: {missing}"


def test_runtime_env_is_valid():
    from ray.runtime_env import RuntimeEnv

    env = _load_yaml(RUNTIME_ENV)
    assert isinstance(env, dict)
    unknown = set(env) - set(RuntimeEnv.known_fields)
    assert not unknown, f"unknown runtime_env fields: {unknown}"
    RuntimeEnv(**env)
    assert ".git" in env.get("excludes", [])


# ---------------------------------------------------------------------------------------------------
# (d) cluster/Dockerfile
# ---------------------------------------------------------------------------------------------------

def dockerfile_instructions(text: str) -> list[tuple[str, str]]:
    lines = [line for line in text.splitlines() if not line.lstrip().startswith("#")]
    instructions = []
    for line in _logical_lines(lines):
        if line.strip():
            word, _, rest = line.strip().partition(" ")
            instructions.append((word.upper(), rest.strip()))
    return instructions


def _substitute(value: str, args: dict[str, str]) -> str:
    return re.sub(r"\$\{(\w+)\}|\$(\w+)", lambda m: args.get(m.group(1) or m.group(2), m.group(0)), value)


def dockerfile_problems(text: str, ray_version: tuple[int, int], requires_python: tuple[int, int]) -> list[str]:
    problems = []
    instructions = dockerfile_instructions(text)
    args: dict[str, str] = {}
    froms = []
    for instr, rest in instructions:
        if instr == "ARG" and "=" in rest:
            key, _, value = rest.partition("=")
            args.setdefault(key.strip(), value.strip().strip('"'))
        elif instr == "FROM":
            froms.append(_substitute(rest.split()[0], args))
    if not froms:
        return ["no FROM"]
    base = froms[-1]
    match = re.match(r"^rayproject/ray:(\d+)\.(\d+)\.(\d+)-py(\d)(\d+)-(gpu|cu\d+)$", base)
    if not match:
        problems.append(f"final base image {base!r} is not an official rayproject/ray GPU image "
                        "(rayproject/ray:X.Y.Z-pyXY-gpu)")
    else:
        if (int(match[1]), int(match[2])) != ray_version:
            problems.append(f"base image Ray {match[1]}.{match[2]} != installed Ray {ray_version[0]}.{ray_version[1]}")
        if (int(match[4]), int(match[5])) < requires_python:
            problems.append(f"base image Python {match[4]}.{match[5]} is older than requires-python {requires_python}")
    runs = " ".join(rest for instr, rest in instructions if instr == "RUN")
    installs = [m.group(0) for m in re.finditer(r"pip install[^&;|]*", runs)]
    if not any(re.search(r"(?<=\s)\.(?=\s|$)", cmd) for cmd in installs):
        problems.append("no `pip install .` of the project")
    if any(re.search(r"\s(-e|--editable)\b", cmd) for cmd in installs):
        problems.append("the project must be installed non-editable")
    workdirs = [rest for instr, rest in instructions if instr == "WORKDIR"]
    if not workdirs:
        problems.append("no WORKDIR")
    elif workdirs[-1] != IMAGE_REPO_DIR:
        problems.append(f"WORKDIR is {workdirs[-1]}, the RayJobs expect the repository at {IMAGE_REPO_DIR}")
    copies = [rest.split() for instr, rest in instructions if instr in ("COPY", "ADD")]
    if not any(c[-2:] in ([".", IMAGE_REPO_DIR], [".", "."]) for c in copies):
        problems.append(f"the repository is not copied to {IMAGE_REPO_DIR}")
    for instr, rest in instructions:
        if instr in ("ENV", "ARG"):
            name = re.split(r"[=\s]", rest, maxsplit=1)[0]
            if SECRET_NAME_RE.search(name):
                problems.append(f"{instr} {name}: no credentials in the image")
    if AWS_KEY_ID_RE.search(text):
        problems.append("an AWS access key id is written in the Dockerfile")
    return problems


def _requires_python() -> tuple[int, int]:
    with open(REPO / "pyproject.toml", "rb") as f:
        spec = tomllib.load(f)["project"]["requires-python"]
    match = re.search(r">=\s*(\d+)\.(\d+)", spec)
    assert match, spec
    return int(match[1]), int(match[2])


def test_dockerfile_base_image_matches_ray_and_installs_project():
    problems = dockerfile_problems(DOCKERFILE.read_text(), _ray_version(), _requires_python())
    assert not problems, "\n".join(problems)


@pytest.mark.parametrize(
    "old, new, expect",
    [
        ("ARG RAY_VERSION=2.60.0", "ARG RAY_VERSION=2.9.3", "!= installed Ray"),
        ("FROM rayproject/ray:${RAY_VERSION}-py311-gpu", "FROM python:3.11-slim", "not an official"),
        ("-py311-gpu", "-py39-gpu", "older than requires-python"),
        ("pip install --no-cache-dir . ", "pip install --no-cache-dir -e . ", "non-editable"),
        ("pip install --no-cache-dir . ", "pip install --no-cache-dir torch ", "no `pip install .`"),
        ("ENV PYTHONUNBUFFERED=1", "ENV AWS_SECRET_ACCESS_KEY=abc", "no credentials"),
        ("WORKDIR /home/ray/spai", "WORKDIR /app", "WORKDIR is /app"),
    ],
)
def test_dockerfile_checker_rejects_broken_dockerfiles(old, new, expect):
    text = DOCKERFILE.read_text()
    assert old in text, f"fixture out of date: {old!r} not in the Dockerfile"
    problems = dockerfile_problems(text.replace(old, new), _ray_version(), _requires_python())
    assert any(expect in p for p in problems), problems


def test_kuberay_ray_version_matches_dockerfile():
    args = dict(rest.partition("=")[::2] for instr, rest in dockerfile_instructions(DOCKERFILE.read_text())
                if instr == "ARG" and "=" in rest)
    image_ray = args.get("RAY_VERSION")
    assert image_ray, "cluster/Dockerfile has no ARG RAY_VERSION=..."
    for path in KUBERAY_FILES:
        doc = _load_yaml(path)
        cluster = doc["spec"].get("rayClusterSpec", doc["spec"])
        assert cluster["rayVersion"] == image_ray, f"{path.name}: rayVersion {cluster['rayVersion']} != {image_ray}"


def test_dockerignore_keeps_local_state_out_and_sources_in():
    patterns = {line.strip().rstrip("/") for line in DOCKERIGNORE.read_text().splitlines()
                if line.strip() and not line.startswith("#")}
    assert {".git", ".venv"} <= patterns, patterns
    with open(REPO / "pyproject.toml", "rb") as f:
        packages = [p.rstrip("*") for p in tomllib.load(f)["tool"]["setuptools"]["packages"]["find"]["include"]]
    needed = {"pyproject.toml", "configs", *packages}
    excluded = sorted(n for n in needed if n in patterns or f"{n}/" in patterns)
    assert not excluded, f"the image build needs {excluded}"
