"""Saving and loading models: the format, any backend, and clear errors for bad files."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

import numpy as np
import pytest

from gpunn.backend import get_backend
from gpunn.errors import ModelError
from gpunn.files import OutputError, atomic_write
from gpunn.model import FORMAT_VERSION, Model, load_model, save_model
from gpunn.nn import Architecture, Layer, init_params
from gpunn.train import SETTINGS_ADDED_LATER, TrainConfig

from hostile import checkpoint_bytes, model_corpus, model_variants_that_load, resume_corpus


def make_model(backend, sizes=(784, 16, 10), dtype="float32"):
    arch = Architecture(sizes, "tanh")
    params = [Layer(backend.asarray(W), backend.asarray(b)) for W, b in init_params(arch, init="xavier", seed=1, dtype=dtype)]
    return Model(arch, params, dtype, info={"epochs": 3})


def test_round_trip_on_every_backend(tmp_path, cpu, backend):
    """A model saved from the CPU loads on each backend with the same weights and metadata, and back again."""
    path = tmp_path / "model.npz"
    model = make_model(cpu, dtype="float64")
    save_model(path, model, cpu)
    loaded = load_model(path, backend)
    assert loaded.arch == model.arch and loaded.dtype == "float64" and loaded.info == {"epochs": 3}
    for (W, b), (W2, b2) in zip(model.params, loaded.params):
        np.testing.assert_array_equal(backend.to_numpy(W2), W)
        np.testing.assert_array_equal(backend.to_numpy(b2), b)
    save_model(tmp_path / "again.npz", loaded, backend)
    again = np.load(tmp_path / "again.npz", allow_pickle=False)
    np.testing.assert_array_equal(again["W2"], model.params[1].W)


def test_file_layout_is_plain_arrays_and_json(tmp_path, cpu):
    path = tmp_path / "model.npz"
    save_model(path, make_model(cpu), cpu)
    with np.load(path, allow_pickle=False) as npz:
        assert sorted(npz.files) == ["W1", "W2", "b1", "b2", "meta"]
        meta = json.loads(str(npz["meta"]))
    assert meta["format"] == "gpunn-model" and meta["format_version"] == FORMAT_VERSION
    assert meta["layer_sizes"] == [784, 16, 10] and meta["activation"] == "tanh" and meta["dtype"] == "float32"
    assert meta["preprocessing"] == "scale"


def write_npz(path, **arrays):
    with open(path, "wb") as handle:
        np.savez(handle, **arrays)
    return path


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda p: p, "does not exist"),
        (lambda p: (p.write_bytes(b"not a zip file"), p)[1], "is not a gpunn model file"),
        (lambda p: (p.write_bytes(b""), p)[1], "is not a gpunn model file"),
        (lambda p: write_npz(p, W1=np.zeros((2, 2))), "'meta' entry is missing"),
        (lambda p: write_npz(p, meta=np.asarray(json.dumps({"format": "other"}))), "format 'other'"),
        (lambda p: write_npz(p, meta=np.asarray(json.dumps({"format": "gpunn-model", "format_version": 99}))),
         "format version 99"),
    ],
)
def test_bad_model_files(tmp_path, cpu, make, message):
    path = make(tmp_path / "model.npz")
    with pytest.raises(ModelError, match=message):
        load_model(path, cpu)


def test_weights_that_do_not_fit_the_layer_sizes(tmp_path, cpu):
    path = tmp_path / "model.npz"
    save_model(path, make_model(cpu), cpu)
    with np.load(path) as npz:
        arrays = dict(npz)
    arrays["W2"] = np.zeros((10, 15), np.float32)
    write_npz(path, **arrays)
    with pytest.raises(ModelError, match=r"damaged gpunn model file: W2 \(10, 15\)"):
        load_model(path, cpu)


def test_atomic_write_leaves_nothing_when_the_writer_fails(tmp_path):
    target = tmp_path / "out.bin"
    with pytest.raises(RuntimeError), atomic_write(target) as handle:
        handle.write(b"half")
        raise RuntimeError("crash in the middle")
    assert list(tmp_path.iterdir()) == []
    with atomic_write(target) as handle:
        handle.write(b"whole")
    assert target.read_bytes() == b"whole" and list(tmp_path.iterdir()) == [target]


def test_atomic_write_into_a_missing_directory(tmp_path):
    with pytest.raises(OutputError, match="cannot write"), atomic_write(tmp_path / "no" / "file"):
        pass


# --- the file validated as a schema: the hostile corpus (tests/hostile.py) ------------------------------------------


def _checkpoint_at_collection() -> bytes:
    # built when the module is collected: the corpus' cases are test parameters
    with tempfile.TemporaryDirectory() as folder:
        return checkpoint_bytes(Path(folder), get_backend("cpu"))


CHECKPOINT = _checkpoint_at_collection()
MODEL_CASES = model_corpus(CHECKPOINT)
RESUME_CASES = resume_corpus(CHECKPOINT)


@pytest.fixture
def checkpoint() -> bytes:
    return CHECKPOINT


def test_the_valid_checkpoint_loads_and_resumes(tmp_path, cpu, checkpoint):
    path = tmp_path / "checkpoint.npz"
    path.write_bytes(checkpoint)
    model = load_model(path, cpu)
    config, done = model.resume_state()
    assert done == 3 and config == TrainConfig(hidden=(6,), optimizer="adam", normalize="standardize",
                                               epochs=5).as_dict()
    assert sorted(model.optimizer_state) == ["s", "v"] and model.preprocessing.kind == "standardize"
    assert model.source == str(path)


def test_a_checkpoint_from_before_a_setting_existed_resumes_with_the_value_its_run_had(tmp_path, cpu, checkpoint):
    """gpunn before --precision wrote no precision: such a checkpoint computed its GEMMs in float32 and resumes so,
    where any other missing setting marks a damaged file (tests/hostile.py's "a setting missing")."""
    import io

    with np.load(io.BytesIO(checkpoint)) as npz:
        arrays = {key: npz[key] for key in npz.files}
    meta = json.loads(str(arrays["meta"]))
    assert set(SETTINGS_ADDED_LATER) <= set(meta["info"]["config"])  # written now: every setting is in the file
    for name in SETTINGS_ADDED_LATER:
        del meta["info"]["config"][name]
    path = tmp_path / "old.npz"
    np.savez(path, **{**arrays, "meta": np.asarray(json.dumps(meta))})
    config, done = load_model(path, cpu).resume_state()
    assert done == 3 and config == TrainConfig(hidden=(6,), optimizer="adam", normalize="standardize",
                                               epochs=5).as_dict() and config["precision"] == "float32"


@pytest.mark.parametrize("case", MODEL_CASES)
def test_hostile_model_files_raise_one_model_error_line(tmp_path, cpu, case):
    content, fragment = MODEL_CASES[case]
    path = tmp_path / "model.npz"
    path.write_bytes(content)
    with pytest.raises(ModelError) as caught:
        load_model(path, cpu)
    message = str(caught.value)
    assert fragment in message, message
    assert str(path) in message and len(message.splitlines()) == 1 and caught.value.exit_code == 2
    assert "pickled (object) data" not in message or "Python objects" in message


def test_unusual_but_valid_encodings_load_the_same_weights(tmp_path, cpu, checkpoint):
    (tmp_path / "reference.npz").write_bytes(checkpoint)
    reference = load_model(tmp_path / "reference.npz", cpu)
    for name, content in model_variants_that_load(checkpoint).items():
        path = tmp_path / "variant.npz"
        path.write_bytes(content)
        model = load_model(path, cpu)
        assert model.params[0].W.dtype == np.float32, name
        np.testing.assert_array_equal(model.params[0].W, reference.params[0].W, err_msg=name)
        assert model.resume_state() == reference.resume_state(), name


def test_a_model_path_that_is_not_a_file(tmp_path, cpu):
    os.mkfifo(tmp_path / "fifo")
    for name, message in [("fifo", "it is a named pipe"), (".", "it is a directory"), ("absent", "does not exist")]:
        with pytest.raises(ModelError, match=message):
            load_model(tmp_path / name, cpu)


def test_a_nan_model_is_refused_before_it_can_evaluate(tmp_path, cpu):
    model = make_model(cpu)
    model.params[0].W[0, :3] = np.nan
    save_model(tmp_path / "diverged.npz", model, cpu)
    with pytest.raises(ModelError, match="W1 holds 3 non-finite values .*came from a diverged run"):
        load_model(tmp_path / "diverged.npz", cpu)


@pytest.mark.parametrize("case", RESUME_CASES)
def test_a_damaged_resume_state_loads_for_prediction_but_cannot_resume(tmp_path, cpu, case):
    content, fragment = RESUME_CASES[case]
    path = tmp_path / "checkpoint.npz"
    path.write_bytes(content)
    model = load_model(path, cpu)  # the weights are fine: evaluate and predict may use them
    with pytest.raises(ModelError) as caught:
        model.resume_state()
    message = str(caught.value)
    assert fragment in message and str(path) in message and len(message.splitlines()) == 1, message


def test_a_model_made_in_this_process_without_training_state(cpu):
    with pytest.raises(ModelError, match="the model holds no training state to resume"):
        make_model(cpu).resume_state()


def test_a_file_that_names_the_preprocessing_scale_255_still_loads(tmp_path, cpu):
    """Files written before --normalize's name and the file's were one ("scale") say "scale-255"."""
    path = tmp_path / "m.npz"
    arch = Architecture((784, 4, 10))
    save_model(path, Model(arch, [Layer(W, b) for W, b in init_params(arch, init="he", seed=0)]), cpu)
    with np.load(path) as npz:
        arrays = dict(npz)
    meta = json.loads(str(arrays["meta"]))
    meta["preprocessing"] = "scale-255"
    arrays["meta"] = np.asarray(json.dumps(meta))
    np.savez(path, **arrays)
    assert load_model(path, cpu).preprocessing.kind == "scale"
