"""An S3 filesystem (s3fs, on the moto server) that fails the way S3 does: throttling and 503s
on some PUTs, credentials that expire, an endpoint that is gone. Protocol ``flakys3``.

The faults are chosen by storage options the wrapper takes out before s3fs sees them:
``fail_every=N`` (every N-th file upload of this process fails with 503 SlowDown, as botocore
raises it and s3fs translates it), ``expire_after=PATH`` (a client made before PATH existed
gets ExpiredToken: a fresh client has the new credentials), ``down=True`` (no connection).
Registered in every worker by the test Ray's setup hook, like ``flaky://``.
"""

from __future__ import annotations

import os
import threading

import fsspec
from botocore.exceptions import ClientError, EndpointConnectionError
from s3fs import S3FileSystem
from s3fs.errors import translate_boto_error


class FlakyS3FileSystem(S3FileSystem):
    protocol = ("flakys3",)
    puts = 0
    _lock = threading.Lock()

    def __init__(self, *args, fail_every: int | None = None, expire_after: str | None = None,
                 down: bool = False, **kwargs):
        self.fail_every, self.expire_after, self.down = fail_every, expire_after, down
        # Made before the rotation: its credentials are the old ones.
        self.stale = bool(expire_after) and not os.path.exists(expire_after)
        super().__init__(*args, **kwargs)

    async def _put_file(self, lpath, rpath, *args, **kwargs):
        if self.down:
            raise EndpointConnectionError(endpoint_url=str(self.client_kwargs.get(
                "endpoint_url")))
        if self.stale and os.path.exists(self.expire_after):
            raise translate_boto_error(ClientError(
                {"Error": {"Code": "ExpiredToken",
                           "Message": "The provided token has expired."},
                 "ResponseMetadata": {"HTTPStatusCode": 400}}, "PutObject"))
        with self._lock:
            type(self).puts += 1
            failing = self.fail_every and type(self).puts % self.fail_every == 0
        if failing:
            raise translate_boto_error(ClientError(
                {"Error": {"Code": "SlowDown", "Message": "Please reduce your request rate."},
                 "ResponseMetadata": {"HTTPStatusCode": 503}}, "PutObject"))
        return await super()._put_file(lpath, rpath, *args, **kwargs)


def register() -> None:
    fsspec.register_implementation("flakys3", FlakyS3FileSystem, clobber=True)
