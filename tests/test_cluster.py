"""Running on a real cluster: the cluster definitions, and a real two-node Ray cluster.

- ``ray-cluster.yaml`` passes the cluster launcher's own validation (shipped in the ray package),
  and the launcher's own AWS bootstrap steps, run offline, neither create a security group (whose
  SSH rule would be open to 0.0.0.0/0) nor give the head the default full-access role.
- The IAM policies in ``cluster/aws/`` are least-privilege: the workers' S3 on the bucket only,
  the head's no wildcard action, EC2 scoped to the cluster, PassRole for the worker role only.
- The KubeRay manifests parse, name the image built from ``cluster/Dockerfile`` (the same one as
  ``ray-cluster.yaml``, by digest), keep token auth on and expose nothing, give head, workers and
  MLflow ServiceAccounts of their own (no API token for workers and MLflow); their entrypoint and
  the commands in ``cluster/README.md`` are the project's jobs and parse with the jobs' own parsers.
- The image installs exact versions: ``cluster/requirements.lock`` (``name==version`` only) with
  ``pip install -c``.
- Two Ray nodes on this machine (``ray start --head`` + ``ray start --address``, each with its own
  temp dir, ports, 3 CPUs and a custom resource, ``head_node`` / ``node_b``) run ``ray job submit
  --working-dir . -- python jobs/preprocess.py ...`` (flow actors on both nodes) and a smoke
  ``jobs/train.py`` whose two workers run on different nodes: 2 CPUs per worker, so one fits
  per node (jobs/train.py has no flag for custom worker resources).

The two-node cluster is isolated from the session's ``ray_local`` instance (tests/conftest.py) and
from any other Ray on the machine: its own temp dirs (so no ``/tmp/ray/ray_current_cluster`` that a
later ``ray.init()`` would join), free ports for every listening process, and token auth with a
token of its own (``RAY_AUTH_MODE=token`` + ``RAY_AUTH_TOKEN``, the highest-precedence source, given
identically to ``ray start`` and ``ray job submit``; this process's environment is never changed).
Every process of the cluster inherits a marker variable, and the finalizer stops exactly those
processes by pid (SIGTERM, then SIGKILL): never ``ray stop``, which would kill every Ray on the
machine, the session's own instance included.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import importlib.util
import json
import os
import re
import secrets
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
LAUNCHER_YAML = REPO / "ray-cluster.yaml"
DOCKERFILE = REPO / "cluster" / "Dockerfile"
KUBERAY = REPO / "cluster" / "kuberay"
CLUSTER_README = REPO / "cluster" / "README.md"
AWS_POLICIES = REPO / "cluster" / "aws"
LOCK = REPO / "cluster" / "requirements.lock"
IMAGE_PROJECT_DIR = "/home/ray/stm"  # where cluster/Dockerfile puts the repository
BASE_IMAGE = "rayproject/ray:2.60.0-py311-gpu"  # the tag; the Dockerfile adds @sha256:<digest>
BUCKET = "example-lab-stm"
# name:tag@sha256:<64 hex>: the digest is what is pulled, the tag is for people.
PINNED_IMAGE = re.compile(r"^[a-z0-9][a-z0-9./_-]*:[\w][\w.-]*@sha256:[0-9a-f]{64}$")


def _yaml_docs(path: Path) -> list[dict]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d]


def _kind(path: Path, kind: str) -> dict:
    docs = [d for d in _yaml_docs(path) if d.get("kind") == kind]
    assert len(docs) == 1, f"{path.name}: expected one {kind}, found {len(docs)}"
    return docs[0]


def _cluster_specs() -> dict[str, dict]:
    """The RayCluster specs: the long-lived cluster's and the one the RayJob creates."""
    return {
        "raycluster.yaml": _kind(KUBERAY / "raycluster.yaml", "RayCluster")["spec"],
        "rayjob.yaml": _kind(KUBERAY / "rayjob.yaml", "RayJob")["spec"]["rayClusterSpec"],
    }


def _pod_templates(spec: dict) -> list[tuple[str, dict]]:
    groups = [("head", spec["headGroupSpec"])]
    groups += [(g["groupName"], g) for g in spec.get("workerGroupSpecs", [])]
    return [(name, g["template"]["spec"]) for name, g in groups]


def _launcher_image() -> str:
    return yaml.safe_load(LAUNCHER_YAML.read_text())["docker"]["image"]


def _policy(name: str) -> dict:
    return json.loads((AWS_POLICIES / f"{name}-policy.json").read_text())


def _as_list(value) -> list:
    return value if isinstance(value, list) else [value]


def _statements(policy: dict, effect: str = "Allow") -> list[dict]:
    assert policy["Version"] == "2012-10-17"
    return [st for st in policy["Statement"] if st["Effect"] == effect]


def _profile_name(node_type: dict) -> str:
    return node_type["node_config"]["IamInstanceProfile"]["Arn"].rsplit("/", 1)[1]


@pytest.fixture
def aws_bootstrap(monkeypatch):
    """The launcher's AWS bootstrap module (``ray.autoscaler._private.aws.config``) with every
    AWS call made to fail, so that a step that would create or change anything in the account
    fails the test. boto3 is stubbed where it is not installed (the module only imports it)."""
    import types

    stubbed = importlib.util.find_spec("boto3") is None
    if stubbed:
        stubs = {
            "boto3": {"__version__": "1.34.0"},
            "boto3.exceptions": {"ResourceNotExistsError": type("NotExists", (Exception,), {})},
            "boto3.resources": {},
            "boto3.resources.base": {"ServiceResource": type("ServiceResource", (), {})},
            "botocore": {},
            "botocore.client": {"BaseClient": type("BaseClient", (), {})},
            "botocore.config": {"Config": type("Config", (), {})},
        }
        for name, attrs in stubs.items():
            module = types.ModuleType(name)
            module.__dict__.update(attrs)
            monkeypatch.setitem(sys.modules, name, module)
    before = set(sys.modules)
    from ray.autoscaler._private.aws import config as aws_config

    def no_aws(*args, **kwargs):
        raise AssertionError(f"the launcher's bootstrap called AWS: {args}")

    monkeypatch.setattr(aws_config, "_resource", no_aws)
    monkeypatch.setattr(aws_config, "_client", no_aws)
    yield aws_config
    if stubbed:  # a later import must get the real boto3, not these stubs
        import ray.autoscaler._private as autoscaler_private

        for name in set(sys.modules) - before:
            if name.startswith("ray.autoscaler._private.aws"):
                del sys.modules[name]
        if "ray.autoscaler._private.aws" not in before and hasattr(autoscaler_private, "aws"):
            delattr(autoscaler_private, "aws")


