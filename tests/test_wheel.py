"""The wheel installs: built from the tree, installed into a fresh venv (the dependencies borrowed
from this one), it imports from its own files, carries its package data and entry points, and
``prefect block register -m prefect_distrain.blocks`` registers its blocks."""

from __future__ import annotations

import os
import subprocess
import sys
import sysconfig
import zipfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run(*command: str, **kwargs) -> subprocess.CompletedProcess:
    done = subprocess.run(command, capture_output=True, text=True, timeout=600, **kwargs)
    assert done.returncode == 0, (command, done.stdout[-3000:], done.stderr[-3000:])
    return done


def test_the_wheel_installs_into_a_fresh_venv(tmp_path):
    run(sys.executable, "-m", "pip", "wheel", "--no-deps", "--quiet", "-w", str(tmp_path), ROOT)
    [wheel] = [p for p in tmp_path.iterdir() if p.suffix == ".whl"]
    names = zipfile.ZipFile(wheel).namelist()
    assert "prefect_distrain/py.typed" in names and "prefect_distrain/ray/train/torch.py" in names
    assert not any(n.startswith(("tests/", "benchmarks/")) for n in names)

    venv = tmp_path / "venv"
    run(sys.executable, "-m", "venv", str(venv))
    python = str(venv / "bin" / "python")
    site = run(python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])")
    # The dependencies come from this environment, after the venv's own site-packages; the
    # repository's editable install of prefect_distrain is not among them.
    ours = sysconfig.get_paths()["purelib"]
    with open(os.path.join(site.stdout.strip(), "borrowed.pth"), "w") as f:
        f.write(ours + "\n")
    run(python, "-m", "pip", "install", "--no-deps", "--quiet", str(wheel))

    check = run(python, "-c", (
        "import importlib.metadata as m, os, prefect_distrain as pd\n"
        "print(pd.__file__)\n"
        "print(sorted(e.value for e in m.entry_points(group='prefect.collections')))\n"
        "print(os.path.exists(os.path.join(os.path.dirname(pd.__file__), 'py.typed')))\n"),
        cwd=str(tmp_path))
    location, entry_points, typed = check.stdout.split("\n")[:3]
    assert location.startswith(str(venv)), location
    assert "prefect_distrain.blocks" in entry_points and typed == "True"
    cli = run(str(venv / "bin" / "prefect-distrain"), "--help", cwd=str(tmp_path))
    assert "checkpoints" in cli.stdout and "gc" in cli.stdout

    env = {**os.environ, "PREFECT_HOME": str(tmp_path / "prefect-home"),
           "PREFECT_SERVER_ANALYTICS_ENABLED": "false"}
    env.pop("PREFECT_API_URL", None)
    registered = run(python, "-m", "prefect", "block", "register", "-m",
                     "prefect_distrain.blocks", cwd=str(tmp_path), env=env)
    assert "Successfully registered 2 blocks" in registered.stdout, registered.stdout
