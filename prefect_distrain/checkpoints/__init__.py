"""The checkpoints room: where a run's checkpoints live and who decides about them.

``manager`` (the lifecycle: commit, retention, latest, best, resume point, torn folders),
``manifest`` (the typed, validated record that makes a checkpoint exist), ``ledger`` (the
attempts), ``lease`` (one writer per run), ``storage`` (plain I/O on the run's folder),
``checkpoint`` (the ``Checkpoint`` value) and ``fs`` (the leaf: filesystem lookup, redaction,
hashing, atomic and exclusive writes). Arrows point down that list; nothing here imports Ray.
"""