def _prepared_launcher_config() -> dict:
    from ray.autoscaler._private.util import prepare_config, validate_config

    prepared = prepare_config(yaml.safe_load(LAUNCHER_YAML.read_text()))
    validate_config(prepared)
    return prepared


# --- the cluster launcher ----------------------------------------------------------------------
def test_ray_cluster_yaml_passes_the_launchers_validation():
    from ray.autoscaler._private.util import prepare_config, validate_config

    cfg = yaml.safe_load(LAUNCHER_YAML.read_text())
    prepared = prepare_config(copy.deepcopy(cfg))
    validate_config(prepared)  # raises on any schema or consistency error
    assert prepared["provider"]["type"] == "aws"


def test_ray_cluster_yaml_node_types_image_and_security():
    cfg = yaml.safe_load(LAUNCHER_YAML.read_text())
    types = cfg["available_node_types"]
    head = types[cfg["head_node_type"]]
    assert head["resources"].get("CPU") == 0, "the head runs drivers only"
    instance = {name: t["node_config"]["InstanceType"] for name, t in types.items()}
    gpu = [n for n, i in instance.items() if i.split(".")[0] in ("p4d", "p4de", "p5", "p5e")]
    cpu = [n for n in types if n != cfg["head_node_type"] and n not in gpu]
    assert gpu and cpu, f"need a CPU and an 8-GPU worker type, got {instance}"
    for name in gpu + cpu:  # autoscaling: from zero, bounded
        assert types[name]["min_workers"] == 0 < types[name]["max_workers"], name
    assert cfg["idle_timeout_minutes"] > 0
    assert sum(types[n]["max_workers"] for n in gpu + cpu) <= cfg["max_workers"]

    assert cfg["docker"]["image"] == _launcher_image()
    assert "FROM ${RAY_IMAGE}" in DOCKERFILE.read_text()
    assert f"ARG RAY_IMAGE={BASE_IMAGE}@sha256:" in DOCKERFILE.read_text()

    # The dashboard/job API is reached through `ray dashboard` (an SSH tunnel) only; the launcher
    # opens no port of its own (see the SSH test below).
    assert "security_group" not in cfg["provider"]
    assert "ray dashboard ray-cluster.yaml" in LAUNCHER_YAML.read_text()
    # Token auth on every node, with the token file copied from the machine that runs `ray up`.
    for cmd in ("head_start_ray_commands", "worker_start_ray_commands"):
        start = [c for c in cfg[cmd] if "ray start" in c]
        assert start and all("RAY_AUTH_MODE=token" in c for c in start), cmd
    mounts = dict(cfg["file_mounts"])
    assert mounts.pop("/home/ray/.ray/auth_token") == "~/.ray/auth_token"
    # Only the package sources are mounted (the launcher hashes every mounted file): never the
    # repository root with its data/ and runs/.
    for local in mounts.values():
        assert (REPO / local).exists() and Path(local).name in (
            "pyproject.toml", "README.md", "stm", "jobs",
        ), local  # fmt: skip
    # Setup installs the project (dependencies come from the image).
    assert any("pip install" in c and "/home/ray/stm" in c for c in cfg["setup_commands"])


def test_ray_cluster_yaml_head_and_workers_have_roles_of_their_own(aws_bootstrap):
    cfg = _prepared_launcher_config()
    types = cfg["available_node_types"]
    head_type = cfg["head_node_type"]
    profiles = {name: _profile_name(t) for name, t in types.items()}
    workers = {name: p for name, p in profiles.items() if name != head_type}
    assert profiles[head_type] == "stm-ray-head", profiles
    assert set(workers.values()) == {"stm-ray-worker"}, profiles
    for profile in ("stm-ray-head", "stm-ray-worker"):
        assert (AWS_POLICIES / f"{profile}-policy.json").is_file(), profile
    # The launcher's own IAM step keeps the head's profile: it never falls back to its default
    # ray-autoscaler-v1 (EC2 and S3 full access) and makes no IAM call.
    out = aws_bootstrap._configure_iam_role(copy.deepcopy(cfg))
    head_config = out["available_node_types"][head_type]["node_config"]
    assert (
        head_config["IamInstanceProfile"] == types[head_type]["node_config"]["IamInstanceProfile"]
    )
    # The guide creates both profiles from the shipped policies.
    readme = CLUSTER_README.read_text()
    for command in ("aws iam create-policy", "aws iam create-role", "create-instance-profile"):
        assert command in readme, command
    assert "ec2-trust-policy.json" in readme and (AWS_POLICIES / "ec2-trust-policy.json").is_file()


