"""The driver's cost as the worker group grows: 2 to 64 workers reporting every 10 ms.

Each worker reports ``reports`` times on its own clock (no collective keeps the ranks in step),
each report carrying the time it was sent. A callback on the driver notes, per iteration, the
driver process's CPU time (every thread: the trainer's, Ray's) and the latency from the last
rank's report to the iteration reaching callbacks. The same with a tiny checkpoint with every
report gives the cost of a commit. ``chart`` draws both against the number of workers.
"""

from __future__ import annotations

import os
import statistics
import tempfile
import time

import prefect_distrain as pd

#: Sizes measured (logical CPUs on a local Ray: each worker takes a share of them).
SIZES = (2, 8, 32, 64)
#: Up to this size the workers run the torch backend (a gloo process group); beyond it no
#: backend (the driver does nothing per report that depends on the backend).
TORCH_UP_TO = 8


def reporting_loop(config):
    """``reports`` reports, one every ``interval_s`` on this rank's clock; with
    ``checkpoint_every``, rank 0 attaches a checkpoint of one small file every that many."""
    import prefect_distrain as pd

    rank = pd.get_context().get_world_rank()
    every = config.get("checkpoint_every")
    due = time.monotonic()
    for i in range(config["reports"]):
        due += config["interval_s"]
        time.sleep(max(0.0, due - time.monotonic()))
        if every and (i + 1) % every == 0:
            with tempfile.TemporaryDirectory() as folder:
                if rank == 0:
                    with open(os.path.join(folder, "state.bin"), "wb") as handle:
                        handle.write(b"\0" * 1024)
                pd.report({"i": i, "sent": time.time()},
                          checkpoint=pd.Checkpoint.from_directory(folder) if rank == 0 else None)
        else:
            pd.report({"i": i, "sent": time.time()})


class DriverCost(pd.TrainingCallback):
    """Per iteration on the driver: its process's CPU time, and the latency from the last
    rank's report to this callback."""

    def __init__(self):
        self.cpu: list[float] = []
        self.latency: list[float] = []

    def handle_result(self, results, training_iteration, **info):
        now = time.time()
        self.cpu.append(time.process_time())
        self.latency.append(now - max(r["sent"] for r in results))


def measure(workers: int, reports: int, interval_s: float, checkpoint_every: int | None,
            storage: str) -> dict[str, float]:
    """One run of ``workers`` workers: the driver's CPU per iteration (ms, past the first
    tenth) and the latency's median, p99 (all, and past the first tenth, while the group's
    start still competes) and growth (the last tenth's median over the first's: above 1 is a
    backlog)."""
    cost = DriverCost()
    backend = "torch" if workers <= TORCH_UP_TO else pd.BackendConfig()
    scaling = pd.ScalingConfig(num_workers=workers,
                               resources_per_worker={"CPU": min(1.0, 4 / workers)})
    run = pd.RunConfig(name=f"many-{workers}-{time.time_ns()}", storage=storage)
    with pd.Trainer(scaling=scaling, run=run, backend=backend) as trainer:
        trainer.fit(reporting_loop, callbacks=[cost], config={
            "reports": reports, "interval_s": interval_s, "checkpoint_every": checkpoint_every})
    tenth = max(1, len(cost.cpu) // 10)
    return {
        "cpu_ms": 1000 * (cost.cpu[-1] - cost.cpu[tenth]) / (len(cost.cpu) - 1 - tenth),
        "latency_median_ms": 1000 * statistics.median(cost.latency),
        "latency_p99_ms": 1000 * _p99(cost.latency),
        "latency_p99_steady_ms": 1000 * _p99(cost.latency[tenth:]),
        "latency_growth": statistics.median(cost.latency[-tenth:])
        / max(statistics.median(cost.latency[:tenth]), 1e-6),
    }


def _p99(values: list[float]) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(0.99 * len(ordered)))]


def chart(points: dict[int, dict[str, float]], path: str) -> None:
    """An SVG of the driver's CPU per iteration and p99 latency against the workers."""
    sizes = sorted(points)
    width, height, left, bottom = 640, 300, 60, 40
    series = [("driver CPU per report (ms)", "cpu_ms", "#1f77b4"),
              ("driver CPU per commit (ms)", "commit_cpu_ms", "#2ca02c"),
              ("iteration latency p99, past the first tenth (ms)", "latency_p99_steady_ms",
               "#d62728")]
    top = max(points[s].get(key, 0) for s in sizes for _, key, _ in series) * 1.15 or 1

    def x(size: int) -> float:
        span = max(len(sizes) - 1, 1)
        return left + (width - left - 20) * sizes.index(size) / span

    def y(value: float) -> float:
        return height - bottom - (height - bottom - 20) * value / top

    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
             f'font-family="sans-serif" font-size="12">',
             f'<rect width="{width}" height="{height}" fill="white"/>',
             f'<line x1="{left}" y1="{y(0)}" x2="{width - 20}" y2="{y(0)}" stroke="black"/>',
             f'<line x1="{left}" y1="20" x2="{left}" y2="{y(0)}" stroke="black"/>']
    for size in sizes:
        parts.append(f'<text x="{x(size)}" y="{height - bottom + 18}" '
                     f'text-anchor="middle">{size}</text>')
    for tick in (0, top / 2, top):
        parts.append(f'<text x="{left - 6}" y="{y(tick) + 4}" text-anchor="end">'
                     f'{tick:.1f}</text>')
    parts.append(f'<text x="{(width + left) / 2}" y="{height - 6}" text-anchor="middle">'
                 'workers</text>')
    for row, (label, key, colour) in enumerate(series):
        line = " ".join(f"{x(s):.1f},{y(points[s].get(key, 0)):.1f}" for s in sizes)
        parts.append(f'<polyline points="{line}" fill="none" stroke="{colour}" '
                     'stroke-width="2"/>')
        parts.extend(f'<circle cx="{x(s):.1f}" cy="{y(points[s].get(key, 0)):.1f}" r="3" '
                     f'fill="{colour}"/>' for s in sizes)
        parts.append(f'<text x="{left + 10}" y="{34 + 16 * row}" fill="{colour}">{label}</text>')
    parts.append("</svg>")
    with open(path, "w") as handle:
        handle.write("\n".join(parts) + "\n")
