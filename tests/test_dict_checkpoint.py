"""Dict checkpoints (``Checkpoint.from_dict`` / ``to_dict``): safe formats only (JSON, torch's
weights-only files, ``.npy`` without pickle), a pickle is never loaded, a DDP model's state dict
loses its ``module.`` prefix, and a committed dict checkpoint reads back from a run's storage."""

from __future__ import annotations

import collections
import datetime
import json
import os
import pickle
import subprocess
import sys

import fsspec
import numpy as np
import pytest
import torch

import prefect_distrain as pd
from prefect_distrain.checkpoints.checkpoint import DICT_ARRAYS, DICT_INDEX, DICT_TORCH

# torch's first optimizer sets TORCHINDUCTOR_CACHE_DIR in the environment: once, at import, not
# inside a test (the env_police fixture).
torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.1)


def files_of(folder) -> list[str]:
    return sorted(os.path.relpath(os.path.join(parent, name), folder).replace(os.sep, "/")
                  for parent, _, names in os.walk(folder) for name in names)


def trained_state() -> dict:
    """A model's and an SGD-with-momentum optimizer's state dicts (int keys, tensors)."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.ReLU(), torch.nn.Linear(4, 1))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    model(torch.randn(8, 3)).pow(2).mean().backward()
    optimizer.step()
    return {"model": model.state_dict(), "optimizer": optimizer.state_dict()}


def assert_same(left, right) -> None:
    """Equal, tensors by value and dtype (nested dicts, lists and tuples)."""
    if isinstance(left, torch.Tensor):
        assert isinstance(right, torch.Tensor) and left.dtype == right.dtype
        assert torch.equal(left, right)
    elif isinstance(left, dict):
        assert type(left) is type(right) and list(left) == list(right)
        for key in left:
            assert_same(left[key], right[key])
    elif isinstance(left, (list, tuple)):
        assert type(left) is type(right) and len(left) == len(right)
        for a, b in zip(left, right):
            assert_same(a, b)
    else:
        assert left == right, (left, right)


def test_a_dict_round_trips_through_safe_files_only():
    state = trained_state()
    data = {
        "epoch": 7, "loss": 0.25, "name": "digits", "done": False, "note": None,
        "history": [1.0, 0.5, {"best": 0.25, "at": [3, "epoch"]}],
        "nested": {"lr": {"start": 0.1, "schedule": ["cosine", 10]}},
        "model": state["model"], "optimizer": state["optimizer"],
        "tensors": {"scale": torch.tensor(2.0), "ids": [torch.arange(3), (1, "x")]},
        "weights": np.linspace(0, 1, 5, dtype=np.float32), "seed": np.int64(42),
    }
    checkpoint = pd.Checkpoint.from_dict(data)
    assert checkpoint.is_local and checkpoint.manifest is None
    assert files_of(checkpoint.path) == sorted([DICT_INDEX, DICT_TORCH, f"{DICT_ARRAYS}/0.npy",
                                                f"{DICT_ARRAYS}/1.npy"])
    with open(os.path.join(checkpoint.path, DICT_INDEX)) as handle:
        index = json.load(handle)
    assert index["json"]["nested"] == data["nested"] and index["json"]["epoch"] == 7
    assert index["torch"] == ["model", "optimizer", "tensors"]

    back = checkpoint.to_dict()
    assert list(back) == list(data)
    for key in ("epoch", "loss", "name", "done", "note", "history", "nested"):
        assert back[key] == data[key]
    assert_same(back["model"], data["model"])
    assert_same(back["optimizer"], data["optimizer"])  # int keys and tuples kept
    assert_same(back["tensors"], data["tensors"])
    assert back["weights"].dtype == np.float32 and np.array_equal(back["weights"],
                                                                   data["weights"])
    assert back["seed"] == 42 and isinstance(back["seed"], np.int64)
    # It loads where it came from.
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.ReLU(), torch.nn.Linear(4, 1))
    model.load_state_dict(back["model"])
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    optimizer.load_state_dict(back["optimizer"])

    # JSON values alone: one JSON file; tuples come back as lists, as JSON has them.
    plain = pd.Checkpoint.from_dict({"epoch": 1, "betas": (0.9, 0.999)})
    assert files_of(plain.path) == [DICT_INDEX]
    assert plain.to_dict() == {"epoch": 1, "betas": [0.9, 0.999]}


def test_to_dict_reads_a_copy_from_remote_storage_too():
    """Any fsspec storage: the files are fetched (to_directory) before they are read."""
    local = pd.Checkpoint.from_dict({"step": 3, "w": torch.ones(2)})
    fs = fsspec.filesystem("memory")
    for name in files_of(local.path):
        fs.pipe_file(f"/dict-remote/{name}", open(os.path.join(local.path, name), "rb").read())
    back = pd.Checkpoint("memory://dict-remote").to_dict()
    assert back["step"] == 3 and torch.equal(back["w"], torch.ones(2))
    fs.rm("/dict-remote", recursive=True)


class Opaque:
    pass


@pytest.mark.parametrize("value,where,says", [
    (Opaque(), "the value of 'bad'", "Checkpoint.from_directory"),
    ({"when": datetime.date(2024, 1, 1)}, "the value of 'bad'['when']", "convert it to torch"),
    ([1, {2, 3}], "the value of 'bad'[1]", "builtins.set"),
    (torch.nn.Linear(2, 2), "the value of 'bad'", "state_dict()"),
    ({"a": np.zeros(2)}, "the value of 'bad'['a']", "a key of its own"),
    (np.array([object()]), "the value of 'bad'", "dtype object"),
    ({(1, 2): 3}, "the value of 'bad'", "keys must be strings"),
])
def test_values_that_need_pickle_are_refused_naming_the_key(value, where, says):
    with pytest.raises(TypeError) as caught:
        pd.Checkpoint.from_dict({"fine": 1, "bad": value})
    message = str(caught.value)
    assert where in message and says in message, message
    with pytest.raises(TypeError, match="not a string"):
        pd.Checkpoint.from_dict({3: "x"})


def _pwned(marker: str) -> None:
    """What the hand-written pickles below would run if anything unpickled them."""
    with open(marker, "w") as handle:
        handle.write("code ran")


class Payload:
    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (_pwned, (self.marker,))


def test_a_hand_written_pickle_is_never_loaded(tmp_path):
    marker = str(tmp_path / "pwned")
    evil = pickle.dumps({"model": Payload(marker)}, protocol=2)  # torch.save's protocol

    # A folder of one's own with a pickle in it is not a dict checkpoint.
    folder = tmp_path / "pickled"
    folder.mkdir()
    (folder / "checkpoint.pkl").write_bytes(evil)
    with pytest.raises(ValueError, match=r"is not a dict checkpoint: it has no "
                                         r"dict_checkpoint\.json \(it holds checkpoint\.pkl\)"):
        pd.Checkpoint.from_directory(folder).to_dict()

    # A dict checkpoint whose torch file was swapped for a pickle: refused, not run.
    swapped = pd.Checkpoint.from_dict({"model": {"w": torch.zeros(1)}})
    with open(os.path.join(swapped.path, DICT_TORCH), "wb") as handle:
        handle.write(evil)
    with pytest.raises(pd.UnsafeCheckpointError, match="refused to load dict_checkpoint.pt"):
        swapped.to_dict()

    # ... or whose array was: numpy's pickle is off.
    arrays = pd.Checkpoint.from_dict({"a": np.zeros(3)})
    with open(os.path.join(arrays.path, DICT_ARRAYS, "0.npy"), "wb") as handle:
        np.save(handle, np.array([Payload(marker)], dtype=object), allow_pickle=True)
    with pytest.raises(pd.UnsafeCheckpointError, match="not a plain .npy array"):
        arrays.to_dict()

    # An index that points outside its folder is corrupt, and nothing is read there.
    index_path = os.path.join(arrays.path, DICT_INDEX)
    index = json.load(open(index_path))
    index["numpy"]["a"]["file"] = "../../pickled/checkpoint.pkl"
    json.dump(index, open(index_path, "w"))
    with pytest.raises(pd.CheckpointCorruptError, match="not one in dict_checkpoint_arrays/"):
        arrays.to_dict()
    # An index of some other program's is not ours.
    json.dump({"format": "something else"}, open(index_path, "w"))
    with pytest.raises(ValueError, match="was not written by Checkpoint.from_dict"):
        arrays.to_dict()

    assert not os.path.exists(marker), "a pickle was loaded"
    pickle.loads(evil)  # the payload is live: a plain unpickler runs it
    assert os.path.exists(marker)


def test_a_ddp_state_dict_is_stored_without_the_module_prefix():
    state = trained_state()["model"]
    wrapped = collections.OrderedDict((f"module.{k}", v) for k, v in state.items())
    wrapped._metadata = collections.OrderedDict(
        (f"module.{k}" if k else "module", v) for k, v in state._metadata.items())
    back = pd.Checkpoint.from_dict({"model": wrapped, "raw": {"module.w": torch.ones(1),
                                                             "head.w": torch.ones(1)}}).to_dict()
    assert list(back["model"]) == list(state)
    assert_same(back["model"], state)
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.ReLU(), torch.nn.Linear(4, 1))
    model.load_state_dict(back["model"])  # the unwrapped model takes it
    assert list(wrapped)[0].startswith("module."), "the caller's dict is not changed"
    assert list(back["raw"]) == ["module.w", "head.w"], "only when every key has the prefix"


def dict_checkpoint_loop(config):
    """Rank 0 reports a dict checkpoint each epoch; the other ranks report without one."""
    rank = pd.get_context().get_world_rank()
    weights = torch.zeros(3)
    for epoch in range(config["epochs"]):
        weights = weights + 1
        checkpoint = pd.Checkpoint.from_dict(
            {"epoch": epoch, "model": {"w": weights}, "log": {"ranks": 2}}) if rank == 0 else None
        pd.report({"epoch": epoch}, checkpoint=checkpoint)
    return rank


@pytest.mark.usefixtures("ray_cluster")
def test_a_committed_dict_checkpoint_reads_back_from_the_runs_storage(tmp_path):
    run = pd.RunConfig(name="dicts", storage=str(tmp_path))
    with pd.Trainer(num_workers=2, run=run) as trainer:
        result = trainer.fit(dict_checkpoint_loop, config={"epochs": 2})
    assert result.worker_results == [0, 1]
    checkpoint = result.checkpoint
    assert checkpoint.manifest is not None and checkpoint.index == 2
    assert checkpoint.path.startswith(str(tmp_path / "dicts"))
    back = checkpoint.to_dict()
    assert back["epoch"] == 1 and back["log"] == {"ranks": 2}
    assert torch.equal(back["model"]["w"], torch.full((3,), 2.0))
    # Through the verified download: a file changed after the commit is caught.
    with open(os.path.join(checkpoint.path, DICT_INDEX), "a") as handle:
        handle.write(" ")
    with pytest.raises(pd.CheckpointCorruptError, match="does not match its manifest"):
        checkpoint.to_dict()


# -- background=True: the loop waits for a copy, a thread writes the files ---------------------

def snapshot(state_dict: dict) -> dict:
    return collections.OrderedDict((k, v.clone()) for k, v in state_dict.items())


def test_a_background_checkpoint_holds_the_state_as_it_was_when_taken():
    """Changed in place at once, then taken again into the same host buffers: each checkpoint
    reads back the values it was taken with, in the same files as one written in the loop."""
    state = trained_state()
    big = torch.zeros(8 << 20)  # 32 MB: its write is still under way when the next is taken
    data = {"model": state["model"], "optimizer": state["optimizer"], "big": big,
            "history": [1.0], "weights": np.zeros(4)}
    expected = [{"model": snapshot(state["model"]), "big": 0.0,
                 "history": [1.0], "weights": 0.0}]
    first = pd.Checkpoint.from_dict(data, background=True)
    with torch.no_grad():
        for tensor in state["model"].values():
            tensor.add_(1)
    big.fill_(1)
    data["history"].append(2.0)
    data["weights"][:] = 1
    expected.append({"model": snapshot(state["model"]), "big": 1.0,
                     "history": [1.0, 2.0], "weights": 1.0})
    second = pd.Checkpoint.from_dict(data, background=True)
    big.fill_(2)
    data["history"].append(3.0)

    for checkpoint, want in zip((first, second), expected):
        back = checkpoint.to_dict()
        assert_same(back["model"], want["model"])
        assert torch.equal(back["big"], torch.full_like(big, want["big"]))
        assert back["history"] == want["history"]
        assert np.array_equal(back["weights"], np.full(4, want["weights"]))
        assert files_of(checkpoint.path) == files_of(pd.Checkpoint.from_dict(data).path)
    assert back["optimizer"]["state"][0]["momentum_buffer"].shape == (4, 3)


def test_a_failed_background_write_is_raised_by_every_reader(tmp_path):
    """A real write error (a file size limit: a short write, as on a full disk), in a process
    of its own: ``to_dict`` raises torch.save's error each time, naming background=True."""
    script = tmp_path / "write.py"
    script.write_text(
        "import resource, signal, torch, prefect_distrain as pd\n"
        "signal.signal(signal.SIGXFSZ, signal.SIG_IGN)\n"
        "resource.setrlimit(resource.RLIMIT_FSIZE,\n"
        "                   (1 << 20, resource.getrlimit(resource.RLIMIT_FSIZE)[1]))\n"
        "checkpoint = pd.Checkpoint.from_dict({'w': torch.zeros(1 << 20)}, background=True)\n"
        "for _ in range(2):\n"
        "    try:\n"
        "        checkpoint.to_dict()\n"
        "    except RuntimeError as error:\n"
        "        print('raised:', error)\n")
    root = os.path.dirname(os.path.dirname(pd.__file__))  # the package under test
    done = subprocess.run([sys.executable, str(script)], capture_output=True, text=True,
                          timeout=120, cwd=tmp_path, env={**os.environ, "PYTHONPATH": root})
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert len(lines) == 2 and all(
        "Checkpoint.from_dict(..., background=True) could not write" in line
        and "unexpected pos" in line for line in lines), done.stdout  # torch.save's short write


