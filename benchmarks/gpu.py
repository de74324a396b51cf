"""The GPU figures, in one run of a few minutes on a CUDA machine:

- the step time with ``report()`` every step over plain torchrun DDP on the same bf16 model
  (goal <= 1.02);
- how much time an async checkpoint of the model's and optimizer's state (>= 4 GB on the GPU)
  costs the loop: from the save to the end of the next step, less a step (goal <= 0.1 s). Ours
  with ``Checkpoint.from_dict(state, background=True)`` (copies into pinned memory queued on
  the loop's stream: the next step runs after them), beside ours with the files written in the
  loop and PyTorch DCP's ``async_save`` with its pinned-memory stager, on the same state in the
  same worker.

    python benchmarks/gpu.py                         # every GPU of the machine, full size
    python benchmarks/gpu.py --device cpu --quick    # the same code on the CPU, small: it runs
    python benchmarks/gpu.py --device cpu --size cpu --workers 1   # 0.8 GB of state on the CPU

Prints the table and writes JSON (``--out``); benchmarks/README.md records the figures by date.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
#: (width, layers, batch rows, timed steps) of the model: 8 x 8192^2 is 537M parameters,
#: 2.1 GB in fp32, 6.4 GB with AdamW's state; a step keeps an H200 busy for about 0.1 s.
SIZES = {"full": (8192, 8, 16384, 30), "quick": (256, 2, 64, 10), "cpu": (4096, 4, 32, 5)}


def build(config: dict, device):
    """The model (fp32 weights, bf16 autocast), its AdamW, and one training step."""
    import torch

    width, layers, rows, _ = config["size"]
    torch.manual_seed(0)
    blocks = []
    for _ in range(layers):
        blocks += [torch.nn.Linear(width, width), torch.nn.GELU()]
    model = torch.nn.Sequential(*blocks)
    x = torch.randn(rows, width, device=device)
    y = torch.randn(rows, width, device=device)

    def step(wrapped, optimizer) -> float:
        optimizer.zero_grad(set_to_none=True)
        with torch.autocast(device.type, dtype=torch.bfloat16):
            loss = torch.nn.functional.mse_loss(wrapped(x).float(), y)
        loss.backward()
        optimizer.step()
        return loss.item()  # both sides read the loss (to log it), which syncs the step

    return model, step


def timed_steps(step, wrapped, optimizer, steps: int, each=None) -> float:
    """Seconds per step after 5 warm-up steps; ``each(loss)`` after every timed step."""
    for _ in range(5):
        step(wrapped, optimizer)
    began = time.perf_counter()
    for _ in range(steps):
        loss = step(wrapped, optimizer)
        if each is not None:
            each(loss)
    return (time.perf_counter() - began) / steps


def ours_loop(config):
    """Under prefect-distrain: the steps with a report each, then the checkpoints' cost to the
    loop, three ways on the same state."""
    import torch

    import prefect_distrain as pd
    from prefect_distrain.session import current_session

    device = pd.torch.get_device()
    model, step = build(config, device)
    wrapped = pd.torch.prepare_model(model)
    optimizer = torch.optim.AdamW(wrapped.parameters(), lr=1e-4)
    per_step = timed_steps(step, wrapped, optimizer, config["size"][3],
                           each=lambda loss: pd.report({"loss": loss}))
    state = {"model": model.state_dict(), "optimizer": optimizer.state_dict()}
    state_gb = sum(t.numel() * t.element_size() for t in _tensors(state)) / 1e9
    uploads = current_session().uploader
    lost: dict[str, list] = {name: [] for name in VARIANTS}
    returned: list[float] = []  # background: until report() returned
    errors: list[str] = []
    stagers: dict = {}  # DCP's stager and group, kept from save to save as ours are
    for index in range(config["checkpoints"]):
        for name in VARIANTS:
            uploads.wait()  # the last checkpoint is written and up: checkpoints far apart
            step(wrapped, optimizer)
            began = time.perf_counter()
            if name == "dcp async_save":
                saving = dcp_start(state, errors, stagers)
            else:
                checkpoint = pd.Checkpoint.from_dict(state, background=name == "background")
                pd.report({"checkpoint": index}, checkpoint=checkpoint)
                if name == "background":
                    returned.append(time.perf_counter() - began)
            step(wrapped, optimizer)  # reads the loss: the copies queued before it are done
            lost[name].append(time.perf_counter() - began - per_step)
            if name == "dcp async_save":
                if saving is None:
                    lost[name].pop()
                else:
                    dcp_finish(*saving)
            elif name == "written in the loop":
                shutil.rmtree(checkpoint.path, ignore_errors=True)
    uploads.wait()
    if "dcp" in stagers:
        stagers["dcp"].close()
    return {"per_step": per_step, "state_gb": state_gb, "lost": lost, "returned": returned,
            "device": str(device), "gpu": _gpu_name(), "errors": errors}


#: The ways the loop checkpoints its state: ours with the files written in a thread from a host
#: copy, ours with the files written before ``report`` returns, and PyTorch DCP's async save.
VARIANTS = ("background", "written in the loop", "dcp async_save")


def dcp_start(state: dict, errors: list[str], stagers: dict) -> tuple | None:
    """DCP's async save of ``state`` with its default stager (pinned memory and a side stream
    on a GPU; one for every save, in ``stagers``), waited for until its staging is done (the
    state may change again); None, with the error in ``errors``, if it could not run here."""
    import torch
    import torch.distributed as dist
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.staging import DefaultStager, StagingOptions

    cuda = torch.cuda.is_available()  # its non-blocking copies and async staging need one
    folder = tempfile.mkdtemp(prefix="dcp-")
    try:
        if "dcp" not in stagers:
            stagers["dcp"] = DefaultStager(StagingOptions(cuda, False, cuda, cuda))
            # Its own group, as DCP's docs advise: its writer's collectives run beside the
            # loop's next step, whose all-reduce is on the default group.
            stagers["group"] = dist.new_group(backend="gloo")
        response = dcp.async_save(state, checkpoint_id=folder, async_stager=stagers["dcp"],
                                  process_group=stagers["group"],
                                  no_dist=dist.get_world_size() == 1)
        staged = getattr(response, "staging_completion", None)
        if staged is not None:
            staged.result()
        return folder, response
    except Exception as error:  # noqa: BLE001 - the anchor, not ours: say why, go on
        errors.append(repr(error)[:500])
        shutil.rmtree(folder, ignore_errors=True)
        return None


def dcp_finish(folder: str, response) -> None:
    """Until DCP's save is written, then its folder removed."""
    try:
        getattr(response, "upload_completion", response).result()
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def torchrun_job(config_path: str) -> None:
    """Under ``torchrun``: the same model and steps in plain DDP; rank 0 writes its step time."""
    import torch
    import torch.distributed as dist

    with open(config_path) as handle:
        config = json.load(handle)
    cuda = config["device"] == "cuda"
    dist.init_process_group("nccl" if cuda else "gloo")
    local_rank = int(os.environ["LOCAL_RANK"])
    device = torch.device(f"cuda:{local_rank}" if cuda else "cpu")
    if cuda:
        torch.cuda.set_device(device)
    model, step = build(config, device)
    wrapped = torch.nn.parallel.DistributedDataParallel(
        model.to(device), device_ids=[local_rank] if cuda else None)
    optimizer = torch.optim.AdamW(wrapped.parameters(), lr=1e-4)
    per_step = timed_steps(step, wrapped, optimizer, config["size"][3])
    if dist.get_rank() == 0:
        with open(config["out"], "w") as handle:
            json.dump({"per_step": per_step}, handle)
    dist.destroy_process_group()


