"""Who may read the audit trail and who may label responses.

The audit page (``GET /audit``) shows stored prompts and completions; feedback (``POST /v1/feedback``) moves the
calibration figures and the confident-wrong alert. Both are closed unless the configuration opens them:

==========================  ====================================  =============================================
configured                  ``/audit`` (page and its data)        ``/v1/feedback``
==========================  ====================================  =============================================
``admin_keys``              an admin key                          an admin key or a client key (``api_keys``)
``api_keys`` only           a client key                          a client key
neither                     loopback clients only                 loopback clients only
neither, ``audit.public``   anyone                                anyone
==========================  ====================================  =============================================

Feedback takes a client key because the application that received a response is the one that learns whether it was
right; a client key never opens the page, which holds every client's text. Keys come as ``Authorization: Bearer``;
the page also takes HTTP Basic with the key as password, so a browser can log in. Keys are compared with
``hmac.compare_digest`` against every configured key, so the time taken does not say which one nearly matched.

"Loopback" is the address the server saw (uvicorn puts a trusted ``X-Forwarded-For`` there, by default only from
127.0.0.1). A reverse proxy or mesh sidecar on the same host that does not send ``X-Forwarded-For`` makes every
client look local: such deployments set keys.
"""

from __future__ import annotations

import base64
import binascii
import hmac
import ipaddress
from collections.abc import Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from starlette.requests import Request

from .errors import ProxyError, Unauthorized

if TYPE_CHECKING:
    from .settings import Settings

BASIC_REALM = 'Basic realm="entropy-proxy audit"'


class LoopbackOnly(ProxyError):
    status = 403
    type = "invalid_request_error"
    code = "loopback_only"


def is_loopback_host(host: str | None) -> bool:
    if not host:
        return False
    try:
        addr = ipaddress.ip_address(host)
    except ValueError:
        return False  # a name, not an address: uvicorn always gives the peer's address
    mapped = getattr(addr, "ipv4_mapped", None)
    return bool((mapped or addr).is_loopback)


def _key_in(presented: str, keys: Iterable[str]) -> bool:
    ok = False
    for k in keys:  # every key compared: the time taken does not say which one matched
        ok |= hmac.compare_digest(presented.encode(), k.encode())
    return ok and bool(presented)


def presented_key(request: Request, *, allow_basic: bool = False) -> str:
    """The key in ``Authorization: Bearer <key>`` (or the password of HTTP Basic when allowed); '' if none."""
    scheme, _, value = request.headers.get("authorization", "").partition(" ")
    value = value.strip()
    if scheme.lower() == "bearer":
        return value
    if allow_basic and scheme.lower() == "basic" and value:
        try:
            return base64.b64decode(value, validate=True).decode().partition(":")[2]
        except (binascii.Error, UnicodeDecodeError):
            return ""
    return ""


@dataclass(frozen=True)
class Access:
    api_keys: tuple[str, ...] = ()
    admin_keys: tuple[str, ...] = ()
    public: bool = False

    @classmethod
    def from_settings(cls, settings: Settings) -> Access:
        return cls(tuple(settings.api_keys), tuple(settings.admin_keys), settings.audit.public)

    def check_read(self, request: Request, *, allow_basic: bool = False) -> None:
        """The audit page and its data: an admin key, else a client key, else loopback (or ``audit.public``)."""
        keys = self.admin_keys or self.api_keys
        what = "an admin key" if self.admin_keys else "an API key"
        self._check(request, keys, what, allow_basic)

    def check_label(self, request: Request) -> None:
        """Feedback: any admin or client key when keys are set, else loopback (or ``audit.public``)."""
        keys = self.admin_keys + self.api_keys
        what = "an API key or an admin key" if self.admin_keys and self.api_keys else (
            "an admin key" if self.admin_keys else "an API key")
        self._check(request, keys, what, False)

    def _check(self, request: Request, keys: tuple[str, ...], what: str, allow_basic: bool) -> None:
        if keys:
            if not _key_in(presented_key(request, allow_basic=allow_basic), keys):
                raise Unauthorized(f"{what} is required: send Authorization: Bearer <key>")
            return
        if self.public or is_loopback_host(_client_host(request)):
            return
        raise LoopbackOnly(
            "the audit trail answers only loopback clients while no api_keys or admin_keys are set; set "
            "admin_keys (or audit.public: true to open it to every client that can reach the proxy)"
        )


def _client_host(request: Request) -> str | None:
    client: Any = request.client
    return client.host if client is not None else None


def require_client_key(settings: Settings) -> Any:
    """A FastAPI dependency for read-only ``/v1`` routes outside the catch-all: with ``api_keys`` set they need a
    client or an admin key, like every other ``/v1`` route; without, they are open (they carry no text)."""
    keys = tuple(settings.api_keys) + (tuple(settings.admin_keys) if settings.api_keys else ())

    def dependency(request: Request) -> None:
        if keys and not _key_in(presented_key(request), keys):
            raise Unauthorized("Incorrect or missing API key. Send it as 'Authorization: Bearer <key>'.")

    return dependency
