"""Every error paragate sends, and the one envelope they are rendered in.

Code raises one of these; a single handler in ``app`` renders it as::

    {"error": {"message": str, "type": str, "param": str | null, "code": str}}

``code`` is always a string (OpenAI's convention, so ``openai`` SDK users can match on
``err.code``); vLLM's integer status is the HTTP status itself.

Hierarchy::

    GatewayError                      500 server_error / internal_error
    ├── InvalidRequest                400 invalid_request_error / invalid_value
    │   ├── RequestTooLarge           413 invalid_request_error / request_too_large
    │   ├── ReservationTooLarge       400 invalid_request_error / reservation_too_large
    │   ├── WrongModelType            400 invalid_request_error / wrong_model_type
    │   └── UnsupportedMediaType      415 invalid_request_error / unsupported_media_type
    ├── AuthenticationFailed          401 authentication_error / invalid_api_key
    ├── PermissionDenied              403 permission_error / permission_denied
    ├── NotFound                      404 invalid_request_error / not_found
    │   └── ModelNotFound             404 invalid_request_error / model_not_found
    ├── MethodNotAllowed              405 invalid_request_error / method_not_allowed
    ├── NotServed                     501 invalid_request_error / not_implemented
    ├── Conflict                      409 invalid_request_error / conflict
    ├── RateLimited                   429 rate_limit_error / rate_limit_exceeded
    │   ├── ConcurrencyLimited        429 rate_limit_error / concurrency_limit_exceeded
    │   └── BudgetExceeded            429 rate_limit_error / budget_exceeded
    ├── LimitsUnavailable             503 server_error / limits_unavailable
    ├── ViewTooOld                    503 server_error / control_plane_unavailable
    ├── ShuttingDown                  503 server_error / shutting_down
    ├── UpstreamRejected              4xx (vLLM's status, type and message) / upstream_error
    ├── UpstreamFailed                502 upstream_error / upstream_error
    ├── UpstreamUnavailable           503 upstream_error / upstream_unavailable
    └── UpstreamTimeout               504 upstream_error / upstream_timeout
"""

from __future__ import annotations

from typing import Any, ClassVar

import msgspec

__all__ = [
    "AuthenticationFailed",
    "BudgetExceeded",
    "ConcurrencyLimited",
    "Conflict",
    "GatewayError",
    "InvalidRequest",
    "LimitsUnavailable",
    "MethodNotAllowed",
    "ModelNotFound",
    "NoReplica",
    "NotFound",
    "NotServed",
    "PermissionDenied",
    "RateLimited",
    "RequestTooLarge",
    "ReservationTooLarge",
    "ShuttingDown",
    "UnsupportedMediaType",
    "UpstreamConnectTimeout",
    "UpstreamFailed",
    "UpstreamFirstByteTimeout",
    "UpstreamIdleTimeout",
    "UpstreamRejected",
    "UpstreamTimeout",
    "UpstreamTotalTimeout",
    "UpstreamUnavailable",
    "ViewTooOld",
    "WrongModelType",
]


