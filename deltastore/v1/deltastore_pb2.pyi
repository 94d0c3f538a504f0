from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class Segment(_message.Message):
    __slots__ = ("start", "end", "key", "present", "size_bytes", "digest")
    START_FIELD_NUMBER: _ClassVar[int]
    END_FIELD_NUMBER: _ClassVar[int]
    KEY_FIELD_NUMBER: _ClassVar[int]
    PRESENT_FIELD_NUMBER: _ClassVar[int]
    SIZE_BYTES_FIELD_NUMBER: _ClassVar[int]
    DIGEST_FIELD_NUMBER: _ClassVar[int]
    start: int
    end: int
    key: bytes
    present: bool
    size_bytes: int
    digest: bytes
    def __init__(self, start: _Optional[int] = ..., end: _Optional[int] = ..., key: _Optional[bytes] = ..., present: _Optional[bool] = ..., size_bytes: _Optional[int] = ..., digest: _Optional[bytes] = ...) -> None: ...

class PlanSnapshotRequest(_message.Message):
    __slots__ = ("namespace", "session", "model", "codec", "token_ids", "parent_turn")
    NAMESPACE_FIELD_NUMBER: _ClassVar[int]
    SESSION_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    CODEC_FIELD_NUMBER: _ClassVar[int]
    TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    PARENT_TURN_FIELD_NUMBER: _ClassVar[int]
    namespace: str
    session: str
    model: str
    codec: str
    token_ids: _containers.RepeatedScalarFieldContainer[int]
    parent_turn: int
    def __init__(self, namespace: _Optional[str] = ..., session: _Optional[str] = ..., model: _Optional[str] = ..., codec: _Optional[str] = ..., token_ids: _Optional[_Iterable[int]] = ..., parent_turn: _Optional[int] = ...) -> None: ...

class PlanSnapshotResponse(_message.Message):
    __slots__ = ("segments", "block_size", "codec")
    SEGMENTS_FIELD_NUMBER: _ClassVar[int]
    BLOCK_SIZE_FIELD_NUMBER: _ClassVar[int]
    CODEC_FIELD_NUMBER: _ClassVar[int]
    segments: _containers.RepeatedCompositeFieldContainer[Segment]
    block_size: int
    codec: str
    def __init__(self, segments: _Optional[_Iterable[_Union[Segment, _Mapping]]] = ..., block_size: _Optional[int] = ..., codec: _Optional[str] = ...) -> None: ...

class SnapshotHeader(_message.Message):
    __slots__ = ("namespace", "session", "turn", "model", "codec", "token_ids", "parent_turn")
    NAMESPACE_FIELD_NUMBER: _ClassVar[int]
    SESSION_FIELD_NUMBER: _ClassVar[int]
    TURN_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    CODEC_FIELD_NUMBER: _ClassVar[int]
    TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    PARENT_TURN_FIELD_NUMBER: _ClassVar[int]
    namespace: str
    session: str
    turn: int
    model: str
    codec: str
    token_ids: _containers.RepeatedScalarFieldContainer[int]
    parent_turn: int
    def __init__(self, namespace: _Optional[str] = ..., session: _Optional[str] = ..., turn: _Optional[int] = ..., model: _Optional[str] = ..., codec: _Optional[str] = ..., token_ids: _Optional[_Iterable[int]] = ..., parent_turn: _Optional[int] = ...) -> None: ...

class BlockChunk(_message.Message):
    __slots__ = ("key", "offset", "total_bytes", "data")
    KEY_FIELD_NUMBER: _ClassVar[int]
    OFFSET_FIELD_NUMBER: _ClassVar[int]
    TOTAL_BYTES_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    key: bytes
    offset: int
    total_bytes: int
    data: bytes
    def __init__(self, key: _Optional[bytes] = ..., offset: _Optional[int] = ..., total_bytes: _Optional[int] = ..., data: _Optional[bytes] = ...) -> None: ...

class PutSnapshotRequest(_message.Message):
    __slots__ = ("header", "chunk")
    HEADER_FIELD_NUMBER: _ClassVar[int]
    CHUNK_FIELD_NUMBER: _ClassVar[int]
    header: SnapshotHeader
    chunk: BlockChunk
    def __init__(self, header: _Optional[_Union[SnapshotHeader, _Mapping]] = ..., chunk: _Optional[_Union[BlockChunk, _Mapping]] = ...) -> None: ...

