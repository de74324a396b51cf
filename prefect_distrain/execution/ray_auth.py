"""Ray's token authentication (Ray 2.52+): a ``RayCluster`` block's token and mode, applied
only while connecting, and a refusal turned into an error that names the fix.

Ray reads ``RAY_AUTH_MODE`` and ``RAY_AUTH_TOKEN`` from the environment only and caches them in
the process on first use, so ``ray_auth`` sets them around the connection, restores the
environment after, and has Ray reload its cache (``reload_ray_auth``); the token never stays in
``os.environ`` and never reaches a log, an artifact, an event or an error message.
"""

from __future__ import annotations

import os
import re
import threading
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Iterator

from pydantic import SecretStr

from ..exceptions import ConfigurationError

#: The key of ``ray.init`` keyword arguments under which a ``RayCluster`` block passes its
#: ``RayAuth`` (``RayCluster.ray_init_arguments``); never given to ``ray.init`` itself.
AUTH_KEY = "distrain_auth"

_AUTH_MODE_ENV = "RAY_AUTH_MODE"
_AUTH_TOKEN_ENV = "RAY_AUTH_TOKEN"
_AUTH_TOKEN_PATH_ENV = "RAY_AUTH_TOKEN_PATH"
_DEFAULT_TOKEN_FILE = "~/.ray/auth_token"


@dataclass(frozen=True)
class RayAuth:
    """How to authenticate to a Ray cluster: ``mode`` is Ray's ``RAY_AUTH_MODE`` ("token",
    "disabled"; None: "token" when a token is given, else the environment's) and ``token`` its
    ``RAY_AUTH_TOKEN`` (None: Ray's own lookup). Its repr never shows the token."""

    mode: str | None = None
    token: SecretStr | None = None

    def __repr__(self) -> str:
        return f"RayAuth(mode={self.mode!r}, token={'***' if self.token else None})"

    def environment(self) -> dict[str, str]:
        """The variables Ray reads, as ``ray_auth`` sets them while connecting."""
        mode = self.mode or ("token" if self.token is not None else None)
        env = {_AUTH_MODE_ENV: mode} if mode else {}
        if self.token is not None:
            env[_AUTH_TOKEN_ENV] = self.token.get_secret_value()
        return env


def split_auth(init_kwargs: dict[str, Any] | None) -> tuple[dict[str, Any], RayAuth | None]:
    """(the ``ray.init`` keyword arguments without ``AUTH_KEY``, the ``RayAuth`` or None);
    ``init_kwargs`` is left as it is."""
    kwargs = dict(init_kwargs or {})
    auth = kwargs.pop(AUTH_KEY, None)
    if auth is not None and not isinstance(auth, RayAuth):
        raise ConfigurationError(
            f"init_kwargs[{AUTH_KEY!r}] must be a RayAuth (set by RayCluster blocks), got "
            f"{type(auth).__name__}")
    return kwargs, auth


def reload_ray_auth() -> None:
    """Make Ray read ``RAY_AUTH_MODE`` and its token afresh: it caches both in the process
    (its config and ``AuthenticationTokenLoader``) on first use. Only while not connected."""
    try:
        from ray._raylet import AuthenticationTokenLoader, Config
    except ImportError:  # an older Ray without token authentication: nothing to reload
        return
    Config.initialize("")  # the config first: a token reloaded meanwhile sees the new mode
    AuthenticationTokenLoader.instance().reset_cache()


@contextmanager
def ray_auth(auth: RayAuth | None) -> Iterator[None]:
    """While the block runs: Ray's auth settings of ``auth`` in ``os.environ`` (Ray 2.52+ reads
    them only from there: ``RAY_AUTH_MODE``, ``RAY_AUTH_TOKEN``), Ray's cached settings
    reloaded from it. After: the environment as it was. A connection made inside keeps
    working: Ray keeps the token it loaded in memory for its gRPC and HTTP calls. ``auth``
    None: the environment as it is (e.g. ``RAY_AUTH_MODE`` and ``RAY_AUTH_TOKEN`` exported by
    the user), reloaded."""
    changes = auth.environment() if auth is not None else {}
    saved = {name: os.environ.get(name) for name in changes}
    try:
        os.environ.update(changes)
        reload_ray_auth()
        yield
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


_AUTH_MARKERS = ("InvalidAuthToken", "AuthenticationError", "Authentication token is missing",
                 "UNAUTHENTICATED", "Unauthenticated")


def is_auth_failure(error: BaseException | None) -> bool:
    """Whether ``error`` (or an exception it was raised from) is Ray refusing the token."""
    seen = 0
    while error is not None and seen < 10:
        if type(error).__name__ == "AuthenticationError" \
                or any(marker in str(error) for marker in _AUTH_MARKERS):
            return True
        error = error.__cause__ or error.__context__
        seen += 1
    return False