def test_ray_cluster_yaml_opens_ssh_to_the_labs_cidr_only(aws_bootstrap):
    cfg = _prepared_launcher_config()
    groups = {
        name: t["node_config"].get("SecurityGroupIds")
        for name, t in cfg["available_node_types"].items()
    }
    # Every node type names the one pre-made group: the launcher then creates and fills no group
    # (one it fills always gets SSH from 0.0.0.0/0, whatever IpPermissions says).
    assert all(groups.values()) and len({tuple(g) for g in groups.values()}) == 1, groups
    (sg_id,) = next(iter(groups.values()))
    assert re.fullmatch(r"sg-[0-9a-f]{8,17}", sg_id), sg_id
    out = aws_bootstrap._configure_security_group(copy.deepcopy(cfg))  # no AWS call
    assert {
        n: t["node_config"]["SecurityGroupIds"] for n, t in out["available_node_types"].items()
    } == groups
    assert "0.0.0.0/0" in str(aws_bootstrap._create_default_ssh_inbound_rules())  # what it avoids
    assert "0.0.0.0/0" not in json.dumps(cfg["provider"]) and "IpPermissions" not in str(cfg)
    # The head may launch into that group only.
    run_resources = [
        r
        for st in _statements(_policy("stm-ray-head"))
        if "ec2:RunInstances" in _as_list(st["Action"])
        for r in _as_list(st["Resource"])
    ]
    assert [r for r in run_resources if ":security-group/" in r] == [
        f"arn:aws:ec2:us-east-1:123456789012:security-group/{sg_id}"
    ]
    # The guide's security group: SSH (22) from a CIDR that is not the world, all traffic from the
    # group itself, and no other rule.
    readme = CLUSTER_README.read_text()
    rules = re.findall(r"aws ec2 authorize-security-group-ingress (.*)", readme)
    assert len(rules) == 2, rules
    ssh = [r for r in rules if "--port 22" in r]
    assert len(ssh) == 1 and "--protocol tcp" in ssh[0], rules
    cidr = re.search(r"--cidr (\S+)", ssh[0]).group(1)
    assert cidr != "0.0.0.0/0" and not cidr.startswith("::/"), cidr
    other = [r for r in rules if r not in ssh]
    assert "--source-group $SG" in other[0] and "--cidr" not in other[0], rules
    assert "0.0.0.0/0" not in readme.split("## 3a.", 1)[1].split("## 3b.", 1)[0]


def test_aws_policies_are_least_privilege():
    bucket, objects = f"arn:aws:s3:::{BUCKET}", f"arn:aws:s3:::{BUCKET}/*"
    policies = {name: _policy(name) for name in ("stm-ray-head", "stm-ray-worker", "stm-mlflow")}
    assert sorted(p.name for p in AWS_POLICIES.glob("*.json")) == sorted(
        [f"{n}-policy.json" for n in policies] + ["ec2-trust-policy.json", "stm-bucket-policy.json"]
    )
    for name, policy in policies.items():
        for st in policy["Statement"]:
            actions = _as_list(st["Action"])
            assert "NotAction" not in st and "NotResource" not in st, (name, st)
            assert all("*" not in a for a in actions), (name, actions)  # no wildcard action
            if st["Effect"] == "Allow" and any(a.startswith("s3:") for a in actions):
                assert all(
                    r in (bucket, objects) or r.startswith(bucket + "/")
                    for r in _as_list(st["Resource"])
                ), (name, st)

    # Workers: S3 on the bucket and nothing else.
    worker = _statements(policies["stm-ray-worker"])
    assert {a.split(":")[0] for st in worker for a in _as_list(st["Action"])} == {"s3"}
    assert {r for st in worker for r in _as_list(st["Resource"])} == {bucket, objects}

    # Head: the workers' S3, plus EC2 scoped to this cluster and PassRole for the worker role.
    head = _statements(policies["stm-ray-head"])
    head_s3 = [st for st in head if all(a.startswith("s3:") for a in _as_list(st["Action"]))]
    assert head_s3 == worker
    assert _statements(policies["stm-ray-head"], "Deny") == _statements(
        policies["stm-ray-worker"], "Deny"
    )
    services = {a.split(":")[0] for st in head for a in _as_list(st["Action"])}
    assert services == {"s3", "ec2", "iam", "ssm"}, services
    for st in head:
        actions, resources = _as_list(st["Action"]), _as_list(st["Resource"])
        if "*" in resources:
            assert all(a.startswith("ec2:Describe") for a in actions), st
        if any(a.startswith("iam:") for a in actions):
            assert actions == ["iam:PassRole"], st
            assert resources == ["arn:aws:iam::123456789012:role/stm-ray-worker"], st
            assert st["Condition"] == {"StringEquals": {"iam:PassedToService": "ec2.amazonaws.com"}}
        if any(r.endswith(":instance/*") for r in resources):
            assert "Condition" in st, st  # launch, tag and terminate only this cluster's
        if "ec2:TerminateInstances" in actions:
            assert st["Condition"] == {
                "StringEquals": {"aws:ResourceTag/ray-cluster-name": "stm"}
            }, st
        if "ec2:RunInstances" in actions and any(":instance/" in r for r in resources):
            assert st["Condition"] == {
                "StringEquals": {"aws:RequestTag/ray-cluster-name": "stm"}
            }, st
    assert yaml.safe_load(LAUNCHER_YAML.read_text())["cluster_name"] == "stm"

    # MLflow: its artifact prefix only, which the Ray roles may not write.
    mlflow = _statements(policies["stm-mlflow"])
    assert {a.split(":")[0] for st in mlflow for a in _as_list(st["Action"])} == {"s3"}
    writes = [st for st in mlflow if "s3:PutObject" in _as_list(st["Action"])]
    assert [st["Resource"] for st in writes] == [f"{bucket}/mlflow/*"]
    (deny,) = _statements(policies["stm-ray-worker"], "Deny")
    assert deny["Resource"] == f"{bucket}/mlflow/*" and "s3:PutObject" in deny["Action"]
    # The bucket policy only takes away: writes under runs/ for all but the Ray roles, under
    # mlflow/ for all but the MLflow role.
    guarded = {}
    for st in _policy("stm-bucket")["Statement"]:
        assert st["Effect"] == "Deny" and st["Principal"] == "*", st
        assert set(st["Action"]) == {"s3:PutObject", "s3:DeleteObject"}, st
        allowed = _as_list(st["Condition"]["ArnNotEquals"]["aws:PrincipalArn"])
        guarded[st["Resource"]] = {arn.rsplit("/", 1)[1] for arn in allowed}
    assert guarded == {
        f"{bucket}/runs/*": {"stm-ray-head", "stm-ray-worker", "stm-ray"},
        f"{bucket}/mlflow/*": {"stm-mlflow"},
    }, guarded
    assert "put-bucket-policy" in CLUSTER_README.read_text()
    trust = json.loads((AWS_POLICIES / "ec2-trust-policy.json").read_text())
    assert trust["Statement"] == [
        {
            "Effect": "Allow",
            "Principal": {"Service": "ec2.amazonaws.com"},
            "Action": "sts:AssumeRole",
        }
    ]


