"""Integrations with the tools around training: ``data`` (Ray Data shards from datasets or
URLs), ``trackers`` (TensorBoard, MLflow, W&B as callbacks), ``tune`` (sweeps as flows) and
``schedulers`` (ASHA and the median rule, which stop a sweep's bad trials)."""