def background_loop(config):
    """Rank 0 reports a background dict checkpoint each epoch (reading one back first), then
    changes its weights in place at once; returns the folders it reported."""
    weights = torch.zeros(1 << 20)
    folders = []
    for epoch in range(3):
        weights.fill_(float(epoch))
        checkpoint = None
        if pd.get_context().get_world_rank() == 0:
            checkpoint = pd.Checkpoint.from_dict({"epoch": epoch, "w": weights},
                                                 background=True)
            folders.append(checkpoint.path)
            if epoch == 1:  # read before its report: still the report's to remove
                assert checkpoint.to_dict()["epoch"] == 1
        pd.report({"epoch": epoch}, checkpoint=checkpoint)
        weights.fill_(-1.0)
    return folders


@pytest.mark.usefixtures("ray_cluster")
@pytest.mark.parametrize("upload", ["sync", "async"])
def test_a_background_checkpoint_commits_what_was_reported(storage_kind, upload):
    run = pd.RunConfig(name=f"background-{upload}", **storage_kind)
    with pd.Trainer(num_workers=2, run=run,
                    checkpoint=pd.CheckpointConfig(upload=upload)) as trainer:
        result = trainer.fit(background_loop)
    assert sorted(c.index for c, _ in result.best_checkpoints) == [1, 2, 3]
    for checkpoint, metrics in result.best_checkpoints:
        full = pd.Checkpoint(checkpoint.path, storage_kind["storage_options"],
                             checkpoint.manifest)
        back = full.to_dict()
        assert back["epoch"] == metrics["epoch"]
        assert torch.equal(back["w"], torch.full((1 << 20,), float(metrics["epoch"])))
        assert sorted(checkpoint.manifest.files) == [DICT_INDEX, DICT_TORCH]
    reported = result.worker_results[0]
    assert len(reported) == 3 and not any(os.path.exists(f) for f in reported), \
        "each folder is removed once uploaded"