# --- KubeRay -----------------------------------------------------------------------------------
def test_kuberay_manifests_parse_and_name_the_same_image():
    import ray

    images = set()
    for path in sorted(KUBERAY.glob("*.yaml")):
        for doc in _yaml_docs(path):  # every document parses and is a Kubernetes object
            assert {"apiVersion", "kind", "metadata"} <= set(doc), path.name
    for name, spec in _cluster_specs().items():
        assert spec["rayVersion"] == ray.__version__, name
        for _group, pod in _pod_templates(spec):
            for container in pod["containers"]:
                images.add(container["image"])
                assert container["envFrom"][0] == {"configMapRef": {"name": "stm-env"}}
    mlflow = _kind(KUBERAY / "mlflow.yaml", "Deployment")["spec"]["template"]["spec"]
    images.update(c["image"] for c in mlflow["containers"])
    assert images == {_launcher_image()}, f"one image everywhere, got {images}"
    common = _kind(KUBERAY / "common.yaml", "ConfigMap")
    assert common["metadata"]["name"] == "stm-env"
    assert common["data"]["MLFLOW_TRACKING_URI"].startswith("http")


def _service_accounts() -> dict[str, dict]:
    return {
        d["metadata"]["name"]: d
        for path in sorted(KUBERAY.glob("*.yaml"))
        for d in _yaml_docs(path)
        if d["kind"] == "ServiceAccount"
    }


def test_kuberay_head_workers_and_mlflow_have_service_accounts_of_their_own():
    accounts = _service_accounts()
    mlflow = _kind(KUBERAY / "mlflow.yaml", "Deployment")["spec"]["template"]["spec"]
    heads, workers = set(), set()
    for name, spec in _cluster_specs().items():
        pods = _pod_templates(spec)
        heads |= {pod["serviceAccountName"] for group, pod in pods if group == "head"}
        for group, pod in pods:
            if group != "head":
                workers.add(pod["serviceAccountName"])
                assert pod["automountServiceAccountToken"] is False, (name, group)
    assert heads == {"stm-ray-head"} and workers == {"stm-ray-worker"}, (heads, workers)
    assert mlflow["serviceAccountName"] == "stm-mlflow"
    assert mlflow["automountServiceAccountToken"] is False
    used = heads | workers | {mlflow["serviceAccountName"]}
    assert len(used) == 3 and used <= set(accounts), (used, set(accounts))
    # No API token for the workers' and MLflow's accounts either, whoever else uses them; each
    # has a cloud identity (IRSA placeholder) for its bucket access.
    for account in ("stm-ray-worker", "stm-mlflow"):
        assert accounts[account]["automountServiceAccountToken"] is False, account
    for account in used:
        assert accounts[account]["metadata"]["annotations"]["eks.amazonaws.com/role-arn"], account
    assert (
        accounts["stm-mlflow"]["metadata"]["annotations"]
        != accounts["stm-ray-worker"]["metadata"]["annotations"]
    )
    # The autoscaler's RBAC: the operator binds its Role to the head pod's ServiceAccount
    # (enableInTreeAutoscaling), which no other pod uses; the head keeps its API token for the
    # sidecar. Any RBAC binding shipped here may name the head's account only.
    for name, spec in _cluster_specs().items():
        assert spec["enableInTreeAutoscaling"] is True, name
        head = spec["headGroupSpec"]["template"]["spec"]
        assert head.get("automountServiceAccountToken", True) is True, name
    for path in KUBERAY.glob("*.yaml"):
        for doc in _yaml_docs(path):
            if doc["kind"] in ("RoleBinding", "ClusterRoleBinding"):
                subjects = {s["name"] for s in doc.get("subjects", [])}
                assert subjects <= heads, (path.name, subjects)
            assert doc["kind"] != "ClusterRoleBinding", path.name


def test_every_image_is_pinned_by_digest():
    images = {"ray-cluster.yaml": [_launcher_image()]}
    for path in sorted(KUBERAY.glob("*.yaml")):
        found = re.findall(r"^\s*image:\s*(\S+)", path.read_text(), flags=re.M)
        images[path.name] = found
    assert all(images[n] for n in ("raycluster.yaml", "rayjob.yaml", "mlflow.yaml")), images
    base = re.findall(r"^ARG RAY_IMAGE=(\S+)$", DOCKERFILE.read_text(), flags=re.M)
    assert len(base) == 1 and base[0].startswith(BASE_IMAGE + "@"), base
    images["Dockerfile"] = base
    for where, refs in images.items():
        for ref in refs:
            assert PINNED_IMAGE.match(ref), f"{where}: {ref} is not name:tag@sha256:<digest>"
    assert not re.search(r"^FROM (?!\$\{RAY_IMAGE\})", DOCKERFILE.read_text(), flags=re.M)


