"""Checkpoints from elsewhere are data, not code: a detectron2 .pkl is read by an unpickler that rebuilds only NumPy
arrays, numbers and plain containers, a torchvision .pth by torch.load(weights_only=True), and an exported model's
weights by np.load(allow_pickle=False). Each hostile file here would create a marker file if it were unpickled."""

import collections
import os
import pathlib
import pickle
import re
import shlex
import subprocess
import sys

import numpy as np
import pytest

from maskrcnn_jax.convert.detectron2 import load_detectron2_pickle

REPO = pathlib.Path(__file__).resolve().parent.parent
SYSTEM_GLOBALS = (f"{os.system.__module__}.system", "os.system")  # pickle records posix.system on Linux


class _Reducer:
    """Pickles as the call `function(*args)`, which unpickling performs."""

    def __init__(self, function, *args):
        self.function, self.args = function, args

    def __reduce__(self):
        return self.function, self.args


def _touch(marker):
    return _Reducer(os.system, f"touch {shlex.quote(str(marker))}")


def _write_pickle(path, obj, protocol=pickle.DEFAULT_PROTOCOL):
    with open(path, "wb") as f:
        pickle.dump(obj, f, protocol=protocol)
    return str(path)


def _zoo_layout(hostile):
    weights = {"backbone.bottom_up.stem.conv1.weight": np.zeros((64, 3, 7, 7), np.float32), "evil": hostile}
    return {"model": weights, "__author__": "Detectron2 Model Zoo"}


@pytest.mark.parametrize("protocol", [2, 4])
def test_hostile_detectron2_pickle_is_refused(tmp_path, protocol):
    marker = tmp_path / "MARKER"
    path = _write_pickle(tmp_path / "model_final.pkl", _zoo_layout(_touch(marker)), protocol)
    with pytest.raises(pickle.UnpicklingError) as error:
        load_detectron2_pickle(path)
    message = str(error.value)
    assert any(name in message for name in SYSTEM_GLOBALS), message
    assert path in message and "run" in message
    assert isinstance(error.value, ValueError)
    assert not marker.exists()


