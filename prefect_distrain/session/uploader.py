"""A worker's checkpoint uploads, sync or async.

``"sync"``: the reported folder is copied into the run's storage before ``report`` goes on.
``"async"``: the files are moved into a staging folder beside them (a rename: instant, however
large; a copy where a rename can't, or where the files must stay) and one background thread per
rank uploads them; a failed upload is raised by the next report and at the end of the run.
Either way the report goes to the driver first (with the files' names), the upload after it.
Files that are not the training function's to give away are copied, never moved: a committed
checkpoint's (``get_checkpoint()``), anything in the run's storage. A checkpoint in remote
storage is downloaded (and verified) first.
"""

from __future__ import annotations

import os
import queue
import shutil
import tempfile
import threading
from dataclasses import dataclass, field
from typing import Callable

from ..checkpoints import background as background_writes
from ..checkpoints.checkpoint import Checkpoint
from ..checkpoints.fs import is_local
from ..checkpoints.storage import RunStorage, digests, local_files
from ..exceptions import ConfigurationError


@dataclass
class Staged:
    """A reported checkpoint ready to go up: its local folder (``ours``: ours to remove after)
    and the names of its files (reported to the driver before the upload)."""

    index: int
    folder: str
    ours: bool
    names: list[str] = field(default_factory=list)
    #: Its files' write in a thread (``from_dict(..., background=True)``): uploaded once done.
    write: background_writes.Write | None = None


class Uploader:
    """The uploads of one rank in one attempt. A rank above 0 of a group waits for the
    driver's plan before it uploads: which of its files a lower rank writes too (those it
    skips, and only tells their hashes)."""

    def __init__(self, storage: RunStorage, mode: str, rank: int, attempt: int,
                 outbox: queue.Queue, wait_for_plan: Callable[[int], list[str]] | None = None):
        self.storage, self.mode, self.rank, self.attempt = storage, mode, rank, attempt
        self.outbox = outbox
        self.wait_for_plan = wait_for_plan
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None
        #: Retries of this rank's uploads not yet told to the driver.
        self.retries = 0

    def stage(self, index: int, checkpoint: Checkpoint) -> Staged:
        """The local folder to upload and its file names. Async: the files moved (or copied)
        aside first, so the training function may write there again at once."""
        if self.mode == "async":
            self.wait()  # at most one upload in flight per rank
            self.raise_failed()
        write = background_writes.claim(checkpoint.path)
        if write is not None:  # a folder of ours, its names known before its files are written
            return Staged(index, os.path.abspath(checkpoint.path), True, list(write.names),
                          write)
        folder, ours = self._source(checkpoint)
        if self.mode == "async":
            if not ours:
                folder = take_files(folder, index, move=not (
                    checkpoint.manifest is not None or self.storage.contains(folder)))
                ours = True
        return Staged(index, folder, ours, [name for name, _ in local_files(folder)])

    def upload(self, staged: Staged) -> None:
        """Sync: upload now (a failure raises here). Async: in a background thread (a failure
        is raised by the next report and at the end). Either way a ``("persisted", ...)``
        message follows the upload."""
        if self.mode == "sync":
            self._upload(staged)
            return
        self._thread = threading.Thread(target=self._upload_in_background, args=(staged,),
                                        name=f"checkpoint-upload-{staged.index}", daemon=True)
        self._thread.start()

    def _upload(self, staged: Staged) -> None:
        try:
            if staged.write is not None:
                staged.write.wait(staged.folder)
            skip = self.wait_for_plan(staged.index) if self.wait_for_plan else []
            files = self.storage.upload(staged.folder, staged.index, self.attempt, self.rank,
                                        on_retry=self._retried, skip=skip)
            self.outbox.put(("persisted", {
                "index": staged.index, "files": files, "retries": self.take_retries(),
                "skipped": digests(staged.folder, skip, self.rank)}))
        finally:
            if staged.ours:
                shutil.rmtree(staged.folder, ignore_errors=True)

    def _retried(self) -> None:
        self.retries += 1

    def take_retries(self) -> int:
        """The retries since the last time they were taken (to go with a message)."""
        taken, self.retries = self.retries, 0
        return taken

    def wait(self) -> None:
        """Until the upload in flight (if any) has ended."""
        if self._thread is not None:
            self._thread.join()
            self._thread = None

    def raise_failed(self) -> None:
        error, self._error = self._error, None
        if error is not None:
            raise error

    def _source(self, checkpoint: Checkpoint) -> tuple[str, bool]:
        """The local folder to upload from, and whether it is a copy of our own."""
        fs, path = checkpoint.location()
        if not is_local(fs):
            return checkpoint.to_directory(tempfile.mkdtemp(prefix="checkpoint-source-")), True
        if not os.path.isdir(path):
            raise ConfigurationError(
                f"report(checkpoint=...): {path!r} is not a directory. Write the files into a "
                "folder and pass Checkpoint.from_directory(folder)")
        return path, False

    def _upload_in_background(self, staged: Staged) -> None:
        try:
            self._upload(staged)
        except BaseException as error:  # noqa: BLE001 - raised by the next report() / finish()
            self._error = error


def take_files(folder: str, index: int, move: bool = True) -> str:
    """Move the reported files to a staging folder beside them (a rename: instant, however
    large), or copy them when they must stay (``move=False``) or a rename can't move them
    (another filesystem, no write access). Either way, what the training function writes
    there next can't change the checkpoint."""
    source = os.path.abspath(folder)
    staged = None
    if move:
        try:
            staged = tempfile.mkdtemp(prefix=f".checkpoint-{index}-",
                                      dir=os.path.dirname(source))
        except OSError:
            pass
    staged = staged or tempfile.mkdtemp(prefix=f"checkpoint-{index}-")
    for name in os.listdir(source):
        src, dst = os.path.join(source, name), os.path.join(staged, name)
        try:
            if not move:
                raise OSError("copied, not moved")
            os.rename(src, dst)
        except OSError:
            if os.path.isdir(src):
                shutil.copytree(src, dst)
            else:
                shutil.copy2(src, dst)
    return staged
