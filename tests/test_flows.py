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


def test_the_retraining_gate_promotes_only_a_better_model(tmp_path):
    """Three retrainings: the first becomes production; a deliberately worse one (a learning
    rate that diverges) leaves production on the champion, and the artifact says why; a
    better one (more epochs from the champion) is promoted."""
    from conftest import flow_run_records

    import prefect_distrain as pd

    retrain = load_flow("retrain").retrain.with_options(retries=0)
    common = {"storage": str(tmp_path), "num_workers": 1}
    first = retrain(epochs=1, **common)
    assert first["promoted"] and first["winner"] == "challenger"
    assert first["champion_accuracy"] is None

    state = retrain(epochs=1, lr=50.0, return_state=True, **common)
    worse = state.result()
    assert not worse["promoted"] and worse["winner"] == "champion"
    assert worse["accuracy"] < worse["champion_accuracy"] and worse["delta"] < 0
    [gate] = [a for a in flow_run_records(state.state_details.flow_run_id)[1]
              if a.key == "digits-production-gate"]
    assert "the champion wins" in gate.data and "production stays on the champion" in gate.data
    production = pd.load_alias("digits", storage=str(tmp_path))
    assert production.path.rstrip("/").rsplit("/", 2)[-2] == first["run"]

    better = retrain(epochs=4, **common)
    assert better["promoted"] and better["delta"] > 0
    assert better["champion_accuracy"] == pytest.approx(first["accuracy"])
    history = pd.alias_history("digits", storage=str(tmp_path))
    assert [e.action for e in history] == ["promote", "promote"]
    assert history[0].checkpoint.rstrip("/").rsplit("/", 2)[-2] == better["run"]
