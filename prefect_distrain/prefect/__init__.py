"""The Prefect room: the ``train`` task (``tasks``), what Prefect shows (``artifacts``: links,
tables, progress, the summary, events) and prefect-ray's task runner (``ray_runner``). The only
room that imports Prefect; workers never do. (The blocks are ``prefect_distrain.blocks``.)
"""
