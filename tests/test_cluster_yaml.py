"""cluster.yaml is a valid Ray cluster-launcher file for AWS, checked offline with Ray's own validation
(``prepare_config`` fills the AWS defaults exactly as ``ray up`` does, then ``validate_config`` checks
the schema), and it has the node roles and setup the README promises."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from ray.autoscaler._private.util import prepare_config, validate_config

CLUSTER_YAML = Path(__file__).resolve().parents[1] / "cluster.yaml"


@pytest.fixture(scope="module")
def config() -> dict:
    return yaml.safe_load(CLUSTER_YAML.read_text())


def test_ray_validates_the_prepared_config(config: dict) -> None:
    prepared = prepare_config(config)
    validate_config(prepared)
    assert prepared["provider"]["type"] == "aws"


def test_validation_would_catch_a_broken_file(config: dict) -> None:
    broken = {
        **config,
        "available_node_types": {**config["available_node_types"], "bad": {"node_config": {}}},
    }
    with pytest.raises(Exception, match="'resources' is a required property"):
        validate_config(prepare_config(broken))


def test_node_roles_cpu_head_cpu_decode_and_gpu_workers(config: dict) -> None:
    types = config["available_node_types"]
    assert config["head_node_type"] == "head" and types["head"]["resources"] == {"CPU": 0}
    instance = {name: t["node_config"]["InstanceType"] for name, t in types.items()}
    assert instance["cpu_decode"].startswith(("c", "m")) and instance["gpu_model"].startswith(("g", "p"))
    assert types["gpu_model"]["min_workers"] >= 1


def test_every_node_installs_the_project_and_starts_ray_from_its_venv(config: dict) -> None:
    assert config["file_mounts"] == {"~/std-video-annotate": "."}
    assert any("scripts/setup.sh" in command for command in config["setup_commands"])
    for key in ("head_start_ray_commands", "worker_start_ray_commands"):
        start = config[key][-1]
        assert 'PATH="$HOME/std-video-annotate/.venv/bin:$PATH"' in start and "ray start" in start