class PutSnapshotResponse(_message.Message):
    __slots__ = ("snapshot_id", "new_bytes", "reused_temporal_bytes", "reused_shared_bytes", "new_segments", "reused_segments", "logical_bytes")
    SNAPSHOT_ID_FIELD_NUMBER: _ClassVar[int]
    NEW_BYTES_FIELD_NUMBER: _ClassVar[int]
    REUSED_TEMPORAL_BYTES_FIELD_NUMBER: _ClassVar[int]
    REUSED_SHARED_BYTES_FIELD_NUMBER: _ClassVar[int]
    NEW_SEGMENTS_FIELD_NUMBER: _ClassVar[int]
    REUSED_SEGMENTS_FIELD_NUMBER: _ClassVar[int]
    LOGICAL_BYTES_FIELD_NUMBER: _ClassVar[int]
    snapshot_id: str
    new_bytes: int
    reused_temporal_bytes: int
    reused_shared_bytes: int
    new_segments: int
    reused_segments: int
    logical_bytes: int
    def __init__(self, snapshot_id: _Optional[str] = ..., new_bytes: _Optional[int] = ..., reused_temporal_bytes: _Optional[int] = ..., reused_shared_bytes: _Optional[int] = ..., new_segments: _Optional[int] = ..., reused_segments: _Optional[int] = ..., logical_bytes: _Optional[int] = ...) -> None: ...

class GetSnapshotRequest(_message.Message):
    __slots__ = ("namespace", "session", "turn", "model", "codec")
    NAMESPACE_FIELD_NUMBER: _ClassVar[int]
    SESSION_FIELD_NUMBER: _ClassVar[int]
    TURN_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    CODEC_FIELD_NUMBER: _ClassVar[int]
    namespace: str
    session: str
    turn: int
    model: str
    codec: str
    def __init__(self, namespace: _Optional[str] = ..., session: _Optional[str] = ..., turn: _Optional[int] = ..., model: _Optional[str] = ..., codec: _Optional[str] = ...) -> None: ...

class SnapshotInfo(_message.Message):
    __slots__ = ("snapshot_id", "namespace", "session", "turn", "model", "codec", "token_ids", "segments", "logical_bytes", "payload_bytes", "parent_turn", "created_at")
    SNAPSHOT_ID_FIELD_NUMBER: _ClassVar[int]
    NAMESPACE_FIELD_NUMBER: _ClassVar[int]
    SESSION_FIELD_NUMBER: _ClassVar[int]
    TURN_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    CODEC_FIELD_NUMBER: _ClassVar[int]
    TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    SEGMENTS_FIELD_NUMBER: _ClassVar[int]
    LOGICAL_BYTES_FIELD_NUMBER: _ClassVar[int]
    PAYLOAD_BYTES_FIELD_NUMBER: _ClassVar[int]
    PARENT_TURN_FIELD_NUMBER: _ClassVar[int]
    CREATED_AT_FIELD_NUMBER: _ClassVar[int]
    snapshot_id: str
    namespace: str
    session: str
    turn: int
    model: str
    codec: str
    token_ids: _containers.RepeatedScalarFieldContainer[int]
    segments: _containers.RepeatedCompositeFieldContainer[Segment]
    logical_bytes: int
    payload_bytes: int
    parent_turn: int
    created_at: float
    def __init__(self, snapshot_id: _Optional[str] = ..., namespace: _Optional[str] = ..., session: _Optional[str] = ..., turn: _Optional[int] = ..., model: _Optional[str] = ..., codec: _Optional[str] = ..., token_ids: _Optional[_Iterable[int]] = ..., segments: _Optional[_Iterable[_Union[Segment, _Mapping]]] = ..., logical_bytes: _Optional[int] = ..., payload_bytes: _Optional[int] = ..., parent_turn: _Optional[int] = ..., created_at: _Optional[float] = ...) -> None: ...

class GetSnapshotResponse(_message.Message):
    __slots__ = ("info", "chunk")
    INFO_FIELD_NUMBER: _ClassVar[int]
    CHUNK_FIELD_NUMBER: _ClassVar[int]
    info: SnapshotInfo
    chunk: BlockChunk
    def __init__(self, info: _Optional[_Union[SnapshotInfo, _Mapping]] = ..., chunk: _Optional[_Union[BlockChunk, _Mapping]] = ...) -> None: ...

class GetSnapshotShmResponse(_message.Message):
    __slots__ = ("info", "file")
    INFO_FIELD_NUMBER: _ClassVar[int]
    FILE_FIELD_NUMBER: _ClassVar[int]
    info: SnapshotInfo
    file: str
    def __init__(self, info: _Optional[_Union[SnapshotInfo, _Mapping]] = ..., file: _Optional[str] = ...) -> None: ...