def _tensors(value):
    import torch

    if isinstance(value, torch.Tensor):
        yield value
    elif isinstance(value, dict):
        for item in value.values():
            yield from _tensors(item)
    elif isinstance(value, (list, tuple)):
        for item in value:
            yield from _tensors(item)


def _gpu_name() -> str:
    import torch

    return torch.cuda.get_device_name() if torch.cuda.is_available() else ""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    parser.add_argument("--quick", action="store_true", help="small sizes (a check that it runs)")
    parser.add_argument("--size", choices=sorted(SIZES), help="default: full, or quick with "
                        "--quick; cpu is 67M parameters (0.8 GB of state with AdamW's)")
    parser.add_argument("--workers", type=int, default=0, help="default: every GPU, or 2 CPUs")
    parser.add_argument("--out", default=os.path.join(HERE, "gpu_results.json"))
    args = parser.parse_args()
    import ray
    import torch
    from run import spread, table

    import prefect_distrain as pd

    cuda = args.device == "cuda"
    if cuda and not torch.cuda.is_available():
        raise SystemExit("no CUDA GPU here: run with --device cpu --quick to check the script")
    workers = args.workers or (torch.cuda.device_count() if cuda else 2)
    size = args.size or ("quick" if args.quick else "full")
    config = {"size": SIZES[size], "device": args.device,
              "checkpoints": 2 if size == "quick" else 3}
    workdir = tempfile.mkdtemp(prefix="prefect-distrain-gpu-")
    try:
        config["out"] = os.path.join(workdir, "torchrun.json")
        with open(os.path.join(workdir, "config.json"), "w") as handle:
            json.dump(config, handle)
        torchrun = os.path.join(os.path.dirname(sys.executable), "torchrun")
        for tries in (1, 2):  # torchrun --standalone picks a free port, then binds it: a
            done = subprocess.run(  # process starting meanwhile may take it
                [torchrun, "--standalone", "--nproc-per-node", str(workers), __file__,
                 "--torchrun-job", os.path.join(workdir, "config.json")],
                capture_output=True, text=True, timeout=600)
            if done.returncode == 0:
                break
            print(f"torchrun failed ({done.returncode}):\n{done.stderr[-3000:]}", flush=True)
            if tries == 2:
                raise SystemExit("torchrun failed twice (its output above)")
        with open(config["out"]) as handle:
            theirs = json.load(handle)["per_step"]
        ray.init(address="local", num_cpus=max(os.cpu_count() or 2, workers),
                 include_dashboard=False, log_to_driver=False)
        scaling = pd.ScalingConfig(num_workers=workers, use_gpu=cuda)
        run = pd.RunConfig(name="gpu", storage=os.path.join(workdir, "runs"))
        with pd.Trainer(scaling=scaling, run=run, checkpoint=pd.CheckpointConfig(
                num_to_keep=1, upload="async")) as trainer:
            ours = trainer.fit(ours_loop, config=config).worker_results[0]
    finally:
        if ray.is_initialized():
            ray.shutdown()
        shutil.rmtree(workdir, ignore_errors=True)
    ratio = ours["per_step"] / theirs
    background = ours["lost"]["background"]
    figures = {
        "GPU step, torchrun DDP (s)": spread([theirs]),
        "GPU step with report() every step (s)": spread([ours["per_step"]]),
        "GPU step with report / torchrun DDP": {"ratio": ratio, "goal": "<= 1.02",
                                                "met": ratio <= 1.02},
        f"GPU async checkpoint stall, {ours['state_gb']:.2f} GB, background write (s)": {
            **spread(background), "goal": "<= 0.1 s",
            "met": statistics.median(background) <= 0.1},
        "  of it until report() returned (s)": spread(ours["returned"]),
        "GPU async checkpoint stall, files written in the loop (s)": spread(
            ours["lost"]["written in the loop"]),
    }
    if ours["lost"]["dcp async_save"]:
        figures["GPU DCP async_save stall, same state (s)"] = spread(
            ours["lost"]["dcp async_save"])
    machine = {"device": ours["device"], "gpu": ours["gpu"], "workers": workers,
               "size": size, "torch": torch.__version__, "ray": ray.__version__,
               "python": platform.python_version(), "date": time.strftime("%Y-%m-%d")}
    with open(args.out, "w") as handle:
        json.dump({"machine": machine, "figures": figures}, handle, indent=1)
    for error in sorted(set(ours["errors"])):
        print(f"DCP async_save could not run: {error}")
    print(f"{workers} x {ours['gpu'] or ours['device']}, torch {torch.__version__}\n")
    print(table(figures))


if __name__ == "__main__":
    if sys.argv[1:2] == ["--torchrun-job"]:
        torchrun_job(sys.argv[2])
    else:
        main()
