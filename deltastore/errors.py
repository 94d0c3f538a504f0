"""One error hierarchy for the whole product.

Every error carries a message for the caller and, where it helps, a hint for the operator.
Transports never invent codes: ``server`` maps these classes to gRPC status codes and HTTP
statuses through :data:`STATUS_TABLE`, so a given failure reads the same over every API.
"""

from __future__ import annotations

__all__ = [
    "STATUS_TABLE",
    "AlreadyExists",
    "AuthError",
    "BackendUnavailable",
    "ChecksumMismatch",
    "CodecError",
    "DeltaStoreError",
    "FormatError",
    "IncompatibleFormat",
    "InvalidArgument",
    "MismatchError",
    "MissingSegments",
    "NotConfigured",
    "NotFound",
    "PermissionDenied",
    "ResourceExhausted",
    "StoreFull",
]


class DeltaStoreError(Exception):
    """Root of every error DeltaStore raises on purpose.

    Attributes:
        message: what went wrong, for the caller.
        hint: what an operator can do about it (may be empty).
        retryable: whether the same call may succeed later unchanged.
    """

    retryable = False

    def __init__(self, message: str, *, hint: str = "") -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint

    def __str__(self) -> str:
        return f"{self.message} (hint: {self.hint})" if self.hint else self.message


class InvalidArgument(DeltaStoreError, ValueError):
    """The request is malformed: bad spec string, shape, token ids, sizes."""


class CodecError(InvalidArgument):
    """A tensor or codec parameter the codec cannot encode."""


class FormatError(InvalidArgument):
    """An encoded payload is truncated, of another format version, or self-inconsistent."""


class NotFound(DeltaStoreError, KeyError):
    """The snapshot, session or block does not exist (in this namespace)."""

    def __str__(self) -> str:  # KeyError would repr() the message
        return DeltaStoreError.__str__(self)


class MismatchError(DeltaStoreError):
    """Model fingerprint or codec spec differs from what is stored: never serve wrong tensors."""


class MissingSegments(MismatchError):
    """A put lacks payloads for segments the store does not hold (plan again and send them)."""

    def __init__(self, keys: list[str]) -> None:
        shown = ", ".join(keys[:4]) + (f" and {len(keys) - 4} more" if len(keys) > 4 else "")
        super().__init__(
            f"{len(keys)} segment(s) neither stored nor supplied: {shown}",
            hint="call PlanSnapshot again and send every segment it reports missing",
        )
        self.keys = keys


class AlreadyExists(DeltaStoreError):
    """A snapshot with this (namespace, session, turn) exists with different content."""


class IncompatibleFormat(DeltaStoreError):
    """The data directory was written in a format version this build does not know."""


class NotConfigured(DeltaStoreError):
    """The server was not set up for this call (e.g. GetSnapshotShm without a shared-memory directory)."""


class ResourceExhausted(DeltaStoreError):
    """A configured size limit was exceeded (snapshot bytes, message size, dimensions)."""


class StoreFull(ResourceExhausted):
    """The store cannot take more bytes even after evicting what its policy allows."""


class ChecksumMismatch(DeltaStoreError):
    """Stored bytes do not match their BLAKE3 digest: corruption detected, nothing served."""

    def __init__(self, key: str, expected: str, got: str) -> None:
        super().__init__(
            f"block {key}: digest mismatch (expected {expected}, got {got})",
            hint="run `deltastore verify --data-dir DIR`; restore the block from a replica or delete the snapshots that use it",
        )
        self.key = key
        self.expected = expected
        self.got = got


class BackendUnavailable(DeltaStoreError):
    """The storage backend cannot be reached now (e.g. a Redis node is down)."""

    retryable = True


class AuthError(DeltaStoreError):
    """Missing or unknown credentials."""


class PermissionDenied(DeltaStoreError):
    """Known credentials that may not do this (wrong tenant, ops-only key)."""


# Error class -> (gRPC status code name, HTTP status). Most specific classes first.
STATUS_TABLE: tuple[tuple[type[DeltaStoreError], str, int], ...] = (
    (ChecksumMismatch, "DATA_LOSS", 500),
    (StoreFull, "RESOURCE_EXHAUSTED", 507),
    (ResourceExhausted, "RESOURCE_EXHAUSTED", 413),
    (MismatchError, "FAILED_PRECONDITION", 409),
    (AlreadyExists, "ALREADY_EXISTS", 409),
    (IncompatibleFormat, "FAILED_PRECONDITION", 500),
    (NotConfigured, "FAILED_PRECONDITION", 409),
    (NotFound, "NOT_FOUND", 404),
    (InvalidArgument, "INVALID_ARGUMENT", 400),
    (AuthError, "UNAUTHENTICATED", 401),
    (PermissionDenied, "PERMISSION_DENIED", 403),
    (BackendUnavailable, "UNAVAILABLE", 503),
    (DeltaStoreError, "INTERNAL", 500),
)