def test_hostile_detectron2_pickle_is_refused_by_the_command_line(tmp_path):
    marker = tmp_path / "MARKER"
    path = _write_pickle(tmp_path / "model_final.pkl", _zoo_layout(_touch(marker)))
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
               JAX_PLATFORMS="cpu")
    result = subprocess.run(
        [sys.executable, "-m", "maskrcnn_jax.convert", "--from=detectron2", path, f"--out={tmp_path / 'workdir'}"],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 1
    assert any(name in result.stderr for name in SYSTEM_GLOBALS), result.stderr[-2000:]
    assert "Traceback" not in result.stderr and result.stderr.strip().splitlines()[-1].startswith("error: refusing")
    assert not marker.exists()
    assert not (tmp_path / "workdir").exists()


@pytest.mark.parametrize("protocol", [2, 4])
@pytest.mark.parametrize("function, args", [
    (eval, ("__import__('os').system('touch {marker}')",)),
    (exec, ("import os; os.system('touch {marker}')",)),
    (getattr, ("{marker}", "upper")),
    (__import__, ("os",)),
], ids=["eval", "exec", "getattr", "__import__"])
def test_smuggled_builtins_are_refused(tmp_path, protocol, function, args):
    marker = tmp_path / "MARKER"
    hostile = _Reducer(function, *(arg.format(marker=marker) for arg in args))
    path = _write_pickle(tmp_path / "model_final.pkl", _zoo_layout(hostile), protocol)
    with pytest.raises(pickle.UnpicklingError, match=rf"(__builtin__|builtins)\.{re.escape(function.__name__)}\b"):
        load_detectron2_pickle(path)
    assert not marker.exists()


def _python2_float32_pickle(name, values):
    """{name: float32 array} as Python 2's pickle (protocol 2) and NumPy 1 write it: str keys and the array's bytes as
    Python 2 str (SHORT_BINSTRING), NumPy under numpy.core.multiarray. Python 3 reads it only with encoding latin1."""
    def string(data):
        return b"U" + bytes([len(data)]) + data
    return (b"\x80\x02}" + string(name.encode()) + b"cnumpy.core.multiarray\n_reconstruct\ncnumpy\nndarray\nK\x00\x85"
            + string(b"b") + b"\x87R(K\x01" + bytes([0x4b, len(values)]) + b"\x85cnumpy\ndtype\n" + string(b"f4")
            + b"K\x00K\x01\x87R(K\x03" + string(b"<") + b"NNNJ\xff\xff\xff\xffJ\xff\xff\xff\xffK\x00tb\x89"
            + string(np.asarray(values, "<f4").tobytes()) + b"tbs.")


def test_python2_numpy1_pickle_still_loads(tmp_path):
    path = tmp_path / "R-50.pkl"
    path.write_bytes(_python2_float32_pickle("conv1_w", [1.0, -2.5, 3.0]))
    loaded = load_detectron2_pickle(str(path))
    assert list(loaded) == ["conv1_w"]
    np.testing.assert_array_equal(loaded["conv1_w"], np.array([1.0, -2.5, 3.0], np.float32))


@pytest.mark.parametrize("protocol", [2, 4, 5])
def test_arrays_numbers_and_containers_still_load(tmp_path, protocol, rng):
    from maskrcnn_jax.convert.detectron2 import load_array_pickle
    obj = {
        "model": collections.OrderedDict([
            ("a.weight", rng.standard_normal((4, 3, 2, 2)).astype(np.float32)),
            ("a.num_batches_tracked", np.arange(5, dtype=np.int64)),
            ("fortran", np.asfortranarray(rng.standard_normal((3, 4)))),
        ]),
        "__author__": "Detectron2 Model Zoo",
        "matching_heuristics": True,
        b"raw key": b"\x00\xff bytes",
        "nested": [(1, 2.5, None), [np.float32(1.5), np.int64(-3), np.float64(2.25)], {"x": (), "y": []}],
        "others": (frozenset({1, 2}), {3}, bytearray(b"ab"), complex(1, 2), range(3), slice(1, 5)),
    }
    path = _write_pickle(tmp_path / "model_final.pkl", obj, protocol)
    loaded = load_array_pickle(path)
    assert type(loaded["model"]) is collections.OrderedDict and list(loaded["model"]) == list(obj["model"])
    for key, array in obj["model"].items():
        assert loaded["model"][key].dtype == array.dtype
        np.testing.assert_array_equal(loaded["model"][key], array)
    scalars = loaded["nested"][1]
    assert [type(v) for v in scalars] == [np.float32, np.int64, np.float64] and scalars == obj["nested"][1]
    assert {k: v for k, v in loaded.items() if k not in ("model", "nested")} == {
        k: v for k, v in obj.items() if k not in ("model", "nested")}
    assert loaded["nested"][0] == obj["nested"][0] and loaded["nested"][2] == obj["nested"][2]
    weights = load_detectron2_pickle(path)
    assert list(weights) == list(obj["model"]) and weights["a.num_batches_tracked"].dtype == np.int64
    np.testing.assert_array_equal(weights["a.weight"], obj["model"]["a.weight"])


def test_hostile_torch_checkpoint_is_refused(tmp_path):
    torch = pytest.importorskip("torch")
    from maskrcnn_jax.convert.torchvision import load_torch_file
    marker = tmp_path / "MARKER"
    path = tmp_path / "model.pth"
    torch.save({"conv1.weight": torch.zeros(2, 3, 1, 1), "evil": _touch(marker)}, path)
    with pytest.raises(pickle.UnpicklingError, match="system"):
        load_torch_file(str(path))
    assert not marker.exists()


def test_exported_weights_with_an_object_array_are_refused(tmp_path):
    from maskrcnn_jax.serving import exported_model, host
    marker = tmp_path / "MARKER"
    directory = tmp_path / "exported"
    directory.mkdir()
    spec = host.InferenceSpec((32, 32), 32, 32, "round", (0.0,) * 3, (1.0,) * 3, 0.5, "detectron2", 1, (1,),
                              ("thing",))
    (directory / exported_model.SPEC_FILE).write_text(spec.to_json())
    (directory / "model_32x32.stablehlo").write_bytes(b"")
    hostile = np.empty(1, dtype=object)
    hostile[0] = _touch(marker)
    np.savez(directory / exported_model.WEIGHTS_FILE, np.zeros(3, np.float32), hostile)
    with pytest.raises(ValueError, match="allow_pickle"):
        exported_model.ExportedModel(str(directory))
    assert not marker.exists()
