#!/usr/bin/env bash
# Creates .venv and installs prefect-distrain with its torch, lightning, s3, examples, test,
# docs and benchmarks extras, TensorFlow (CPU) with tf-keras, and Horovod (install_horovod.sh);
# `install.sh quickstart`: torch and the examples' extras only (what flows/quickstart.py uses).
# torch goes first and the constraints file rides along on every pip call: any other request
# for torch would pull a CUDA build with several GB of NVIDIA packages on this CPU machine.
# TensorFlow comes as tensorflow-cpu; tf-keras declares a dependency on `tensorflow` (the other
# wheel of the same code), so it is installed without its dependencies. On a GPU machine,
# `pip install prefect-distrain[tensorflow]` (tensorflow + tf-keras) is the right thing instead.
set -euo pipefail
cd "$(dirname "$0")/.."
python=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$python" -m venv .venv
pip=(.venv/bin/python -m pip install --quiet --progress-bar off -c constraints.txt)
"${pip[@]}" --upgrade pip
"${pip[@]}" torch
if [ "${1:-all}" = quickstart ]; then  # what flows/quickstart.py uses, and nothing else
    "${pip[@]}" -e ".[torch,examples]"
    .venv/bin/python -c "import prefect_distrain, torch, ray, prefect; print('installed for the quickstart: prefect-distrain', prefect_distrain.__version__, '| torch', torch.__version__, '| ray', ray.__version__, '| prefect', prefect.__version__)"
    exit 0
fi
"${pip[@]}" -e ".[torch,lightning,s3,data,examples,test,benchmarks,docs]"
"${pip[@]}" tensorflow-cpu
"${pip[@]}" --no-deps tf-keras
PYTHON=.venv/bin/python bash scripts/install_horovod.sh
.venv/bin/python -c "import prefect_distrain, torch, ray, prefect; print('installed: prefect-distrain', prefect_distrain.__version__, '| torch', torch.__version__, '| ray', ray.__version__, '| prefect', prefect.__version__)"
TF_CPP_MIN_LOG_LEVEL=2 .venv/bin/python -c "import tensorflow as tf, tf_keras; print('installed: tensorflow', tf.__version__, '| tf-keras', tf_keras.__version__)"