def refused_for_auth(address: str, wait_s: float = 5.0) -> bool:
    """Whether the GCS at ``address`` (``host:port``) refuses this process's token: one
    connection attempt, which a token-auth cluster answers at once. Not for ``ray://`` or
    ``auto``; False when the answer takes longer than ``wait_s`` (``ray.init`` then finds
    out itself)."""
    if "://" in address or address in ("auto", "local") or ":" not in address:
        return False
    try:
        from ray._raylet import GcsClient
    except ImportError:
        return False
    if not token_found():  # Ray's client would abort the process (a failed RAY_CHECK)
        return False
    outcome: list[BaseException | None] = []

    def probe() -> None:
        try:
            GcsClient(address=address)
            outcome.append(None)
        except BaseException as error:  # noqa: BLE001 - looked at below
            outcome.append(error)

    thread = threading.Thread(target=probe, name="distrain-ray-auth-probe", daemon=True)
    thread.start()
    thread.join(wait_s)
    return bool(outcome) and is_auth_failure(outcome[0])


def token_found() -> bool:
    """False when token authentication is on in this process but Ray finds no token
    (``RAY_AUTH_TOKEN``, ``RAY_AUTH_TOKEN_PATH``, ``~/.ray/auth_token``)."""
    try:
        from ray._raylet import (
            AuthenticationMode,
            AuthenticationTokenLoader,
            get_authentication_mode,
        )
    except ImportError:
        return True
    if get_authentication_mode() != AuthenticationMode.TOKEN:
        return True
    try:
        return bool(AuthenticationTokenLoader.instance().has_token())
    except Exception:  # noqa: BLE001 - Ray raises AuthenticationError for "none found"
        return False


def redact_address(address: str | None) -> str | None:
    """``address`` without credentials: ``user:secret@`` and query values become ``***``."""
    if not address:
        return address
    shown = re.sub(r"^([a-zA-Z][\w+.-]*://)?[^/@?#]*@", lambda m: f"{m.group(1) or ''}***@",
                   address)
    return re.sub(r"([?&][^=&#]+=)[^&#]*", r"\1***", shown)


def auth_failure_message(address: str, auth: RayAuth | None) -> str:
    """What was sent, and the fix, for a cluster that refused this process's token (or that
    this process has no token for); never the token."""
    mode = os.environ.get(_AUTH_MODE_ENV)
    shown = redact_address(address)
    refused = f"The Ray cluster at {shown} refused the connection: it has token authentication on"
    if mode != "token":
        what = (f"{refused} and this process sent no token ({_AUTH_MODE_ENV} is "
                f"{repr(mode) if mode else 'not set'} here, not 'token')")
    elif auth is not None and auth.token is not None:
        what = f"{refused} and the RayCluster block's auth_token is not its token"
    elif os.environ.get(_AUTH_TOKEN_ENV):
        what = f"{refused} and the token in {_AUTH_TOKEN_ENV} is not its token"
    elif os.environ.get(_AUTH_TOKEN_PATH_ENV) and token_found():
        what = (f"{refused} and the token in the file that {_AUTH_TOKEN_PATH_ENV} names "
                f"({os.environ[_AUTH_TOKEN_PATH_ENV]}) is not its token")
    elif not token_found():
        what = (f"Cannot connect to the Ray cluster at {shown}: {_AUTH_MODE_ENV} is 'token' "
                f"here but Ray finds no token ({_AUTH_TOKEN_ENV}, the file {_AUTH_TOKEN_PATH_ENV} "
                f"names, {_DEFAULT_TOKEN_FILE}: none set, or unreadable or empty)")
    else:
        what = f"{refused} and this machine's {_DEFAULT_TOKEN_FILE} is not its token"
    return (
        f"{what}. Fix: set the RayCluster block's auth_token to the cluster's token (a secret; "
        f"auth_mode 'token' is then implied), or export {_AUTH_MODE_ENV}=token and "
        f"{_AUTH_TOKEN_ENV}=<token> (or {_AUTH_TOKEN_PATH_ENV}=<file holding it>) where the "
        f"flow runs. The token is on the head node: {_DEFAULT_TOKEN_FILE} of the user who ran "
        f"`ray start --head` (`ray get-auth-token` prints it there), unless the head was "
        f"started with {_AUTH_TOKEN_ENV} or {_AUTH_TOKEN_PATH_ENV}; on KubeRay, the "
        f"`auth_token` key of the RayCluster's auth Secret (`kubectl get secrets`; "
        f"authOptions.secretName if you gave one).")