def test_dockerfile_installs_exact_versions_from_the_lock():
    from packaging.requirements import Requirement
    from packaging.utils import canonicalize_name
    from packaging.version import Version

    dockerfile = DOCKERFILE.read_text().replace("\\\n", " ")
    installs = [
        line
        for line in dockerfile.splitlines()
        if not line.startswith("#") and re.search(r"pip install(?! .*--no-deps)", line)
    ]
    assert installs and all("-c cluster/requirements.lock" in line for line in installs), installs
    assert "COPY --chown=ray:users cluster/requirements.lock" in dockerfile
    ignore = (REPO / "cluster" / "Dockerfile.dockerignore").read_text().splitlines()
    assert "!cluster/requirements.lock" in ignore  # it is in the build context

    pins = {}
    for line in LOCK.read_text().splitlines():
        if not line.strip() or line.startswith("#"):
            continue
        assert re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*==[0-9][0-9A-Za-z.+!_-]*", line), line
        name, version = line.split("==")
        assert canonicalize_name(name) not in pins, f"{name} twice"
        pins[canonicalize_name(name)] = Version(version)
    # Every dependency of pyproject.toml and every extra the Dockerfile installs is locked, at a
    # version its specifier admits (so `pip install -c` can satisfy both).
    import tomllib

    deps = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]
    extra_pip = re.search(r'^ARG EXTRA_PIP="([^"]*)"', DOCKERFILE.read_text(), flags=re.M)
    for dep in [Requirement(d) for d in deps] + [
        Requirement(e) for e in extra_pip.group(1).split()
    ]:
        name = canonicalize_name(dep.name)
        assert name in pins, f"{dep.name} is not in {LOCK.name}"
        assert dep.specifier.contains(pins[name], prereleases=True), (str(dep), pins[name])


def test_kuberay_keeps_token_auth_on_and_exposes_nothing():
    for name, spec in _cluster_specs().items():
        assert spec["authOptions"] == {"mode": "token"}, name
        assert spec["enableInTreeAutoscaling"] is True, name
        assert spec["headGroupSpec"].get("serviceType", "ClusterIP") == "ClusterIP", name
        assert spec["headGroupSpec"]["rayStartParams"]["num-cpus"] == "0", name
        gpus = [
            pod["containers"][0]["resources"]["limits"].get("nvidia.com/gpu")
            for _, pod in _pod_templates(spec)
        ]
        assert "8" in gpus, f"{name}: an 8-GPU worker group"
    for path in KUBERAY.glob("*.yaml"):
        for doc in _yaml_docs(path):
            assert doc["kind"] not in ("Ingress", "Route", "Gateway"), path.name
            if doc["kind"] == "Service":
                assert doc["spec"].get("type", "ClusterIP") == "ClusterIP", path.name


