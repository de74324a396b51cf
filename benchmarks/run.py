"""prefect-distrain side by side with plain DDP (torchrun), Ray Train and raw s3fs, in one run.

    python benchmarks/run.py                 # the full suite; rewrites README.md's table
    python benchmarks/run.py --quick         # every scenario once, smallest (the tests run this)

Prints a table and writes JSON (``--out``). Absolute times on a shared 2-core machine are
noisy; the ratios, measured in the same run on the same Ray, are what to compare.
"""

from __future__ import annotations

import argparse
import cProfile
import io
import json
import os
import platform
import pstats
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
import urllib.request

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import ray  # noqa: E402
from loops import (  # noqa: E402
    bench_loop,
    checkpoint_stall_loop,
    memory_loop,
    recovery_loop,
    scaling_loop,
    sharded_upload_loop,
    sleepy_validation,
    step_overhead_loop,
    validated_steps_loop,
)
from many_workers import SIZES, chart, measure  # noqa: E402

import prefect_distrain as pd  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))


def spread(values: list[float]) -> dict[str, float]:
    return {"median": statistics.median(values), "min": min(values), "max": max(values),
            "runs": len(values)}


class Bench:
    def __init__(self, quick: bool, repeat: int, workdir: str, prefect_api_url: str = ""):
        self.quick, self.repeat, self.workdir = quick, repeat, workdir
        self.prefect_api_url = prefect_api_url
        self.figures: dict[str, dict] = {}
        self.epochs, self.steps = (2, 5) if quick else (3, 20)

    def ray_train(self, loop, config: dict, storage: str = "", **run_options):
        """``loop`` under Ray Train's TorchTrainer on 2 workers (``config["api"] = "ray"``);
        its Result. ``run_options``: more of its RunConfig (storage_filesystem, failure_config)."""
        from ray.train import RunConfig, ScalingConfig, TrainingFailedError
        from ray.train.torch import TorchTrainer

        for tries in (1, 2):  # once more if Ray Train's own controller gave up (on a loaded
            try:              # machine its health check of a busy worker fails at times)
                return TorchTrainer(loop, train_loop_config={**config, "api": "ray"},
                                    scaling_config=ScalingConfig(num_workers=2),
                                    run_config=RunConfig(name=f"rt-{time.time_ns()}",
                                                         storage_path=storage or os.path.join(
                                                             self.workdir, "ray"),
                                                         **run_options)).fit()
            except TrainingFailedError as error:
                if tries == 2:
                    raise
                print(f"Ray Train failed ({str(error)[:200]}...); once more", flush=True)

    def run_config(self, name: str, **kwargs) -> pd.RunConfig:
        return pd.RunConfig(name=f"{name}-{time.time_ns()}", storage=os.path.join(
            self.workdir, "runs"), **kwargs)

    # -- P1 / P1b ---------------------------------------------------------------------------

    def end_to_end(self) -> None:
        config = {"api": "pd", "epochs": self.epochs, "steps": self.steps}
        ours, first_steps = [], []
        for _ in range(self.repeat):
            began = time.time()
            with pd.Trainer(num_workers=2, run=self.run_config("p1")) as trainer:
                result = trainer.fit(bench_loop, config=config)
            ours.append(time.time() - began)
            first_steps.append(result.worker_results[0]["first_step"] - began)
        self.figures["P1 ours (s)"] = spread(ours)
        self.figures["P1b time to first step (s)"] = {**spread(first_steps), "goal": "<= 2 s",
                                                      "met": statistics.median(first_steps) <= 2}
        self.end_to_end_ray_train(config, ours)
        self.end_to_end_torchrun(ours)

    def end_to_end_ray_train(self, config: dict, ours: list[float]) -> None:
        theirs = []
        for _ in range(self.repeat):
            began = time.time()
            self.ray_train(bench_loop, config)
            theirs.append(time.time() - began)
        ratio = statistics.median(ours) / statistics.median(theirs)
        self.figures["P1 Ray Train TorchTrainer.fit (s)"] = spread(theirs)
        self.figures["P1 ours / Ray Train"] = {"ratio": ratio, "goal": "<= 0.3",
                                               "met": ratio <= 0.3}

    def end_to_end_torchrun(self, ours: list[float]) -> None:
        torchrun = os.path.join(os.path.dirname(sys.executable), "torchrun")
        times = []
        for i in range(self.repeat):
            for tries in (1, 2):  # torchrun --standalone picks its port, then binds it: a
                began = time.time()  # process starting meanwhile may take it (EADDRINUSE)
                done = subprocess.run([torchrun, "--standalone", "--nproc-per-node", "2",
                                       os.path.join(HERE, "torchrun_job.py"), str(self.epochs),
                                       str(self.steps),
                                       os.path.join(self.workdir, f"torchrun-{i}-{tries}")],
                                      capture_output=True, text=True, timeout=300)
                if done.returncode == 0:
                    break
                if tries == 2 or "EADDRINUSE" not in done.stdout + done.stderr:
                    raise RuntimeError(f"torchrun failed ({done.returncode}):\n"
                                       f"{done.stderr[-3000:]}")
            times.append(time.time() - began)
        ratio = statistics.median(ours) / statistics.median(times)
        self.figures["P1 torchrun --standalone (s)"] = spread(times)
        self.figures["P1 ours / torchrun"] = {
            "ratio": ratio, "goal": "<= 0.5", "met": ratio <= 0.5,
            "note": "torchrun starts processes but no cluster, storage or orchestration"}

    # -- P2 ----------------------------------------------------------------------------------

    def step_overhead(self) -> None:
        config = {"warmup": 20, "steps": 50 if self.quick else 200,
                  "rounds": 1 if self.quick else 6}
        ratios = []
        for _ in range(self.repeat):
            with pd.Trainer(num_workers=2, run=self.run_config("p2")) as trainer:
                result = trainer.fit(step_overhead_loop, config=config)
            medians = result.worker_results[0]
            ratios.append(medians["report"] / medians["plain"])
        self.figures["P2 step with report / without"] = {
            **spread(ratios), "goal": "<= 1.02", "met": statistics.median(ratios) <= 1.02}
        self.exact_stop_cost(config)

    def exact_stop_cost(self, config: dict) -> None:
        """P2b: the same steps with an exact-stop callback attached (EarlyStopping on a metric
        never reported, so it never stops): every report waits for the driver's verdict."""
        costs, ratios = [], []
        for _ in range(self.repeat):
            for hidden, into in ((0, costs), (1024, ratios))[:1 if self.quick else 2]:
                judge = pd.callbacks.EarlyStopping(metric="never-reported")
                with pd.Trainer(num_workers=2, run=self.run_config("p2b")) as trainer:
                    result = trainer.fit(step_overhead_loop, config={**config, "hidden": hidden},
                                         callbacks=[judge])
                medians = result.worker_results[0]
                into.append((medians["report"] - medians["plain"]) * 1000 if into is costs
                            else medians["report"] / medians["plain"])
        self.figures["P2b exact stop: cost per report (ms)"] = spread(costs)
        if ratios:
            self.figures["P2b exact stop: step with report / without, MLP 1024"] = spread(ratios)
        self.hang_tracking_cost(config)

    def hang_tracking_cost(self, config: dict) -> None:
        """P2c: the step time with hang detection on (the default: a progress count per
        prepared batch and a message every few seconds) / off, interleaved runs."""
        ratios = []
        for _ in range(self.repeat):
            steps = {}
            for name, hang in (("off", None), ("on", 600.0)):
                with pd.Trainer(num_workers=2, run=self.run_config("p2c"),
                                failure=pd.FailureConfig(hang_timeout_s=hang)) as trainer:
                    result = trainer.fit(step_overhead_loop, config={**config, "loader": True})
                steps[name] = result.worker_results[0]["report"]
            ratios.append(steps["on"] / steps["off"])
        self.figures["P2c step with hang tracking on / off"] = {
            **spread(ratios), "goal": "<= 1.02", "met": statistics.median(ratios) <= 1.02}
        self.position_tracking_cost(config)

    def position_tracking_cost(self, config: dict) -> None:
        """P2e: the step time, a report every step through the training data loader, with its
        position in every report / without it (interleaved rounds, the same processes)."""
        ratios = []
        for _ in range(self.repeat):
            with pd.Trainer(num_workers=2, run=self.run_config("p2e")) as trainer:
                result = trainer.fit(step_overhead_loop,
                                     config={**config, "loader": True, "positions": True})
            medians = result.worker_results[0]
            ratios.append(medians["report"] / medians["untracked"])
        self.figures["P2e step with data positions / without"] = {
            **spread(ratios), "goal": "<= 1.02", "met": statistics.median(ratios) <= 1.02}

    def validation_cost(self) -> None:
        """P2d: step time (with a checkpoint every ``every`` steps) while each checkpoint is
        validated by a function that sleeps 2 s on its own Ray task / without validation,
        interleaved runs. The validation must stay off the training path."""
        config = {"steps": 60 if self.quick else 300, "every": 20 if self.quick else 50}
        validation = pd.Validation(sleepy_validation, config={"sleep": 2.0})
        ratios, means = [], []
        for _ in range(self.repeat):
            steps = {}
            for name, validate in (("without", None), ("with", validation)):
                with pd.Trainer(num_workers=2, run=self.run_config("p2d"),
                                checkpoint=pd.CheckpointConfig(validate=validate)) as trainer:
                    result = trainer.fit(validated_steps_loop, config=config)
                steps[name] = result.worker_results[0]
                if validate is not None:
                    assert {c.status for c in result.checkpoints} == {"validated"}
            ratios.append(steps["with"]["step"] / steps["without"]["step"])
            means.append(steps["with"]["mean"] / steps["without"]["mean"])
        self.figures["P2d step with a 2 s validation per checkpoint / without"] = {
            **spread(ratios), "goal": "<= 1.05", "met": statistics.median(ratios) <= 1.05,
            "mean step ratio": statistics.median(means)}

    # -- P3 / P4 -----------------------------------------------------------------------------

    def checkpoints(self, endpoint: str) -> None:
        mb = 20 if self.quick else 200
        gap = 0.5 if self.quick else 6.0
        s3 = {"key": "bench", "secret": "bench", "client_kwargs": {"endpoint_url": endpoint}}
        targets = {"local": (os.path.join(self.workdir, "runs"), {}),
                   "s3": ("s3://bench/runs", s3)}
        raw_path = self.raw_file(mb)
        raw: dict[str, list[float]] = {"worker": [], "driver": []}
        for target, (storage, options) in targets.items():
            stalls = {}
            for upload in ("sync", "async"):
                blocked = []
                for _ in range(self.repeat):
                    run = pd.RunConfig(name=f"p3-{target}-{upload}-{time.time_ns()}",
                                       storage=storage, storage_options=options)
                    with pd.Trainer(num_workers=2, run=run,
                                    checkpoint=pd.CheckpointConfig(upload=upload)) as trainer:
                        result = trainer.fit(checkpoint_stall_loop, config={
                            "mb": mb, "checkpoints": 2, "gap_s": gap})
                    blocked += result.worker_results[0]["blocked"]
                    if target == "s3" and upload == "sync":
                        # P4's baseline in the same rounds and with the same quiet after each
                        # put: without it, the upload after the raw puts took twice as long
                        # (moto spools what it takes to disk).
                        raw["worker"] += ray.get(raw_puts.remote(raw_path, options, 2, gap))
                        raw["driver"] += timed_puts(raw_path, options, 2, gap)
                stalls[upload] = blocked
                self.figures[f"P3 stall per checkpoint, {target}, {upload} (s)"] = spread(blocked)
            ratio = statistics.median(stalls["async"]) / statistics.median(stalls["sync"])
            self.figures[f"P3 stall async / sync, {target}"] = {
                "ratio": ratio, "goal": "<= 0.10", "met": ratio <= 0.10, "mb": mb}
            if target == "s3":
                self.upload_throughput(raw_path, stalls["sync"], raw, s3)
                self.sharded_upload(mb, s3)

    def raw_file(self, mb: int) -> str:
        """Raw s3fs's payload: ``mb`` MB of state, saved as the P3 loop saves its checkpoint."""
        import torch

        path = os.path.join(self.workdir, "raw.pt")
        torch.save({"weights": torch.randn(mb * 1024 * 1024 // 4)}, path)
        return path

    def upload_throughput(self, path: str, sync_stalls: list[float], raw: dict[str, list[float]],
                          options: dict) -> None:
        """Ours (a sync checkpoint's stall in a worker: upload, hashes, commit) against raw
        ``s3fs.put_file`` of the same bytes from a Ray worker (a task with a CPU, as a rank
        has) and from the driver, timed in the same rounds as ours."""
        size = os.path.getsize(path)
        ours_rate = size / statistics.median(sync_stalls)
        worker_rate = size / statistics.median(raw["worker"])
        ratio = ours_rate / worker_rate
        figure = {"ratio": ratio, "ours MB/s": ours_rate / 1e6,
                  "raw s3fs from a worker MB/s": worker_rate / 1e6,
                  "raw s3fs from the driver MB/s": size / statistics.median(raw["driver"]) / 1e6,
                  "goal": ">= 0.95", "met": ratio >= 0.95}
        if ratio < 0.95:
            figure["profile"] = profile_upload(path, options)
        self.figures["P4 persistence / raw s3fs.put_file"] = figure

    def sharded_upload(self, mb: int, options: dict) -> None:
        """4 ranks each upload their own shard of ``mb`` MB of state into one checkpoint: the
        aggregate rate / one ``s3fs.put_file`` of the same total bytes from a worker, timed in
        the same rounds."""
        path = os.path.join(self.workdir, "whole.bin")
        blocked, single, total = [], [], 0
        for _ in range(self.repeat):
            run = pd.RunConfig(name=f"p4b-{time.time_ns()}", storage="s3://bench/runs",
                               storage_options=options)
            with pd.Trainer(num_workers=4, run=run,
                            resources_per_worker={"CPU": 1}) as trainer:
                result = trainer.fit(sharded_upload_loop, config={"mb": mb, "checkpoints": 2})
            blocked += [max(times) for times in zip(*(r["blocked"]
                                                      for r in result.worker_results))]
            if not total:
                total = result.worker_results[0]["bytes"] * 4
                with open(path, "wb") as handle:
                    handle.write(os.urandom(total))
            single += ray.get(raw_puts.remote(path, options, 2))
        ours_rate = total / statistics.median(blocked)
        single_rate = total / statistics.median(single)
        ratio = ours_rate / single_rate
        self.figures["P4b sharded: 4 ranks' aggregate upload / one put_file"] = {
            "ratio": ratio, "4 ranks MB/s": ours_rate / 1e6, "one put_file MB/s":
            single_rate / 1e6, "mb": mb, "goal": ">= 1.5", "met": ratio >= 1.5}

    def memory(self, endpoint: str) -> None:
        """The extra memory a worker holds while a big checkpoint persists (2 GB; 64 MB with
        --quick), sync and async, to local disk and to moto S3: at most 256 MB."""
        mb = 64 if self.quick else 2048
        s3 = {"key": "bench", "secret": "bench", "client_kwargs": {"endpoint_url": endpoint}}
        targets = {"local": (os.path.join(self.workdir, "runs"), {}),
                   "s3": ("s3://bench/runs", s3)}
        extra = {}
        for target, (storage, options) in targets.items():
            for upload in ("sync", "async"):
                if self.quick and (target, upload) in (("local", "async"), ("s3", "sync")):
                    continue
                run = pd.RunConfig(name=f"mem-{target}-{upload}-{time.time_ns()}",
                                   storage=storage, storage_options=options)
                with pd.Trainer(num_workers=1, run=run,
                                checkpoint=pd.CheckpointConfig(upload=upload)) as trainer:
                    result = trainer.fit(memory_loop, config={"mb": mb})
                extra[f"{target}, {upload} (MB)"] = round(result.worker_results[0]["extra_mb"])
        self.figures["Memory: worker RSS over the state while it persists"] = {
            **extra, "state MB": mb, "goal": "<= 256 MB each",
            "met": max(extra.values()) <= 256}

    def ray_train_side_by_side(self, endpoint: str) -> None:
        """P2 and P3 under Ray Train's TorchTrainer: the same loops, its ``report`` every step,
        its ``checkpoint_upload_mode`` SYNC and ASYNC to local disk and to the same moto S3."""
        import pyarrow.fs

        def fit(loop, config: dict, storage: str, filesystem=None) -> dict:
            return self.ray_train(loop, config, storage,
                                  storage_filesystem=filesystem).metrics["returned"]

        # Its report waits for the driver each time (about 0.5 s on this machine): fewer steps.
        config = {"warmup": 2, "steps": 5 if self.quick else 20, "rounds": 1 if self.quick else 3}
        ratios = []
        for _ in range(self.repeat):
            medians = fit(step_overhead_loop, config, os.path.join(self.workdir, "ray"))
            ratios.append(medians["report"] / medians["plain"])
        ours = self.figures.get("P2 step with report / without", {}).get("median")
        self.figures["P2 Ray Train step with report / without"] = {
            **spread(ratios), "ours": ours}
        s3 = pyarrow.fs.S3FileSystem(access_key="bench", secret_key="bench", scheme="http",
                                     endpoint_override=endpoint.split("://")[1],
                                     region="us-east-1")
        targets = {"local": (os.path.join(self.workdir, "ray"), None),
                   "s3": ("bench/ray-runs", s3)}
        mb = 20 if self.quick else 200
        for target, (storage, filesystem) in targets.items():
            for upload in ("async",) if self.quick else ("sync", "async"):
                blocked = []
                for _ in range(self.repeat):
                    blocked += fit(checkpoint_stall_loop, {
                        "mb": mb, "checkpoints": 2, "gap_s": 0.5 if self.quick else 6.0,
                        "upload": upload}, storage, filesystem)["blocked"]
                theirs = statistics.median(blocked)
                ours = self.figures.get(f"P3 stall per checkpoint, {target}, {upload} (s)", {})
                self.figures[f"P3 Ray Train stall per checkpoint, {target}, {upload} (s)"] = {
                    **spread(blocked), "ours / theirs": ours.get("median", float("nan")) / theirs}
            if self.quick:
                break

    # -- P5 ----------------------------------------------------------------------------------

    def recovery(self) -> None:
        """P5: a worker SIGKILLed mid-run; the time from the kill to the first step after the
        restart from the latest checkpoint, ours and Ray Train's (its FailureConfig), on the
        same loop."""
        from ray.train import FailureConfig

        config = {"epochs": 3, "steps": self.steps}
        ours, theirs = [], []
        for i in range(self.repeat):
            kill_file = os.path.join(self.workdir, f"kill-{i}")
            with pd.Trainer(num_workers=2, run=self.run_config("p5"),
                            failure=pd.FailureConfig(max_failures=1)) as trainer:
                result = trainer.fit(recovery_loop, config={**config, "api": "pd",
                                                            "kill_file": kill_file})
            ours.append(self._since_kill(result.worker_results[0], kill_file))
            kill_file = os.path.join(self.workdir, f"ray-kill-{i}")
            result = self.ray_train(recovery_loop, {**config, "kill_file": kill_file},
                                    failure_config=FailureConfig(max_failures=1))
            theirs.append(self._since_kill(result.metrics["returned"], kill_file))
        first = self.figures["P1b time to first step (s)"]["median"]
        ratio = statistics.median(ours) / first
        self.figures["P5 kill -> first step after restart (s)"] = spread(ours)
        self.figures["P5 recovery / P1b"] = {"ratio": ratio, "goal": "<= 1.5", "met": ratio <= 1.5}
        self.figures["P5 Ray Train kill -> first step after restart (s)"] = {
            **spread(theirs), "ours / theirs": statistics.median(ours) / statistics.median(theirs)}

    @staticmethod
    def _since_kill(returned: dict, kill_file: str) -> float:
        if returned["first_attempt"]:
            raise RuntimeError("the recovery run ended without the restart it measures")
        with open(kill_file) as handle:
            return returned["first_step"] - float(handle.read())

    # -- P6 ----------------------------------------------------------------------------------

    def prefect_overhead(self) -> None:
        from prefect import flow

        config = {"api": "pd", "epochs": self.epochs, "steps": self.steps}

        @flow
        def timed():
            began = time.time()
            pd.train(bench_loop, config=config, scaling=pd.ScalingConfig(num_workers=2),
                     run=self.run_config("p6-flow"))
            return time.time() - began

        @flow
        def two_trains():
            """The second train of a flow takes the first one's warm worker group."""
            firsts = []
            for i in range(2):
                began = time.time()
                result = pd.train(bench_loop, config=config,
                                  scaling=pd.ScalingConfig(num_workers=2),
                                  run=self.run_config(f"p1c-{i}"))
                firsts.append(result.worker_results[0]["first_step"] - began)
            return firsts

        with self.prefect_api():
            if not self.quick:
                timed()  # the first task run of a process pays Prefect's imports and client
            cold, warm = zip(*(two_trains() for _ in range(self.repeat)))
            self.figures["P1c second train in a flow, time to first step (s)"] = {
                **spread(list(warm)), "first train (s)": statistics.median(cold),
                "goal": "<= 0.5 s", "met": statistics.median(warm) <= 0.5}
            in_flow, bare = [], []
            for _ in range(self.repeat):
                in_flow.append(timed())
                began = time.time()
                with pd.Trainer(num_workers=2, run=self.run_config("p6-bare")) as trainer:
                    trainer.fit(bench_loop, config=config)
                bare.append(time.time() - began)
        overhead = statistics.median(in_flow) - statistics.median(bare)
        self.figures["P6 pd.train in a flow - bare Trainer (s)"] = {
            "overhead": overhead, "in flow": spread(in_flow), "bare": spread(bare),
            "goal": "<= 0.3 s", "met": overhead <= 0.3}

    def prefect_api(self):
        """The Prefect API the flows report to: ``--prefect-api`` (an API already running, as
        the tests give theirs), else a temporary local server."""
        from prefect.settings import PREFECT_API_URL, temporary_settings
        from prefect.testing.utilities import prefect_test_harness

        if self.prefect_api_url:
            return temporary_settings({PREFECT_API_URL: self.prefect_api_url})
        return prefect_test_harness(server_startup_timeout=120)

    # -- scaling -----------------------------------------------------------------------------

    def scaling(self) -> None:
        for hidden in (0,) if self.quick else (0, 1024):
            line = {}
            for workers in (1, 2) if self.quick else (1, 2, 4):
                with pd.Trainer(num_workers=workers, run=self.run_config("scale")) as trainer:
                    steps = trainer.run(scaling_loop, config={
                        "hidden": hidden, "warmup": 10, "steps": 30 if self.quick else 100})
                line[f"{workers} workers (ms)"] = 1000 * statistics.median(steps)
            name = "linear 32->1" if hidden == 0 else f"MLP 32-{hidden}-{hidden}-1"
            self.figures[f"Scaling: step time, {name}"] = line

    # -- many workers ------------------------------------------------------------------------

    def many_workers(self, chart_path: str) -> None:
        """The driver's CPU per report and per commit (a checkpoint with every report, less the
        same reports without), and the iteration latency, for 2 to 64 workers reporting every
        10 ms (many_workers.py); the chart goes to ``chart_path``."""
        sizes = (2, 4) if self.quick else SIZES
        reports = 50 if self.quick else 300
        storage = os.path.join(self.workdir, "runs")
        points = {}
        for workers in sizes:
            reports_only = measure(workers, reports, 0.01, None, storage)
            with_commits = measure(workers, reports // 3, 0.01, 1, storage)
            points[workers] = {**reports_only, "commit_cpu_ms": max(
                0.0, with_commits["cpu_ms"] - reports_only["cpu_ms"])}
        chart(points, chart_path)
        largest = points[sizes[-1]]
        per_worker = [points[w]["cpu_ms"] / w for w in sizes]
        self.figures["Many workers: driver CPU per report (ms)"] = {
            **{f"{w} workers": points[w]["cpu_ms"] for w in sizes},
            "goal": "grows at most linearly",
            "met": per_worker[-1] <= per_worker[0] * 1.1}
        self.figures["Many workers: driver CPU per commit (ms)"] = {
            f"{w} workers": points[w]["commit_cpu_ms"] for w in sizes}
        self.figures["Many workers: iteration latency p99 past the first tenth (ms)"] = {
            **{f"{w} workers": points[w]["latency_p99_steady_ms"] for w in sizes},
            f"p99 of all at {sizes[-1]}": largest["latency_p99_ms"],
            f"median at {sizes[-1]}": largest["latency_median_ms"],
            f"growth at {sizes[-1]}": largest["latency_growth"],
            "goal": f"<= 100 at {sizes[-1]}, no backlog",
            "met": largest["latency_p99_steady_ms"] <= 100 and largest["latency_growth"] <= 1.5}


def timed_puts(path: str, options: dict, count: int, gap_s: float = 0.0) -> list[float]:
    """``s3fs.put_file`` of ``path``, timed ``count`` times, in this process, each followed by
    ``gap_s`` of quiet (as a loop's checkpoints are by its training)."""
    import s3fs

    fs = s3fs.S3FileSystem(**options, skip_instance_cache=True)
    times = []
    for i in range(count):
        began = time.time()
        fs.put_file(path, f"bench/raw/{os.getpid()}-{i}.pt")
        times.append(time.time() - began)
        time.sleep(gap_s)
    return times


#: The same in a Ray worker: a task with one CPU, where a rank runs.
raw_puts = ray.remote(num_cpus=1)(timed_puts)


def profile_upload(path: str, options: dict) -> list[str]:
    """Where an upload's time goes: cProfile of one sync persistence of the same file."""
    from prefect_distrain.checkpoints.storage import RunStorage

    folder = tempfile.mkdtemp()
    shutil.copy(path, os.path.join(folder, "state.pt"))
    storage = RunStorage("s3://bench/profile", f"p-{time.time_ns()}", options)
    profiler = cProfile.Profile()
    profiler.enable()
    storage.upload(folder, index=1, attempt=0, rank=0)
    profiler.disable()
    out = io.StringIO()
    pstats.Stats(profiler, stream=out).sort_stats("cumulative").print_stats(12)
    shutil.rmtree(folder)
    return [line for line in out.getvalue().splitlines() if line.strip()][-14:]


def start_moto() -> tuple[subprocess.Popen, str]:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    server = subprocess.Popen([os.path.join(os.path.dirname(sys.executable), "moto_server"),
                               "-H", "127.0.0.1", "-p", str(port)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    endpoint = f"http://127.0.0.1:{port}"
    for _ in range(100):
        try:
            urllib.request.urlopen(endpoint + "/moto-api/", timeout=1)
            break
        except OSError:
            time.sleep(0.1)
    import s3fs

    s3fs.S3FileSystem(key="bench", secret="bench", client_kwargs={"endpoint_url": endpoint},
                      skip_instance_cache=True).mkdir("bench")
    return server, endpoint


def show(figures: dict, machine: dict) -> str:
    return (f"machine: {machine['cpus']} CPUs, {machine['platform']}, python "
            f"{machine['python']}\n\n{table(figures)}")


def table(figures: dict) -> str:
    """The figures as a markdown table, each with its goal and met / NOT met."""
    lines = ["| figure | value | goal |", "|---|---|---|"]
    for name, figure in figures.items():
        if "median" in figure:
            value = (f"{figure['median']:.3f} (min {figure['min']:.3f}, "
                     f"max {figure['max']:.3f}, n={figure['runs']})")
        elif "ratio" in figure:
            value = f"{figure['ratio']:.3f}"
            extra = {k: v for k, v in figure.items() if k.endswith("MB/s")}
            value += "".join(f", {k} {v:.1f}" for k, v in extra.items())
        elif "overhead" in figure:
            value = f"{figure['overhead']:.3f}"
        else:
            value = ", ".join(f"{k}: {v:.2f}" for k, v in figure.items()
                              if k not in ("goal", "met", "note"))
        goal = figure.get("goal", "")
        if goal:
            goal += " met" if figure.get("met") else " NOT met"
        lines.append(f"| {name} | {value} | {goal} |")
    return "\n".join(lines)


TABLE_START, TABLE_END = "<!-- results: start -->", "<!-- results: end -->"


def write_readme(readme: str, figures: dict, machine: dict) -> None:
    """Replace the README's results table (between its markers) with this run's, so the table
    and results.json always come from the same run."""
    import importlib.metadata as metadata

    versions = ", ".join(f"{name} {metadata.version(name)}"
                         for name in ("torch", "prefect", "moto", "s3fs"))
    block = "\n".join([
        TABLE_START,
        f"Run on {time.strftime('%Y-%m-%d', time.gmtime())} with `python benchmarks/run.py` "
        f"({machine['repeat']} runs per figure); {machine['cpus']} CPUs, "
        f"{machine['platform']}, python {machine['python']}, Ray {machine['ray']} local with 4 "
        f"logical CPUs, {versions}. The raw numbers are in [results.json](results.json).",
        "", table(figures), TABLE_END])
    with open(readme) as handle:
        text = handle.read()
    if TABLE_START not in text or TABLE_END not in text:
        raise SystemExit(f"{readme} has no results markers ({TABLE_START} ... {TABLE_END})")
    head, rest = text.split(TABLE_START, 1)
    with open(readme, "w") as handle:
        handle.write(head + block + rest.split(TABLE_END, 1)[1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="every scenario once, small")
    parser.add_argument("--repeat", type=int, default=None, help="runs per figure (default 5)")
    parser.add_argument("--out", default=os.path.join(HERE, "results.json"))
    parser.add_argument("--prefect-api", default="",
                        help="a running Prefect API for the flows (default: a temporary server)")
    parser.add_argument("--readme", default=os.path.join(HERE, "README.md"),
                        help="the README whose results table a full run rewrites ('' for none)")
    args = parser.parse_args()
    repeat = args.repeat or (1 if args.quick else 5)
    workdir = tempfile.mkdtemp(prefix="prefect-distrain-bench-")
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    ray.init(address="local", num_cpus=4, include_dashboard=False, log_to_driver=False)
    moto, endpoint = start_moto()
    bench = Bench(args.quick, repeat, workdir, args.prefect_api)
    chart_path = os.path.join(os.path.dirname(os.path.abspath(args.out)), "many_workers.svg")
    scenarios = [bench.end_to_end, bench.step_overhead, bench.validation_cost,
                 lambda: bench.checkpoints(endpoint),
                 lambda: bench.ray_train_side_by_side(endpoint), lambda: bench.memory(endpoint),
                 bench.recovery, bench.prefect_overhead, bench.scaling,
                 lambda: bench.many_workers(chart_path)]
    failed = []
    try:
        for number, scenario in enumerate(scenarios, 1):
            began = time.time()
            try:
                scenario()
            except Exception:  # noqa: BLE001 - the other scenarios still run; exit 1 below
                traceback.print_exc()
                failed.append(number)
            print(f"scenario {number} of {len(scenarios)}: {time.time() - began:.1f} s"
                  f"{' (FAILED)' if number in failed else ''}", flush=True)
    finally:
        moto.terminate()
        moto.wait(timeout=10)
        ray.shutdown()
        shutil.rmtree(workdir, ignore_errors=True)
    machine = {"cpus": os.cpu_count(), "platform": platform.platform(),
               "python": platform.python_version(), "ray": ray.__version__,
               "quick": args.quick, "repeat": repeat}
    with open(args.out, "w") as handle:
        json.dump({"machine": machine, "figures": bench.figures}, handle, indent=1, default=str)
    print(show(bench.figures, machine))
    for name, figure in bench.figures.items():
        for line in figure.get("profile", []):
            print(f"  {name} profile: {line}")
    if failed:  # the README's table stays whole: it is rewritten only by a full run
        raise SystemExit(f"scenarios {failed} failed (tracebacks above)")
    if not args.quick and args.readme:
        write_readme(args.readme, bench.figures, machine)


if __name__ == "__main__":
    main()
