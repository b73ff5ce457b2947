"""Model locations: a local directory, an object-storage URI (copied once into the node cache), the
default; the pixel limit read from the processor config; and fail-fast checks of bad locations."""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import s3fs

from pipeline.errors import PipelineError
from pipeline.models import check_model, default_model_dir, load_model, pixel_limit, resolve_model
from pipeline.storage import StorageOptions


@pytest.fixture
def s3_model(model_dir: Path, s3_endpoint: str, s3_bucket: str) -> str:
    fs = s3fs.S3FileSystem(endpoint_url=s3_endpoint, skip_instance_cache=True)
    fs.put(str(model_dir) + "/", f"{s3_bucket}/models/tiny/", recursive=True)
    return f"s3://{s3_bucket}/models/tiny/"


def test_an_s3_model_is_copied_once_into_the_cache_and_loads(
    s3_model: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("STD_ANNOTATE_CACHE", str(tmp_path / "cache"))
    local = Path(resolve_model(s3_model, StorageOptions()))
    assert local.is_relative_to(tmp_path / "cache") and (local / "config.json").is_file()
    stamp = (local / "config.json").stat().st_mtime_ns
    assert resolve_model(s3_model, StorageOptions()) == str(local)  # second actor on the node: no copy
    assert (local / "config.json").stat().st_mtime_ns == stamp
    model, processor = load_model(str(local), "auto", "cpu")
    assert model.config.model_type == "qwen2_vl" and processor.tokenizer.padding_side == "left"


def test_pixel_limit_comes_from_the_processor_config(model_dir: Path, s3_model: str) -> None:
    from pipeline.demo.builders import MAX_PIXELS

    assert pixel_limit(str(model_dir), StorageOptions()) == MAX_PIXELS
    assert pixel_limit(s3_model, StorageOptions()) == MAX_PIXELS
    assert pixel_limit("Qwen/Qwen2-VL-7B-Instruct", StorageOptions()) == 28 * 28 * 768  # hub id: the default


def test_bad_model_locations_fail_fast(s3_bucket: str, tmp_path: Path) -> None:
    with pytest.raises(PipelineError, match="not a model directory"):
        check_model(str(tmp_path), StorageOptions())
    with pytest.raises(PipelineError, match="not a model directory"):
        check_model(f"s3://{s3_bucket}/models/none/", StorageOptions())


def test_a_typo_a_file_and_an_offline_hub_id_fail_before_any_actor(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    with pytest.raises(PipelineError, match="no such directory"):
        check_model("models/qwen2-vl", StorageOptions())  # a relative path that does not exist
    with pytest.raises(PipelineError, match="no such directory"):
        check_model("./qwen", StorageOptions())
    (tmp_path / "weights.bin").write_bytes(b"0")
    with pytest.raises(PipelineError, match="a file, not a model directory"):
        check_model("weights.bin", StorageOptions())
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))  # an empty hub cache
    with pytest.raises(
        PipelineError, match="no such directory.*not in the local Hugging Face cache .HF_HUB_OFFLINE is set"
    ):
        check_model("Qwen/Qwen2-VL-7B-Instruct", StorageOptions())


def test_an_incomplete_or_unsupported_directory_is_refused(
    model_dir: Path, tmp_path: Path, s3_model: str
) -> None:
    check_model(str(model_dir), StorageOptions())  # complete: passes, locally and on S3
    check_model(s3_model, StorageOptions())
    only_config = tmp_path / "only-config"
    only_config.mkdir()
    shutil.copy(model_dir / "config.json", only_config)
    with pytest.raises(PipelineError, match="has config.json but no weights"):
        check_model(str(only_config), StorageOptions())
    no_processor = tmp_path / "no-processor"
    shutil.copytree(model_dir, no_processor)
    for name in ("processor_config.json", "preprocessor_config.json", "video_preprocessor_config.json"):
        (no_processor / name).unlink(missing_ok=True)
    with pytest.raises(PipelineError, match="no processor config"):
        check_model(str(no_processor), StorageOptions())
    other = tmp_path / "llama"
    shutil.copytree(model_dir, other)
    config = json.loads((other / "config.json").read_text())
    (other / "config.json").write_text(json.dumps({**config, "model_type": "llama"}))
    with pytest.raises(PipelineError, match="model_type 'llama' is not one StD supports"):
        check_model(str(other), StorageOptions())


def test_the_default_models_label_names_its_weights_not_the_path_it_was_copied_to() -> None:
    """Under ``ray job submit`` the package runs from a temporary copy: the model column must still say
    which weights ran, the same on every machine, and the driver must not import torch to say it."""
    code = (
        "import sys, json\n"
        "from pipeline.models import model_label\n"
        "print(json.dumps([model_label(None), model_label('Qwen/Qwen2-VL-7B-Instruct'), 'torch' in sys.modules]))\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True
    )
    label, hub, torch_loaded = json.loads(proc.stdout.strip().splitlines()[-1])
    weights = default_model_dir() / "model.safetensors"
    assert label == f"pipeline/demo/model@sha256:{hashlib.sha256(weights.read_bytes()).hexdigest()[:16]}"
    assert hub == "Qwen/Qwen2-VL-7B-Instruct" and torch_loaded is False
