"""What Prefect's UI shows of a run's summary, seen in a real browser.

Starts ``prefect server start`` on a free port, trains a tiny flow against it, then opens the
run's summary artifact in headless Chromium: a screenshot (``ui_summary.png``) and the rendered
page, to check that the metrics chart is an image on the page (not a link to a file).

    python benchmarks/ui_screenshot.py [--out benchmarks] [--chromium /usr/bin/chromium]

Needs Chromium (Debian: ``apt-get install chromium``); prints what it found, exits 1 when the
chart is not rendered.
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request

FLOW = '''
import prefect_distrain as pd
from prefect import flow

def loop():
    for step in range(8):
        pd.report({"loss": 1.0 / (step + 1), "accuracy": step / 8})

@flow
def ui_check(storage):
    return pd.train(loop, scaling=pd.ScalingConfig(num_workers=1),
                    run=pd.RunConfig(name="ui-check", storage=storage))

if __name__ == "__main__":
    import sys
    ui_check(sys.argv[1])
'''


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_for(url: str, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            urllib.request.urlopen(url, timeout=2)
            return
        except OSError:
            time.sleep(0.5)
    raise TimeoutError(f"{url} did not answer within {timeout:g} s")


def chromium(binary: str, *args: str) -> subprocess.CompletedProcess:
    profile = tempfile.mkdtemp(prefix="chromium-")
    try:
        return subprocess.run(
            [binary, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
             "--no-first-run", "--disable-background-networking", "--disable-component-update",
             "--disable-sync", f"--user-data-dir={profile}", "--window-size=1280,1400",
             "--virtual-time-budget=15000", *args],
            capture_output=True, text=True, timeout=120)
    finally:
        shutil.rmtree(profile, ignore_errors=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default=os.path.dirname(os.path.abspath(__file__)))
    parser.add_argument("--chromium", default=shutil.which("chromium") or "/usr/bin/chromium")
    args = parser.parse_args()
    os.makedirs(args.out, exist_ok=True)
    port = free_port()
    api = f"http://127.0.0.1:{port}/api"
    home = tempfile.mkdtemp(prefix="prefect-home-")
    env = {**os.environ, "PREFECT_HOME": home, "PREFECT_API_URL": api,
           "PREFECT_SERVER_ANALYTICS_ENABLED": "false"}
    server = subprocess.Popen([sys.executable, "-m", "prefect", "server", "start", "--host",
                               "127.0.0.1", "--port", str(port)], env=env,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                              start_new_session=True)
    try:
        wait_for(f"{api}/health", 120)
        script = os.path.join(home, "ui_check.py")
        with open(script, "w") as f:
            f.write(FLOW)
        subprocess.run([sys.executable, script, os.path.join(home, "runs")], env=env,
                       check=True, timeout=600)
        from prefect.client.orchestration import get_client
        from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey
        from prefect.settings import PREFECT_API_URL, temporary_settings

        with temporary_settings({PREFECT_API_URL: api}), get_client(sync_client=True) as client:
            [summary] = client.read_artifacts(artifact_filter=ArtifactFilter(
                key=ArtifactFilterKey(any_=["ui-check-summary"])))
        page = f"http://127.0.0.1:{port}/artifacts/artifact/{summary.id}"
        png = os.path.join(args.out, "ui_summary.png")
        chromium(args.chromium, f"--screenshot={png}", page)
        dom = chromium(args.chromium, "--dump-dom", page).stdout
        images = dom.count('src="data:image/svg+xml;base64,')
        print(f"summary artifact page: {page}")
        print(f"screenshot: {png} ({os.path.getsize(png) if os.path.exists(png) else 0} bytes)")
        print(f"inline chart images rendered on the page: {images}")
        return 0 if images else 1
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        server.wait(timeout=30)
        shutil.rmtree(home, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