def _load_job(name: str):
    spec = importlib.util.spec_from_file_location(f"_stm_job_{name}", REPO / "jobs" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


class _Parsed(Exception):
    def __init__(self, cfg):
        self.cfg = cfg


def _train_config(argv: list[str], monkeypatch):
    """The TrainConfig that jobs/train.py builds from ``argv`` (nothing runs)."""
    import stm.train.run

    def capture(cfg, *, resume=False, **kwargs):
        raise _Parsed(cfg)

    monkeypatch.setattr(stm.train.run, "run_training", capture)
    with pytest.raises(_Parsed) as parsed:
        _load_job("train").main(argv)
    return parsed.value.cfg


def test_rayjob_entrypoint_is_the_training_job(monkeypatch):
    job = _kind(KUBERAY / "rayjob.yaml", "RayJob")["spec"]
    argv = shlex.split(job["entrypoint"])
    assert argv[0] == "python"
    script = argv[1]
    assert script.startswith(IMAGE_PROJECT_DIR + "/"), "the image's copy of the jobs"
    assert script.removeprefix(IMAGE_PROJECT_DIR + "/") == "jobs/train.py"
    assert f"WORKDIR {IMAGE_PROJECT_DIR}" in DOCKERFILE.read_text()
    cfg = _train_config(argv[2:], monkeypatch)
    assert cfg.data.startswith(("s3://", "gs://")) and cfg.storage_path.startswith(
        ("s3://", "gs://")
    )
    gpu_group = next(
        g for g in job["rayClusterSpec"]["workerGroupSpecs"] if g["groupName"] == "gpu"
    )
    limits = gpu_group["template"]["spec"]["containers"][0]["resources"]["limits"]
    gpus = gpu_group["minReplicas"] * int(limits["nvidia.com/gpu"])
    assert cfg.gpus_per_worker == 1 and cfg.num_workers == gpus
    assert cfg.num_workers * cfg.cpus_per_worker <= gpu_group["minReplicas"] * int(limits["cpu"])
    assert job["shutdownAfterJobFinishes"] is True


def _readme_commands(text: str) -> list[tuple[str, list[str]]]:
    """(job, args) for every `python jobs/<job>.py ...` line of the README's code blocks."""
    blocks = re.findall(r"```(?:bash|sh)?\n(.*?)```", text, flags=re.S)
    commands = []
    for block in blocks:
        for line in block.replace("\\\n", " ").splitlines():
            line = line.split(" #", 1)[0]
            m = re.search(r"python (?:\S*/)?jobs/(\w+)\.py(.*)", line)
            if m:
                commands.append((m.group(1), shlex.split(m.group(2))))
    return commands


def test_cluster_readme_commands_are_the_projects_jobs(monkeypatch):
    commands = _readme_commands(CLUSTER_README.read_text())
    jobs = {job for job, _ in commands}
    assert {"preprocess", "train", "sweep"} <= jobs, jobs
    preprocess = _load_job("preprocess")
    sweep_help = ""
    if (REPO / "jobs" / "sweep.py").is_file():
        proc = subprocess.run(
            [sys.executable, "jobs/sweep.py", "--help"], cwd=REPO, capture_output=True, text=True
        )
        sweep_help = proc.stdout if proc.returncode == 0 else ""
    for job, args in commands:
        assert (REPO / "jobs" / f"{job}.py").is_file() or job == "sweep", job
        if job == "sweep" and sweep_help:  # its flags exist
            for flag in (a.split("=")[0] for a in args if a.startswith("--")):
                assert re.search(rf"{re.escape(flag)}\b", sweep_help), f"jobs/sweep.py {flag}"
        if job == "preprocess":
            cfg = preprocess.parse_args(args)
            assert cfg.out.startswith(("s3://", "gs://")), args
        elif job == "train" and "--help" not in args:
            cfg = _train_config(args, monkeypatch)
            assert cfg.data.startswith(("s3://", "gs://")), args
            assert cfg.storage_path.startswith(("s3://", "gs://")), args


def test_readme_links_the_cluster_guide():
    readme = (REPO / "README.md").read_text()
    section = readme.split("## Scaling out", 1)
    assert len(section) == 2, "README.md needs a 'Scaling out' section"
    assert "cluster/README.md" in section[1].split("\n## ", 1)[0]


# --- a real two-node cluster on this machine -----------------------------------------------------
@dataclasses.dataclass
class TwoNodes:
    env: dict[str, str]
    dashboard: str  # http://127.0.0.1:PORT, the job API
    gcs: str
    head_id: str
    b_id: str
    ray: str  # the ray CLI


def _free_ports(n: int) -> list[int]:
    socks = []
    try:
        for _ in range(n):
            s = socket.socket()
            s.bind(("", 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def _marked_pids(marker: str) -> list[int]:
    """Processes whose environment holds ``marker`` (every process of the test cluster)."""
    needle = marker.encode()
    pids = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == os.getpid():
            continue
        try:
            with open(f"/proc/{entry}/environ", "rb") as f:
                if needle in f.read().split(b"\0"):
                    pids.append(int(entry))
        except OSError:  # gone, or not ours
            continue
    return pids


def _stop_marked(marker: str, grace_s: float = 15.0) -> list[int]:
    """SIGTERM the marked processes, SIGKILL what is left after ``grace_s``; returns survivors."""
    for sig, wait in ((signal.SIGTERM, grace_s), (signal.SIGKILL, 5.0)):
        for pid in _marked_pids(marker):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, sig)
        deadline = time.monotonic() + wait
        while _marked_pids(marker) and time.monotonic() < deadline:
            time.sleep(0.2)
    return _marked_pids(marker)


def _log_tails(temp_dir: str, chars: int = 1500) -> str:
    """The ends of a node's main logs (for a start that failed)."""
    texts = []
    for path in sorted(Path(temp_dir).glob("session_*/logs/*")):
        if path.name.split(".")[0] in ("raylet", "gcs_server") and path.is_file():
            texts.append(f"--- {path.name}:\n{path.read_text(errors='replace')[-chars:]}")
    return "\n".join(texts) or "(no logs)"


def _run(cmd: list[str], env: dict, timeout: float, cwd: Path = REPO):
    return subprocess.run(
        cmd, env=env, cwd=cwd, capture_output=True, text=True, timeout=timeout, check=False
    )


def _check(proc: subprocess.CompletedProcess, what: str) -> str:
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, f"{what} failed ({proc.returncode}):\n{out[-6000:]}"
    return out


def _state(cluster: TwoNodes, *args: str) -> list[dict]:
    """``ray list ... --format json`` against the test cluster."""
    proc = _run(
        [
            cluster.ray,
            "list",
            *args,
            "--detail",
            "--format",
            "json",
            "--address",
            cluster.dashboard,
        ],
        cluster.env,
        timeout=60,
    )
    _check(proc, f"ray list {' '.join(args)}")
    return json.loads(proc.stdout)


@pytest.fixture(scope="module")
def two_nodes():
    """A head node and a second node, 3 CPUs each (one 2-CPU train worker fits per node)."""
    if not sys.platform.startswith("linux"):
        pytest.skip("stops its processes through /proc (Linux)")
    from ray._private.services import get_node_ip_address
    from ray._private.utils import get_dashboard_dependency_error

    if get_dashboard_dependency_error() is not None:
        pytest.skip(
            "ray job submit needs the dashboard: install ray[default] "
            f"({get_dashboard_dependency_error()})"
        )
    marker = f"STM_TEST_CLUSTER={uuid.uuid4().hex}"
    bin_dir = str(Path(sys.executable).parent)
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_AUTH_TOKEN_PATH")}
    env.update(
        PATH=f"{bin_dir}{os.pathsep}{env.get('PATH', '')}",
        STM_HOME=tempfile.mkdtemp(prefix="stm-cluster-home-"),  # the jobs' default results home
        RAY_AUTH_MODE="token",
        RAY_AUTH_TOKEN=secrets.token_hex(32),
        RAY_USAGE_STATS_ENABLED="0",
        PYTHONUNBUFFERED="1",
    )
    env.update([marker.split("=")])
    ray = str(Path(bin_dir) / "ray")
    ip = get_node_ip_address()
    common = ["--num-gpus=0", "--object-store-memory=200000000", "--disable-usage-stats"]
    temp_dirs: list[str] = []

    def start_node(args: list[str], attempts: int = 3) -> list[int]:
        """``ray start ARGS`` with free ports and a temp dir of its own; retried, because on a
        loaded machine a raylet can miss Ray's fixed 30 s registration deadline. Returns the
        ports it used (the first two: GCS and dashboard, used by the head)."""
        for attempt in range(1, attempts + 1):
            node_marker = f"STM_TEST_NODE={uuid.uuid4().hex}"
            # Short temp dirs: Ray's unix sockets live under them (path length limit).
            temp = tempfile.mkdtemp(prefix="stm-ray-", dir="/tmp")
            temp_dirs.append(temp)
            p = _free_ports(8)
            cmd = [
                ray, "start", *[a.format(gcs=p[0], dashboard=p[1]) for a in args],
                f"--dashboard-agent-listen-port={p[2]}", f"--dashboard-agent-grpc-port={p[3]}",
                f"--runtime-env-agent-port={p[4]}", f"--metrics-export-port={p[5]}",
                f"--node-manager-port={p[6]}", f"--object-manager-port={p[7]}",
                f"--temp-dir={temp}", *common,
            ]  # fmt: skip
            proc = _run(cmd, dict(env, **dict([node_marker.split("=")])), timeout=180)
            if proc.returncode == 0:
                return p
            logs = _log_tails(temp)
            _stop_marked(node_marker)
            if attempt == attempts:
                _check(proc, f"{' '.join(cmd[:3])} (attempt {attempt}), logs:\n{logs}")
        raise AssertionError("unreachable")

    try:
        ports = start_node(
            ["--head", "--port={gcs}", "--include-dashboard=true", "--dashboard-host=127.0.0.1",
             "--dashboard-port={dashboard}", "--num-cpus=3", '--resources={{"head_node": 1}}']
        )  # fmt: skip
        gcs = f"{ip}:{ports[0]}"
        start_node([f"--address={gcs}", "--num-cpus=3", '--resources={{"node_b": 1}}'])
        cluster = TwoNodes(env, f"http://127.0.0.1:{ports[1]}", gcs, "", "", ray)
        deadline = time.monotonic() + 60
        while True:
            nodes = [n for n in _state(cluster, "nodes") if n["state"] == "ALIVE"]
            ids = {
                key: n["node_id"]
                for n in nodes
                for key in ("head_node", "node_b")
                if key in n["resources_total"]
            }
            if len(ids) == 2 or time.monotonic() > deadline:
                break
            time.sleep(1)
        assert len(nodes) == 2 and len(ids) == 2, f"two alive nodes expected: {nodes}"
        cluster.head_id, cluster.b_id = ids["head_node"], ids["node_b"]
        yield cluster
    finally:
        survivors = _stop_marked(marker)
        for d in temp_dirs:
            shutil.rmtree(d, ignore_errors=True)
        assert not survivors, f"test cluster processes survived SIGKILL: {survivors}"


def _submit(cluster: TwoNodes, job_id: str, entrypoint_resources: dict, args: list[str], timeout):
    """``ray job submit --working-dir . -- python ARGS`` from the repository root; its output."""
    cmd = [
        cluster.ray, "job", "submit", "--address", cluster.dashboard,
        "--submission-id", job_id, "--working-dir", ".",
        "--entrypoint-resources", json.dumps(entrypoint_resources),
        "--", "python", *args,
    ]  # fmt: skip
    try:
        proc = _run(cmd, cluster.env, timeout=timeout)
    except subprocess.TimeoutExpired as err:
        _run([cluster.ray, "job", "stop", "--address", cluster.dashboard, job_id], cluster.env, 60)
        raise AssertionError(f"job {job_id} ran past {timeout} s:\n{err.stdout}") from None
    _check(proc, f"job {job_id}")
    status = _run(
        [cluster.ray, "job", "status", "--address", cluster.dashboard, job_id], cluster.env, 60
    )
    assert "succeeded" in _check(status, "ray job status").lower(), status.stdout
    # The driver's whole output, from its log file (more reliable than the live tail).
    logs = _run(
        [cluster.ray, "job", "logs", "--address", cluster.dashboard, job_id], cluster.env, 60
    )
    return _check(logs, "ray job logs")


def _driver_node(cluster: TwoNodes, job_id: str) -> str:
    jobs = [j for j in _state(cluster, "jobs") if j.get("submission_id") == job_id]
    assert len(jobs) == 1, jobs
    return jobs[0]["driver_node_id"]


def _actor_nodes(cluster: TwoNodes, job_id: str, class_part: str) -> list[str]:
    """The node ids of the job's actors whose class name contains ``class_part``."""
    driver_jobs = [j for j in _state(cluster, "jobs") if j.get("submission_id") == job_id]
    ray_job_id = driver_jobs[0]["job_id"]
    actors = _state(cluster, "actors", "--limit", "1000")
    return [
        a["node_id"]
        for a in actors
        if class_part in a["class_name"] and a.get("job_id") == ray_job_id
    ]


@pytest.mark.slow
def test_auth_is_enforced(two_nodes):
    env = dict(two_nodes.env, RAY_AUTH_TOKEN="not-the-token")
    proc = _run([two_nodes.ray, "job", "list", "--address", two_nodes.dashboard], env, timeout=60)
    assert proc.returncode != 0
    assert re.search(r"(?i)unauthori[sz]ed|authentication|401|403", proc.stdout + proc.stderr)


@pytest.fixture(scope="module")
def preprocessed(two_nodes, tmp_path_factory):
    """jobs/preprocess.py submitted as a job (driver on the head): 30 synthetic videos (24 train,
    6 test), DIS flow."""
    out = tmp_path_factory.mktemp("cluster") / "synthetic"
    job_id = f"stm-preprocess-{uuid.uuid4().hex[:8]}"
    args = [
        "jobs/preprocess.py", "--source", "synthetic", "--out", str(out), "--flow", "dis",
        "--num-videos", "30", "--workers", "4", "--videos-per-shard", "4",
    ]  # fmt: skip
    started = time.monotonic()
    log = _submit(two_nodes, job_id, {"head_node": 1}, args, timeout=300)
    return out, job_id, log, time.monotonic() - started


@pytest.mark.slow
def test_preprocess_job_on_two_nodes(two_nodes, preprocessed):
    out, job_id, log, seconds = preprocessed
    assert "preprocess: videos ok 30, failed 0 of 30" in log, log[-3000:]
    assert len(list((out / "shards").glob("*.parquet"))) == 8  # groups of 4 videos
    assert json.loads((out / "classes.json").read_text())
    assert _driver_node(two_nodes, job_id) == two_nodes.head_id
    # 4 flow actors of 1 CPU on nodes of 3 CPUs: both nodes did flow.
    nodes = _actor_nodes(two_nodes, job_id, "MapWorker")
    assert len(nodes) == 4 and set(nodes) == {two_nodes.head_id, two_nodes.b_id}, nodes
    print(f"preprocess job: {seconds:.0f} s")


@pytest.mark.slow
def test_train_job_runs_on_both_nodes_into_the_home_and_predict_uses_its_best_model(
    two_nodes, preprocessed, tmp_path
):
    """The user's path: ``ray job submit --working-dir . -- python jobs/train.py`` with no
    storage or MLflow flags; then, from another directory, the README's browse store holds the
    run and ``jobs/predict.py VIDEO`` with no model argument uses the best registered version."""
    from mlflow.tracking import MlflowClient

    data = preprocessed[0]
    home = Path(two_nodes.env["STM_HOME"])
    store = f"sqlite:///{home / 'mlflow.db'}"  # the README's sqlite:///$HOME/stm_results/mlflow.db
    job_id = f"stm-train-{uuid.uuid4().hex[:8]}"
    # 2 CPUs per worker on nodes of 3 CPUs: one worker fits per node, so the two are on different
    # nodes, and each node keeps a CPU for the input pipeline. The driver runs on the head, as on
    # a real cluster (Ray 2.60's `ray job logs` reads the head's log file: a driver placed on
    # another node with --entrypoint-resources runs, but its output is not shown there).
    args = [
        "jobs/train.py", "--data", str(data), "--init", "scratch", "--epochs", "1",
        "--batch-size", "8", "--bn-batch", "4", "--crop-size", "64", "--num-chunks", "3",
        "--stride-min", "2", "--stride-max", "6", "--test-frames", "5",
        "--appearance-arch", "resnet18", "--motion-arch", "resnet18", "--num-workers", "2",
        "--cpus-per-worker", "2", "--max-failures", "0", "--name", "two-nodes",
    ]  # fmt: skip
    started = time.monotonic()
    log = _submit(two_nodes, job_id, {"head_node": 1}, args, timeout=600)
    seconds = time.monotonic() - started
    assert "test video accuracy:" in log, log[-3000:]
    assert (
        f"MLflow store: {store}" in log and f"browse: mlflow ui --backend-store-uri {store}" in log
    )

    assert _driver_node(two_nodes, job_id) == two_nodes.head_id
    nodes = _actor_nodes(two_nodes, job_id, "RayTrainWorker")
    assert sorted(nodes) == sorted([two_nodes.head_id, two_nodes.b_id]), nodes

    # the home holds everything, not the job's temporary copy of the working directory
    run_id = re.search(r"^run two-nodes \((\w+)\)", log, flags=re.M).group(1)
    client = MlflowClient(tracking_uri=store)
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED"
    assert any(k.startswith("test_video_acc") for k in run.data.metrics), run.data.metrics
    assert list((home / "runs" / "two-nodes").glob("checkpoint_*")), "no checkpoint in the home"
    assert "_ray_pkg_" not in run.info.artifact_uri and str(home) in run.info.artifact_uri
    (version,) = client.search_model_versions("name = 'stm'")
    assert version.run_id == run_id and f"registered: stm version {version.version}" in log

    other = tmp_path / "elsewhere"
    other.mkdir()
    video = next((data / "videos").rglob("*.avi"))
    env = {k: v for k, v in two_nodes.env.items() if not k.startswith("RAY_")}
    proc = _run([sys.executable, str(REPO / "jobs" / "predict.py"), str(video)], env, 300, other)
    out = _check(proc, "jobs/predict.py with no model argument")
    assert f"stm version {version.version} (run {run_id})" in out.splitlines()[0], out
    assert len([ln for ln in proc.stdout.splitlines() if re.match(r"^ ?\d\. ", ln)]) == 5
    assert not list(other.iterdir()), "predict wrote into the working directory"
    print(f"train job: {seconds:.0f} s")


@pytest.mark.slow
def test_gpus_the_cluster_cannot_give_are_one_line_not_a_wait(two_nodes, preprocessed):
    """Two CPU nodes and no autoscaler: a run asking for GPUs fails at once with one line."""
    job_id = f"stm-gpus-{uuid.uuid4().hex[:8]}"
    args = [
        "jobs/train.py", "--data", str(preprocessed[0]), "--init", "scratch",
        "--gpus-per-worker", "1", "--num-workers", "2", "--name", "no-gpus",
    ]  # fmt: skip
    cmd = [
        two_nodes.ray, "job", "submit", "--address", two_nodes.dashboard,
        "--submission-id", job_id, "--working-dir", ".",
        "--entrypoint-resources", json.dumps({"head_node": 1}), "--", "python", *args,
    ]  # fmt: skip
    proc = _run(cmd, two_nodes.env, timeout=300)
    assert proc.returncode != 0
    logs = _run(
        [two_nodes.ray, "job", "logs", "--address", two_nodes.dashboard, job_id], two_nodes.env, 60
    )
    lines = [ln for ln in logs.stdout.splitlines() if ln.startswith("train.py: error")]
    assert len(lines) == 1, logs.stdout[-3000:]
    assert "need 2 GPUs; this cluster of 2 nodes has 0 and no autoscaler to add more" in lines[0]


def test_only_the_ray_pods_may_reach_mlflow():
    policy = _kind(KUBERAY / "mlflow.yaml", "NetworkPolicy")["spec"]
    server = _kind(KUBERAY / "mlflow.yaml", "Deployment")["spec"]["template"]["metadata"]
    assert policy["podSelector"]["matchLabels"].items() <= server["labels"].items()
    assert policy["policyTypes"] == ["Ingress"]
    (rule,) = policy["ingress"]
    (peer,) = rule["from"]
    assert set(peer) == {"podSelector"}  # pods of this namespace only, no ipBlock
    allowed = peer["podSelector"]["matchLabels"]
    assert rule["ports"] == [{"protocol": "TCP", "port": 5000}]
    for name, spec in _cluster_specs().items():  # every Ray pod carries the allowed label
        groups = [spec["headGroupSpec"], *spec.get("workerGroupSpecs", [])]
        for group in groups:
            labels = group["template"]["metadata"]["labels"]
            assert allowed.items() <= labels.items(), name