class LookupPrefixRequest(_message.Message):
    __slots__ = ("namespace", "model", "codec", "token_ids")
    NAMESPACE_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    CODEC_FIELD_NUMBER: _ClassVar[int]
    TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    namespace: str
    model: str
    codec: str
    token_ids: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, namespace: _Optional[str] = ..., model: _Optional[str] = ..., codec: _Optional[str] = ..., token_ids: _Optional[_Iterable[int]] = ...) -> None: ...

class GetPrefixRequest(_message.Message):
    __slots__ = ("namespace", "model", "codec", "token_ids", "max_tokens", "start_token")
    NAMESPACE_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    CODEC_FIELD_NUMBER: _ClassVar[int]
    TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    MAX_TOKENS_FIELD_NUMBER: _ClassVar[int]
    START_TOKEN_FIELD_NUMBER: _ClassVar[int]
    namespace: str
    model: str
    codec: str
    token_ids: _containers.RepeatedScalarFieldContainer[int]
    max_tokens: int
    start_token: int
    def __init__(self, namespace: _Optional[str] = ..., model: _Optional[str] = ..., codec: _Optional[str] = ..., token_ids: _Optional[_Iterable[int]] = ..., max_tokens: _Optional[int] = ..., start_token: _Optional[int] = ...) -> None: ...

class LookupPrefixResponse(_message.Message):
    __slots__ = ("matched_tokens",)
    MATCHED_TOKENS_FIELD_NUMBER: _ClassVar[int]
    matched_tokens: int
    def __init__(self, matched_tokens: _Optional[int] = ...) -> None: ...

class HasBlocksRequest(_message.Message):
    __slots__ = ("namespace", "keys")
    NAMESPACE_FIELD_NUMBER: _ClassVar[int]
    KEYS_FIELD_NUMBER: _ClassVar[int]
    namespace: str
    keys: _containers.RepeatedScalarFieldContainer[bytes]
    def __init__(self, namespace: _Optional[str] = ..., keys: _Optional[_Iterable[bytes]] = ...) -> None: ...

class HasBlocksResponse(_message.Message):
    __slots__ = ("present",)
    PRESENT_FIELD_NUMBER: _ClassVar[int]
    present: _containers.RepeatedScalarFieldContainer[bool]
    def __init__(self, present: _Optional[_Iterable[bool]] = ...) -> None: ...

class DeleteSnapshotRequest(_message.Message):
    __slots__ = ("namespace", "session", "turn")
    NAMESPACE_FIELD_NUMBER: _ClassVar[int]
    SESSION_FIELD_NUMBER: _ClassVar[int]
    TURN_FIELD_NUMBER: _ClassVar[int]
    namespace: str
    session: str
    turn: int
    def __init__(self, namespace: _Optional[str] = ..., session: _Optional[str] = ..., turn: _Optional[int] = ...) -> None: ...

class DeleteSnapshotResponse(_message.Message):
    __slots__ = ("freed_segments", "freed_bytes")
    FREED_SEGMENTS_FIELD_NUMBER: _ClassVar[int]
    FREED_BYTES_FIELD_NUMBER: _ClassVar[int]
    freed_segments: int
    freed_bytes: int
    def __init__(self, freed_segments: _Optional[int] = ..., freed_bytes: _Optional[int] = ...) -> None: ...

class DeleteSessionRequest(_message.Message):
    __slots__ = ("namespace", "session")
    NAMESPACE_FIELD_NUMBER: _ClassVar[int]
    SESSION_FIELD_NUMBER: _ClassVar[int]
    namespace: str
    session: str
    def __init__(self, namespace: _Optional[str] = ..., session: _Optional[str] = ...) -> None: ...

class DeleteSessionResponse(_message.Message):
    __slots__ = ("deleted_snapshots", "freed_segments", "freed_bytes")
    DELETED_SNAPSHOTS_FIELD_NUMBER: _ClassVar[int]
    FREED_SEGMENTS_FIELD_NUMBER: _ClassVar[int]
    FREED_BYTES_FIELD_NUMBER: _ClassVar[int]
    deleted_snapshots: int
    freed_segments: int
    freed_bytes: int
    def __init__(self, deleted_snapshots: _Optional[int] = ..., freed_segments: _Optional[int] = ..., freed_bytes: _Optional[int] = ...) -> None: ...

