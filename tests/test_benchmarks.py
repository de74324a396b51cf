"""A smoke run of the benchmark runner (every scenario once, small): it keeps working.
No timing is asserted here; the figures are the runner's business."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.timeout(960)  # the runner's own limit is 900 s
def test_the_benchmark_runner_produces_every_figure(tmp_path, prefect_server):
    from prefect.settings import PREFECT_API_URL

    out = tmp_path / "results.json"
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    done = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "run.py"), "--quick",
                           "--out", str(out), "--prefect-api", PREFECT_API_URL.value()],
                          capture_output=True, text=True, timeout=900, env=env)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    figures = json.loads(out.read_text())["figures"]
    for name in ("P1 ours / Ray Train", "P1 ours / torchrun", "P1b time to first step (s)",
                 "P2 step with report / without", "P3 stall async / sync, s3",
                 "P2d step with a 2 s validation per checkpoint / without",
                 "P3 stall async / sync, local", "P4 persistence / raw s3fs.put_file",
                 "P5 recovery / P1b", "P5 Ray Train kill -> first step after restart (s)",
                 "P6 pd.train in a flow - bare Trainer (s)",
                 "P2e step with data positions / without",
                 "P1c second train in a flow, time to first step (s)",
                 "P4b sharded: 4 ranks' aggregate upload / one put_file",
                 "P2 Ray Train step with report / without",
                 "P3 Ray Train stall per checkpoint, local, async (s)",
                 "Memory: worker RSS over the state while it persists",
                 "Many workers: driver CPU per report (ms)",
                 "Many workers: driver CPU per commit (ms)"):
        assert name in figures, name
    assert "| P1 ours / Ray Train |" in done.stdout
    assert set(figures["Many workers: driver CPU per report (ms)"]) >= {"2 workers",
                                                                       "4 workers"}
    chart = (tmp_path / "many_workers.svg").read_text()
    assert chart.startswith("<svg") and chart.count("<polyline") == 3
