"""SIGTERM to the driver while it trains (a pod evicted, a flow run cancelled, a node drained):
the run commits what is in flight and ends resumable, then the process does what SIGTERM would
have made it do.

```python
with sigterm_ends_gracefully(logger) as heard:
    ...                     # heard() turns True at the first SIGTERM
```
Only the main thread may set a signal handler: elsewhere (a thread of a task runner) nothing
changes and ``heard()`` stays False. A second SIGTERM acts at once.
"""

from __future__ import annotations

import contextlib
import logging
import signal
import threading
from typing import Any, Callable, Iterator


@contextlib.contextmanager
def sigterm_ends_gracefully(logger: Any = None) -> Iterator[Callable[[], bool]]:
    heard = threading.Event()
    if threading.current_thread() is not threading.main_thread():
        yield heard.is_set
        return
    previous = signal.getsignal(signal.SIGTERM)

    def on_sigterm(signum: int, frame: Any) -> None:
        if heard.is_set():  # a second one: what the process did before, now
            signal.signal(signal.SIGTERM, previous)
            signal.raise_signal(signal.SIGTERM)
            return
        heard.set()
        (logger or logging.getLogger("prefect_distrain")).warning(
            "SIGTERM: the run commits what is in flight and ends, resumable (a second SIGTERM "
            "ends it at once)")

    signal.signal(signal.SIGTERM, on_sigterm)
    try:
        yield heard.is_set
    finally:
        signal.signal(signal.SIGTERM, previous)
        if heard.is_set():
            signal.raise_signal(signal.SIGTERM)
