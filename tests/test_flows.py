"""The example flows run as users run them (on the Prefect test server and this Ray), and the
accuracy they print actually rises."""

from __future__ import annotations

import importlib.util
import os

import pytest
from conftest import load_flow

pytestmark = pytest.mark.usefixtures("ray_cluster", "prefect_server")


@pytest.mark.parametrize("name,flow_name", [
    ("quickstart", "quickstart"),
    ("tensorflow_quickstart", "tensorflow_quickstart"),
    pytest.param("horovod_quickstart", "horovod_quickstart", marks=pytest.mark.skipif(
        importlib.util.find_spec("horovod") is None, reason="scripts/install_horovod.sh")),
])
def test_quickstart_flows_train_to_a_good_accuracy(name, flow_name, tmp_path, monkeypatch):
    monkeypatch.setenv("QUICKSTART_STORAGE", str(tmp_path))
    accuracy = getattr(load_flow(name), flow_name)(epochs=6)
    assert accuracy > 0.9
    runs = os.listdir(tmp_path)
    assert len(runs) == 1 and os.listdir(tmp_path / runs[0] / "_manifests")