class GatewayError(Exception):
    """Base of every error rendered to a client."""

    status: ClassVar[int] = 500
    type: ClassVar[str] = "server_error"
    default_code: ClassVar[str] = "internal_error"

    def __init__(
        self,
        message: str,
        *,
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.param = param
        self.code = code or self.default_code
        self.headers = headers or {}

    @property
    def http_status(self) -> int:
        return self.status

    @property
    def error_type(self) -> str:
        return self.type

    def body(self) -> dict[str, Any]:
        return {
            "error": {
                "message": self.message,
                "type": self.error_type,
                "param": self.param,
                "code": self.code,
            }
        }

    def render(self) -> bytes:
        return msgspec.json.encode(self.body())


class InvalidRequest(GatewayError):
    status = 400
    type = "invalid_request_error"
    default_code = "invalid_value"


class RequestTooLarge(InvalidRequest):
    status = 413
    default_code = "request_too_large"


class ReservationTooLarge(InvalidRequest):
    """A request whose worst case exceeds what a limit could ever admit (a per-minute
    capacity, a whole budget) or the model's cap on one request's tokens."""

    default_code = "reservation_too_large"


class WrongModelType(InvalidRequest):
    """A model asked for what its type does not serve: an embedding model for a
    completion, an LLM for embeddings."""

    default_code = "wrong_model_type"


class UnsupportedMediaType(InvalidRequest):
    status = 415
    default_code = "unsupported_media_type"


class AuthenticationFailed(GatewayError):
    status = 401
    type = "authentication_error"
    default_code = "invalid_api_key"

    def __init__(self, message: str) -> None:
        super().__init__(message, headers={"www-authenticate": "Bearer"})


class PermissionDenied(GatewayError):
    status = 403
    type = "permission_error"
    default_code = "permission_denied"


class NotFound(GatewayError):
    status = 404
    type = "invalid_request_error"
    default_code = "not_found"


class ModelNotFound(NotFound):
    default_code = "model_not_found"

    def __init__(self, model: str) -> None:
        super().__init__(
            f"The model '{model}' does not exist or you do not have access to it.",
            param="model",
        )


class NotServed(GatewayError):
    """A path of Paradigm's API that this gateway does not serve (a missing feature,
    not a typo: that is 404)."""

    status = 501
    type = "invalid_request_error"
    default_code = "not_implemented"


class MethodNotAllowed(GatewayError):
    status = 405
    type = "invalid_request_error"
    default_code = "method_not_allowed"


class Conflict(GatewayError):
    """The change contradicts what exists: a duplicate email, a sixth active key."""

    status = 409
    type = "invalid_request_error"
    default_code = "conflict"


class ViewTooOld(GatewayError):
    """The store has been unreachable for longer than ``PARAGATE_MAX_VIEW_AGE``: the
    gateway no longer trusts its view of keys and models."""

    status = 503
    type = "server_error"
    default_code = "control_plane_unavailable"


class ShuttingDown(GatewayError):
    status = 503
    type = "server_error"
    default_code = "shutting_down"

    def __init__(self) -> None:
        super().__init__("The gateway is shutting down; retry the request.")


class RateLimited(GatewayError):
    status = 429
    type = "rate_limit_error"
    default_code = "rate_limit_exceeded"

    def __init__(self, message: str, retry_after: int,
                 headers: dict[str, str] | None = None) -> None:
        super().__init__(message, headers={"retry-after": str(retry_after), **(headers or {})})


class ConcurrencyLimited(RateLimited):
    default_code = "concurrency_limit_exceeded"


class BudgetExceeded(RateLimited):
    """A daily or monthly token budget cannot hold the request's reservation; the
    message says when it is whole again (``Retry-After`` too)."""

    default_code = "budget_exceeded"


class LimitsUnavailable(GatewayError):
    """Redis cannot be reached and ``PARAGATE_LIMITS_FAIL_MODE`` is ``closed``."""

    status = 503
    type = "server_error"
    default_code = "limits_unavailable"


class UpstreamRejected(GatewayError):
    """A 4xx from vLLM, relayed with vLLM's own status, type, message and param."""

    default_code = "upstream_error"

    def __init__(
        self, status: int, message: str, error_type: str, param: str | None = None
    ) -> None:
        super().__init__(message, param=param)
        self._status = status
        self._type = error_type

    @property
    def http_status(self) -> int:
        return self._status

    @property
    def error_type(self) -> str:
        return self._type


class UpstreamFailed(GatewayError):
    status = 502
    type = "upstream_error"
    default_code = "upstream_error"


class UpstreamUnavailable(GatewayError):
    status = 503
    type = "upstream_error"
    default_code = "upstream_unavailable"


class UpstreamTimeout(GatewayError):
    status = 504
    type = "upstream_error"
    default_code = "upstream_timeout"


class NoReplica(UpstreamUnavailable):
    """Every replica of the model is down (ejected), draining or disabled: answered at
    once rather than tried."""

    default_code = "no_healthy_replica"


class UpstreamConnectTimeout(UpstreamUnavailable):
    """No connection within the connect timeout (the model's, else the gateway's)."""

    default_code = "upstream_connect_timeout"


class UpstreamFirstByteTimeout(UpstreamTimeout):
    """Connected, but no answer headers within the first-byte timeout (for a request
    that does not stream, vLLM sends its headers when the whole answer is ready)."""

    default_code = "upstream_first_byte_timeout"


class UpstreamIdleTimeout(UpstreamTimeout):
    """An answer started, then nothing more for the idle timeout."""

    default_code = "upstream_idle_timeout"


class UpstreamTotalTimeout(UpstreamTimeout):
    """The model's total timeout ran out, counted from the first try."""

    default_code = "upstream_total_timeout"
