"""The training registry agrees with the config contract, and importing the contract stays cheap."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import training
from training import spec
from training.data import load_split
from training.datasets import DATASETS, get_dataset
from training.models import MODELS, build_model, get_model
from training.partitions import PARTITIONS, get_partition

ROOT = Path(__file__).resolve().parents[2]


def test_spec_names_equal_registry_names() -> None:
    assert set(spec.MODELS) == set(MODELS)
    assert set(spec.DATASETS) == set(DATASETS)
    assert set(spec.PARTITIONS) == set(PARTITIONS)


@pytest.mark.parametrize("dataset", sorted(DATASETS))
def test_spec_train_sizes_match_the_split(dataset: str) -> None:
    for seed in (0, 1, 12345):
        train, test = load_split(dataset, seed)
        assert len(train) == spec.TRAIN_SIZES[dataset]
        assert len(test) > 0
    assert set(spec.TRAIN_SIZES) == set(DATASETS)


def test_normalize_refuses_more_shards_than_training_examples() -> None:
    size = spec.TRAIN_SIZES["synthetic"]
    ok = spec.normalize_federated_config(
        {"dataset": "synthetic", "num_shards": size}, default_batch_size=32, default_epochs=1
    )
    assert ok["num_shards"] == size
    with pytest.raises(spec.SpecError, match="num_shards"):
        spec.normalize_federated_config(
            {"dataset": "synthetic", "num_shards": size + 1}, default_batch_size=32, default_epochs=1
        )


def test_normalize_still_fills_defaults() -> None:
    config = spec.normalize_federated_config({}, default_batch_size=16, default_epochs=2)
    assert config["model"] == "mlp"
    assert config["dataset"] == "digits"
    assert config["batch_size"] == 16
    assert config["local_epochs"] == 2
    with pytest.raises(spec.SpecError, match=r"config\.model"):
        spec.normalize_federated_config({"model": "resnet"}, default_batch_size=16, default_epochs=2)


@pytest.mark.parametrize("module", ["training.spec", "training", "training.datasets", "training.data"])
def test_importing_without_torch(module: str) -> None:
    code = f"import sys, {module}; print('torch' in sys.modules)"
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True, timeout=120
    )
    assert out.stdout.strip() == "False", out.stdout + out.stderr


def test_lazy_reexports_resolve() -> None:
    assert training.build_model is build_model
    assert callable(training.train_local)
    assert callable(training.state_to_bytes)
    with pytest.raises(AttributeError):
        _ = training.no_such_name


@pytest.mark.parametrize("model_name", sorted(MODELS))
@pytest.mark.parametrize("dataset", sorted(DATASETS))
def test_models_hold_only_float32_parameters(model_name: str, dataset: str) -> None:
    model = build_model({"model": model_name, "dataset": dataset, "seed": 3})
    state = model.state_dict()
    assert state, "a model without parameters"
    assert all(t.dtype == torch.float32 for t in state.values())
    assert not list(model.buffers()), "buffers are not averaged sensibly; use parameters only"
    assert set(state) == {name for name, _ in model.named_parameters()}
    info = get_dataset(dataset)
    out = model(torch.zeros(5, *info.input_shape))
    assert out.shape == (5, info.num_classes)


@pytest.mark.parametrize("model_name", sorted(MODELS))
def test_build_model_is_deterministic_per_seed(model_name: str) -> None:
    first = build_model({"model": model_name, "seed": 7}).state_dict()
    again = build_model({"model": model_name, "seed": 7}).state_dict()
    other = build_model({"model": model_name, "seed": 8}).state_dict()
    assert all(torch.equal(first[k], again[k]) for k in first)
    assert any(not torch.equal(first[k], other[k]) for k in first)


def test_build_model_leaves_the_global_rng_alone() -> None:
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    build_model({"seed": 5})
    assert torch.equal(torch.rand(3), expected)


def test_unknown_names_raise_clear_errors() -> None:
    with pytest.raises(ValueError, match="unknown model 'resnet'"):
        get_model("resnet")
    with pytest.raises(ValueError, match="unknown dataset 'mnist'"):
        get_dataset("mnist")
    with pytest.raises(ValueError, match="unknown partition 'pathological'"):
        get_partition("pathological")


@pytest.mark.parametrize("dataset", sorted(DATASETS))
def test_datasets_have_the_declared_shape(dataset: str) -> None:
    info = get_dataset(dataset)
    x, y = info.load()
    assert x.dtype.name == "float32"
    assert y.dtype.name == "int64"
    assert x.shape == (len(y), *info.input_shape)
    assert set(y.tolist()) == set(range(info.num_classes))
    assert float(x.min()) >= 0.0
    assert float(x.max()) <= 1.0


def test_digits_is_the_bundled_scikit_learn_set() -> None:
    from sklearn.datasets import load_digits

    x, y = get_dataset("digits").load()
    assert x.shape == (1797, 1, 8, 8)
    assert len(set(y.tolist())) == 10
    reference = load_digits()  # read without scikit-learn, the same arrays bit for bit
    assert np.array_equal(x, (reference.data.astype(np.float32) / 16.0).reshape(-1, 1, 8, 8))
    assert np.array_equal(y, reference.target.astype(np.int64))


def test_loading_the_digits_does_not_import_scikit_learn() -> None:
    code = "import sys\nfrom training.datasets import digits\ndigits.load()\nprint('sklearn' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
