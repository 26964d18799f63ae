"""The one error tree of llmfleet.

    FleetError                      (status, type, code, param, message, retry_after)
    ├── InvalidRequest              400 invalid_request_error
    ├── Unauthorized                401 invalid_api_key
    ├── Forbidden                   403 permission_denied (a key without the right)
    ├── NotFound                    404 invalid_request_error (routes)
    │   └── ModelNotFound           404 model_not_found
    ├── MethodNotAllowed            405
    ├── PayloadTooLarge             413
    ├── RateLimited                 429 (queue full, rate limits, budgets; Retry-After)
    ├── ServiceUnavailable          503 (no capacity in time, broker down; Retry-After)
    ├── GatewayTimeout              504 (deadline passed)
    ├── UpstreamError               502 (an engine's upstream failed)
    ├── EngineError                 any status an engine reports (upstream 4xx passes through)
    └── InternalError               500 (never carries internals)

Foreign exceptions (nats, httpx, msgspec) are translated at one seam per package with
`raise ... from exc`. Errors carry fields; `to_body()` builds the OpenAI envelope.
"""

from __future__ import annotations

import msgspec


class ErrorBody(msgspec.Struct, omit_defaults=False):
    """The OpenAI error object: `{"message", "type", "param", "code"}`."""

    message: str
    type: str = "invalid_request_error"
    param: str | None = None
    code: str | None = None


class ErrorEnvelope(msgspec.Struct):
    error: ErrorBody


class FleetError(Exception):
    status: int = 500
    type: str = "server_error"
    code: str | None = None
    headers: tuple[tuple[bytes, bytes], ...] = ()  # HTTP headers it adds (x-ratelimit-*)

    def __init__(
        self,
        message: str,
        *,
        param: str | None = None,
        code: str | None = None,
        retry_after: float | None = None,
        status: int | None = None,
        type: str | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.param = param
        if code is not None:
            self.code = code
        if status is not None:
            self.status = status
        if type is not None:
            self.type = type
        self.retry_after = retry_after

    def body(self) -> ErrorBody:
        return ErrorBody(message=self.message, type=self.type, param=self.param, code=self.code)

    @classmethod
    def from_body(
        cls, status: int, body: ErrorBody, retry_after: float | None = None
    ) -> FleetError:
        """Rebuild an error received over the wire (keeps status, type, code, Retry-After)."""
        return EngineError(
            body.message,
            param=body.param,
            code=body.code,
            status=status,
            type=body.type,
            retry_after=retry_after,
        )


class InvalidRequest(FleetError):
    status = 400
    type = "invalid_request_error"


class Unauthorized(FleetError):
    status = 401
    type = "invalid_request_error"  # what api.openai.com sends with invalid_api_key
    code = "invalid_api_key"


class Forbidden(FleetError):
    status = 403
    type = "invalid_request_error"
    code = "permission_denied"


class NotFound(FleetError):
    status = 404
    type = "invalid_request_error"
    code = "not_found"


class ModelNotFound(NotFound):
    code = "model_not_found"


class MethodNotAllowed(FleetError):
    status = 405
    type = "invalid_request_error"
    code = "method_not_allowed"


class PayloadTooLarge(FleetError):
    status = 413
    type = "invalid_request_error"
    code = "payload_too_large"


class RateLimited(FleetError):
    status = 429
    type = "rate_limit_error"
    code = "queue_full"


class ServiceUnavailable(FleetError):
    status = 503
    type = "server_error"
    code = "service_unavailable"


class GatewayTimeout(FleetError):
    status = 504
    type = "timeout_error"
    code = "deadline_exceeded"


class UpstreamError(FleetError):
    status = 502
    type = "server_error"
    code = "upstream_error"


class EngineError(FleetError):
    """An error an engine reports; status and type are whatever the engine decided."""


class InternalError(FleetError):
    status = 500
    type = "server_error"
    code = "internal_error"


ENVELOPE_ENCODER = msgspec.json.Encoder()


def envelope_bytes(err: FleetError) -> bytes:
    return ENVELOPE_ENCODER.encode(ErrorEnvelope(error=err.body()))
