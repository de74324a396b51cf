#!/usr/bin/env bash
# Creates .venv and installs prefect-distrain with its torch, s3, examples and test extras.
# torch goes first and the constraints file rides along on every pip call: any other request
# for torch would pull a CUDA build with several GB of NVIDIA packages on this CPU machine.
set -euo pipefail
cd "$(dirname "$0")/.."
python=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$python" -m venv .venv
pip=(.venv/bin/python -m pip install --quiet --progress-bar off -c constraints.txt)
"${pip[@]}" --upgrade pip
"${pip[@]}" torch
"${pip[@]}" -e ".[torch,s3,examples,test]"
.venv/bin/python -c "import prefect_distrain, torch, ray, prefect; print('installed: prefect-distrain', prefect_distrain.__version__, '| torch', torch.__version__, '| ray', ray.__version__, '| prefect', prefect.__version__)"
