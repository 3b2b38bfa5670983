from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class Phase(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    PHASE_UNSPECIFIED: _ClassVar[Phase]
    REDUCE_SCATTER: _ClassVar[Phase]
    ALL_GATHER: _ClassVar[Phase]
    RECURSIVE_DOUBLING: _ClassVar[Phase]
PHASE_UNSPECIFIED: Phase
REDUCE_SCATTER: Phase
ALL_GATHER: Phase
RECURSIVE_DOUBLING: Phase

class Segment(_message.Message):
    __slots__ = ("block", "size_bytes")
    BLOCK_FIELD_NUMBER: _ClassVar[int]
    SIZE_BYTES_FIELD_NUMBER: _ClassVar[int]
    block: int
    size_bytes: int
    def __init__(self, block: _Optional[int] = ..., size_bytes: _Optional[int] = ...) -> None: ...

class ExchangeHeader(_message.Message):
    __slots__ = ("group_id", "epoch", "step", "round", "level", "phase", "sender", "scheme", "total_bytes", "sha256", "segments", "next_batch", "rebase_sha256")
    GROUP_ID_FIELD_NUMBER: _ClassVar[int]
    EPOCH_FIELD_NUMBER: _ClassVar[int]
    STEP_FIELD_NUMBER: _ClassVar[int]
    ROUND_FIELD_NUMBER: _ClassVar[int]
    LEVEL_FIELD_NUMBER: _ClassVar[int]
    PHASE_FIELD_NUMBER: _ClassVar[int]
    SENDER_FIELD_NUMBER: _ClassVar[int]
    SCHEME_FIELD_NUMBER: _ClassVar[int]
    TOTAL_BYTES_FIELD_NUMBER: _ClassVar[int]
    SHA256_FIELD_NUMBER: _ClassVar[int]
    SEGMENTS_FIELD_NUMBER: _ClassVar[int]
    NEXT_BATCH_FIELD_NUMBER: _ClassVar[int]
    REBASE_SHA256_FIELD_NUMBER: _ClassVar[int]
    group_id: str
    epoch: int
    step: int
    round: int
    level: int
    phase: Phase
    sender: int
    scheme: str
    total_bytes: int
    sha256: str
    segments: _containers.RepeatedCompositeFieldContainer[Segment]
    next_batch: BatchPlan
    rebase_sha256: str
    def __init__(self, group_id: _Optional[str] = ..., epoch: _Optional[int] = ..., step: _Optional[int] = ..., round: _Optional[int] = ..., level: _Optional[int] = ..., phase: _Optional[_Union[Phase, str]] = ..., sender: _Optional[int] = ..., scheme: _Optional[str] = ..., total_bytes: _Optional[int] = ..., sha256: _Optional[str] = ..., segments: _Optional[_Iterable[_Union[Segment, _Mapping]]] = ..., next_batch: _Optional[_Union[BatchPlan, _Mapping]] = ..., rebase_sha256: _Optional[str] = ...) -> None: ...

class BatchPlan(_message.Message):
    __slots__ = ("shard", "epoch", "first_slot", "sequences")
    SHARD_FIELD_NUMBER: _ClassVar[int]
    EPOCH_FIELD_NUMBER: _ClassVar[int]
    FIRST_SLOT_FIELD_NUMBER: _ClassVar[int]
    SEQUENCES_FIELD_NUMBER: _ClassVar[int]
    shard: str
    epoch: int
    first_slot: int
    sequences: int
    def __init__(self, shard: _Optional[str] = ..., epoch: _Optional[int] = ..., first_slot: _Optional[int] = ..., sequences: _Optional[int] = ...) -> None: ...

class PeerPart(_message.Message):
    __slots__ = ("header", "chunk")
    HEADER_FIELD_NUMBER: _ClassVar[int]
    CHUNK_FIELD_NUMBER: _ClassVar[int]
    header: ExchangeHeader
    chunk: bytes
    def __init__(self, header: _Optional[_Union[ExchangeHeader, _Mapping]] = ..., chunk: _Optional[bytes] = ...) -> None: ...

class ExchangeReply(_message.Message):
    __slots__ = ("buffered_bytes",)
    BUFFERED_BYTES_FIELD_NUMBER: _ClassVar[int]
    buffered_bytes: int
    def __init__(self, buffered_bytes: _Optional[int] = ...) -> None: ...

class ChecksumRequest(_message.Message):
    __slots__ = ("group_id", "epoch", "step", "sender", "params_sha256")
    GROUP_ID_FIELD_NUMBER: _ClassVar[int]
    EPOCH_FIELD_NUMBER: _ClassVar[int]
    STEP_FIELD_NUMBER: _ClassVar[int]
    SENDER_FIELD_NUMBER: _ClassVar[int]
    PARAMS_SHA256_FIELD_NUMBER: _ClassVar[int]
    group_id: str
    epoch: int
    step: int
    sender: int
    params_sha256: str
    def __init__(self, group_id: _Optional[str] = ..., epoch: _Optional[int] = ..., step: _Optional[int] = ..., sender: _Optional[int] = ..., params_sha256: _Optional[str] = ...) -> None: ...

class ChecksumReply(_message.Message):
    __slots__ = ("step", "params_sha256", "rank")
    STEP_FIELD_NUMBER: _ClassVar[int]
    PARAMS_SHA256_FIELD_NUMBER: _ClassVar[int]
    RANK_FIELD_NUMBER: _ClassVar[int]
    step: int
    params_sha256: str
    rank: int
    def __init__(self, step: _Optional[int] = ..., params_sha256: _Optional[str] = ..., rank: _Optional[int] = ...) -> None: ...

class StateRequest(_message.Message):
    __slots__ = ("group_id", "epoch", "step", "sender")
    GROUP_ID_FIELD_NUMBER: _ClassVar[int]
    EPOCH_FIELD_NUMBER: _ClassVar[int]
    STEP_FIELD_NUMBER: _ClassVar[int]
    SENDER_FIELD_NUMBER: _ClassVar[int]
    group_id: str
    epoch: int
    step: int
    sender: int
    def __init__(self, group_id: _Optional[str] = ..., epoch: _Optional[int] = ..., step: _Optional[int] = ..., sender: _Optional[int] = ...) -> None: ...

class StateHeader(_message.Message):
    __slots__ = ("step", "total_bytes", "sha256", "params_sha256")
    STEP_FIELD_NUMBER: _ClassVar[int]
    TOTAL_BYTES_FIELD_NUMBER: _ClassVar[int]
    SHA256_FIELD_NUMBER: _ClassVar[int]
    PARAMS_SHA256_FIELD_NUMBER: _ClassVar[int]
    step: int
    total_bytes: int
    sha256: str
    params_sha256: str
    def __init__(self, step: _Optional[int] = ..., total_bytes: _Optional[int] = ..., sha256: _Optional[str] = ..., params_sha256: _Optional[str] = ...) -> None: ...

class StatePart(_message.Message):
    __slots__ = ("header", "chunk")
    HEADER_FIELD_NUMBER: _ClassVar[int]
    CHUNK_FIELD_NUMBER: _ClassVar[int]
    header: StateHeader
    chunk: bytes
    def __init__(self, header: _Optional[_Union[StateHeader, _Mapping]] = ..., chunk: _Optional[bytes] = ...) -> None: ...

class PeerStatusRequest(_message.Message):
    __slots__ = ("group_id", "sender")
    GROUP_ID_FIELD_NUMBER: _ClassVar[int]
    SENDER_FIELD_NUMBER: _ClassVar[int]
    group_id: str
    sender: int
    def __init__(self, group_id: _Optional[str] = ..., sender: _Optional[int] = ...) -> None: ...

class PeerStatusReply(_message.Message):
    __slots__ = ("rank", "epoch", "state", "step", "seconds_in_state", "reason")
    class State(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
        __slots__ = ()
        UNKNOWN: _ClassVar[PeerStatusReply.State]
        IDLE: _ClassVar[PeerStatusReply.State]
        IN_ALLREDUCE: _ClassVar[PeerStatusReply.State]
        FAILED: _ClassVar[PeerStatusReply.State]
        CLOSED: _ClassVar[PeerStatusReply.State]
    UNKNOWN: PeerStatusReply.State
    IDLE: PeerStatusReply.State
    IN_ALLREDUCE: PeerStatusReply.State
    FAILED: PeerStatusReply.State
    CLOSED: PeerStatusReply.State
    RANK_FIELD_NUMBER: _ClassVar[int]
    EPOCH_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    STEP_FIELD_NUMBER: _ClassVar[int]
    SECONDS_IN_STATE_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    rank: int
    epoch: int
    state: PeerStatusReply.State
    step: int
    seconds_in_state: float
    reason: str
    def __init__(self, rank: _Optional[int] = ..., epoch: _Optional[int] = ..., state: _Optional[_Union[PeerStatusReply.State, str]] = ..., step: _Optional[int] = ..., seconds_in_state: _Optional[float] = ..., reason: _Optional[str] = ...) -> None: ...