class ListSnapshotsRequest(_message.Message):
    __slots__ = ("namespace", "session")
    NAMESPACE_FIELD_NUMBER: _ClassVar[int]
    SESSION_FIELD_NUMBER: _ClassVar[int]
    namespace: str
    session: str
    def __init__(self, namespace: _Optional[str] = ..., session: _Optional[str] = ...) -> None: ...

class SnapshotSummary(_message.Message):
    __slots__ = ("snapshot_id", "session", "turn", "model", "codec", "n_tokens", "logical_bytes", "created_at", "parent_turn")
    SNAPSHOT_ID_FIELD_NUMBER: _ClassVar[int]
    SESSION_FIELD_NUMBER: _ClassVar[int]
    TURN_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    CODEC_FIELD_NUMBER: _ClassVar[int]
    N_TOKENS_FIELD_NUMBER: _ClassVar[int]
    LOGICAL_BYTES_FIELD_NUMBER: _ClassVar[int]
    CREATED_AT_FIELD_NUMBER: _ClassVar[int]
    PARENT_TURN_FIELD_NUMBER: _ClassVar[int]
    snapshot_id: str
    session: str
    turn: int
    model: str
    codec: str
    n_tokens: int
    logical_bytes: int
    created_at: float
    parent_turn: int
    def __init__(self, snapshot_id: _Optional[str] = ..., session: _Optional[str] = ..., turn: _Optional[int] = ..., model: _Optional[str] = ..., codec: _Optional[str] = ..., n_tokens: _Optional[int] = ..., logical_bytes: _Optional[int] = ..., created_at: _Optional[float] = ..., parent_turn: _Optional[int] = ...) -> None: ...

class ListSnapshotsResponse(_message.Message):
    __slots__ = ("snapshots",)
    SNAPSHOTS_FIELD_NUMBER: _ClassVar[int]
    snapshots: _containers.RepeatedCompositeFieldContainer[SnapshotSummary]
    def __init__(self, snapshots: _Optional[_Iterable[_Union[SnapshotSummary, _Mapping]]] = ...) -> None: ...

class GetSavingsRequest(_message.Message):
    __slots__ = ("namespace",)
    NAMESPACE_FIELD_NUMBER: _ClassVar[int]
    namespace: str
    def __init__(self, namespace: _Optional[str] = ...) -> None: ...

class Savings(_message.Message):
    __slots__ = ("logical_bytes", "stored_bytes", "ratio", "codec", "prefix_dedup", "temporal_delta", "snapshots", "sessions", "blocks")
    LOGICAL_BYTES_FIELD_NUMBER: _ClassVar[int]
    STORED_BYTES_FIELD_NUMBER: _ClassVar[int]
    RATIO_FIELD_NUMBER: _ClassVar[int]
    CODEC_FIELD_NUMBER: _ClassVar[int]
    PREFIX_DEDUP_FIELD_NUMBER: _ClassVar[int]
    TEMPORAL_DELTA_FIELD_NUMBER: _ClassVar[int]
    SNAPSHOTS_FIELD_NUMBER: _ClassVar[int]
    SESSIONS_FIELD_NUMBER: _ClassVar[int]
    BLOCKS_FIELD_NUMBER: _ClassVar[int]
    logical_bytes: int
    stored_bytes: int
    ratio: float
    codec: float
    prefix_dedup: float
    temporal_delta: float
    snapshots: int
    sessions: int
    blocks: int
    def __init__(self, logical_bytes: _Optional[int] = ..., stored_bytes: _Optional[int] = ..., ratio: _Optional[float] = ..., codec: _Optional[float] = ..., prefix_dedup: _Optional[float] = ..., temporal_delta: _Optional[float] = ..., snapshots: _Optional[int] = ..., sessions: _Optional[int] = ..., blocks: _Optional[int] = ...) -> None: ...

class GetSavingsResponse(_message.Message):
    __slots__ = ("total", "namespaces")
    class NamespacesEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: Savings
        def __init__(self, key: _Optional[str] = ..., value: _Optional[_Union[Savings, _Mapping]] = ...) -> None: ...
    TOTAL_FIELD_NUMBER: _ClassVar[int]
    NAMESPACES_FIELD_NUMBER: _ClassVar[int]
    total: Savings
    namespaces: _containers.MessageMap[str, Savings]
    def __init__(self, total: _Optional[_Union[Savings, _Mapping]] = ..., namespaces: _Optional[_Mapping[str, Savings]] = ...) -> None: ...
