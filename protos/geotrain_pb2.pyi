from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class JoinRequest(_message.Message):
    __slots__ = ("name", "device", "memory_bytes", "software_version", "protocol_version", "config_fingerprint", "advertise_host", "advertise_port", "sync_group", "previous_worker_id")
    NAME_FIELD_NUMBER: _ClassVar[int]
    DEVICE_FIELD_NUMBER: _ClassVar[int]
    MEMORY_BYTES_FIELD_NUMBER: _ClassVar[int]
    SOFTWARE_VERSION_FIELD_NUMBER: _ClassVar[int]
    PROTOCOL_VERSION_FIELD_NUMBER: _ClassVar[int]
    CONFIG_FINGERPRINT_FIELD_NUMBER: _ClassVar[int]
    ADVERTISE_HOST_FIELD_NUMBER: _ClassVar[int]
    ADVERTISE_PORT_FIELD_NUMBER: _ClassVar[int]
    SYNC_GROUP_FIELD_NUMBER: _ClassVar[int]
    PREVIOUS_WORKER_ID_FIELD_NUMBER: _ClassVar[int]
    name: str
    device: str
    memory_bytes: int
    software_version: str
    protocol_version: int
    config_fingerprint: str
    advertise_host: str
    advertise_port: int
    sync_group: str
    previous_worker_id: str
    def __init__(self, name: _Optional[str] = ..., device: _Optional[str] = ..., memory_bytes: _Optional[int] = ..., software_version: _Optional[str] = ..., protocol_version: _Optional[int] = ..., config_fingerprint: _Optional[str] = ..., advertise_host: _Optional[str] = ..., advertise_port: _Optional[int] = ..., sync_group: _Optional[str] = ..., previous_worker_id: _Optional[str] = ...) -> None: ...

class JoinReply(_message.Message):
    __slots__ = ("worker_id", "session_id", "run_id", "run_spec_json", "model_version", "lease_seconds", "heartbeat_seconds", "protocol_version")
    WORKER_ID_FIELD_NUMBER: _ClassVar[int]
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    RUN_ID_FIELD_NUMBER: _ClassVar[int]
    RUN_SPEC_JSON_FIELD_NUMBER: _ClassVar[int]
    MODEL_VERSION_FIELD_NUMBER: _ClassVar[int]
    LEASE_SECONDS_FIELD_NUMBER: _ClassVar[int]
    HEARTBEAT_SECONDS_FIELD_NUMBER: _ClassVar[int]
    PROTOCOL_VERSION_FIELD_NUMBER: _ClassVar[int]
    worker_id: str
    session_id: str
    run_id: str
    run_spec_json: str
    model_version: int
    lease_seconds: float
    heartbeat_seconds: float
    protocol_version: int
    def __init__(self, worker_id: _Optional[str] = ..., session_id: _Optional[str] = ..., run_id: _Optional[str] = ..., run_spec_json: _Optional[str] = ..., model_version: _Optional[int] = ..., lease_seconds: _Optional[float] = ..., heartbeat_seconds: _Optional[float] = ..., protocol_version: _Optional[int] = ...) -> None: ...

class WorkerStats(_message.Message):
    __slots__ = ("tokens_per_second", "step_seconds", "loss", "sent_bytes", "received_bytes", "wait_seconds", "wall_seconds", "steps", "tokens", "gpu_memory_bytes", "gpu_utilization", "residual_norm", "data_bytes")
    TOKENS_PER_SECOND_FIELD_NUMBER: _ClassVar[int]
    STEP_SECONDS_FIELD_NUMBER: _ClassVar[int]
    LOSS_FIELD_NUMBER: _ClassVar[int]
    SENT_BYTES_FIELD_NUMBER: _ClassVar[int]
    RECEIVED_BYTES_FIELD_NUMBER: _ClassVar[int]
    WAIT_SECONDS_FIELD_NUMBER: _ClassVar[int]
    WALL_SECONDS_FIELD_NUMBER: _ClassVar[int]
    STEPS_FIELD_NUMBER: _ClassVar[int]
    TOKENS_FIELD_NUMBER: _ClassVar[int]
    GPU_MEMORY_BYTES_FIELD_NUMBER: _ClassVar[int]
    GPU_UTILIZATION_FIELD_NUMBER: _ClassVar[int]
    RESIDUAL_NORM_FIELD_NUMBER: _ClassVar[int]
    DATA_BYTES_FIELD_NUMBER: _ClassVar[int]
    tokens_per_second: float
    step_seconds: float
    loss: float
    sent_bytes: int
    received_bytes: int
    wait_seconds: float
    wall_seconds: float
    steps: int
    tokens: int
    gpu_memory_bytes: int
    gpu_utilization: float
    residual_norm: float
    data_bytes: int
    def __init__(self, tokens_per_second: _Optional[float] = ..., step_seconds: _Optional[float] = ..., loss: _Optional[float] = ..., sent_bytes: _Optional[int] = ..., received_bytes: _Optional[int] = ..., wait_seconds: _Optional[float] = ..., wall_seconds: _Optional[float] = ..., steps: _Optional[int] = ..., tokens: _Optional[int] = ..., gpu_memory_bytes: _Optional[int] = ..., gpu_utilization: _Optional[float] = ..., residual_norm: _Optional[float] = ..., data_bytes: _Optional[int] = ...) -> None: ...

class HeartbeatRequest(_message.Message):
    __slots__ = ("worker_id", "session_id", "stats", "group_failure", "active_group_id")
    WORKER_ID_FIELD_NUMBER: _ClassVar[int]
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    STATS_FIELD_NUMBER: _ClassVar[int]
    GROUP_FAILURE_FIELD_NUMBER: _ClassVar[int]
    ACTIVE_GROUP_ID_FIELD_NUMBER: _ClassVar[int]
    worker_id: str
    session_id: str
    stats: WorkerStats
    group_failure: GroupFailure
    active_group_id: str
    def __init__(self, worker_id: _Optional[str] = ..., session_id: _Optional[str] = ..., stats: _Optional[_Union[WorkerStats, _Mapping]] = ..., group_failure: _Optional[_Union[GroupFailure, _Mapping]] = ..., active_group_id: _Optional[str] = ...) -> None: ...

class GroupAssignment(_message.Message):
    __slots__ = ("group_id", "epoch", "rank", "world_size", "peers", "peer_secret")
    GROUP_ID_FIELD_NUMBER: _ClassVar[int]
    EPOCH_FIELD_NUMBER: _ClassVar[int]
    RANK_FIELD_NUMBER: _ClassVar[int]
    WORLD_SIZE_FIELD_NUMBER: _ClassVar[int]
    PEERS_FIELD_NUMBER: _ClassVar[int]
    PEER_SECRET_FIELD_NUMBER: _ClassVar[int]
    group_id: str
    epoch: int
    rank: int
    world_size: int
    peers: _containers.RepeatedScalarFieldContainer[str]
    peer_secret: str
    def __init__(self, group_id: _Optional[str] = ..., epoch: _Optional[int] = ..., rank: _Optional[int] = ..., world_size: _Optional[int] = ..., peers: _Optional[_Iterable[str]] = ..., peer_secret: _Optional[str] = ...) -> None: ...

class GroupFailure(_message.Message):
    __slots__ = ("group_id", "epoch", "survivor_ranks", "reason")
    GROUP_ID_FIELD_NUMBER: _ClassVar[int]
    EPOCH_FIELD_NUMBER: _ClassVar[int]
    SURVIVOR_RANKS_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    group_id: str
    epoch: int
    survivor_ranks: _containers.RepeatedScalarFieldContainer[int]
    reason: str
    def __init__(self, group_id: _Optional[str] = ..., epoch: _Optional[int] = ..., survivor_ranks: _Optional[_Iterable[int]] = ..., reason: _Optional[str] = ...) -> None: ...

class HeartbeatReply(_message.Message):
    __slots__ = ("action", "model_version", "lease_seconds", "group", "round_seconds_cap", "round_steps")
    class Action(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
        __slots__ = ()
        CONTINUE: _ClassVar[HeartbeatReply.Action]
        STOP: _ClassVar[HeartbeatReply.Action]
    CONTINUE: HeartbeatReply.Action
    STOP: HeartbeatReply.Action
    ACTION_FIELD_NUMBER: _ClassVar[int]
    MODEL_VERSION_FIELD_NUMBER: _ClassVar[int]
    LEASE_SECONDS_FIELD_NUMBER: _ClassVar[int]
    GROUP_FIELD_NUMBER: _ClassVar[int]
    ROUND_SECONDS_CAP_FIELD_NUMBER: _ClassVar[int]
    ROUND_STEPS_FIELD_NUMBER: _ClassVar[int]
    action: HeartbeatReply.Action
    model_version: int
    lease_seconds: float
    group: GroupAssignment
    round_seconds_cap: float
    round_steps: int
    def __init__(self, action: _Optional[_Union[HeartbeatReply.Action, str]] = ..., model_version: _Optional[int] = ..., lease_seconds: _Optional[float] = ..., group: _Optional[_Union[GroupAssignment, _Mapping]] = ..., round_seconds_cap: _Optional[float] = ..., round_steps: _Optional[int] = ...) -> None: ...

class LeaveRequest(_message.Message):
    __slots__ = ("worker_id", "session_id", "reason")
    WORKER_ID_FIELD_NUMBER: _ClassVar[int]
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    worker_id: str
    session_id: str
    reason: str
    def __init__(self, worker_id: _Optional[str] = ..., session_id: _Optional[str] = ..., reason: _Optional[str] = ...) -> None: ...

class LeaveReply(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class TokenRange(_message.Message):
    __slots__ = ("unit_id", "shard", "start", "end", "epoch")
    UNIT_ID_FIELD_NUMBER: _ClassVar[int]
    SHARD_FIELD_NUMBER: _ClassVar[int]
    START_FIELD_NUMBER: _ClassVar[int]
    END_FIELD_NUMBER: _ClassVar[int]
    EPOCH_FIELD_NUMBER: _ClassVar[int]
    unit_id: int
    shard: str
    start: int
    end: int
    epoch: int
    def __init__(self, unit_id: _Optional[int] = ..., shard: _Optional[str] = ..., start: _Optional[int] = ..., end: _Optional[int] = ..., epoch: _Optional[int] = ...) -> None: ...

class LeaseRequest(_message.Message):
    __slots__ = ("worker_id", "session_id", "request_id")
    WORKER_ID_FIELD_NUMBER: _ClassVar[int]
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    worker_id: str
    session_id: str
    request_id: str
    def __init__(self, worker_id: _Optional[str] = ..., session_id: _Optional[str] = ..., request_id: _Optional[str] = ...) -> None: ...

class LeaseReply(_message.Message):
    __slots__ = ("exhausted", "range")
    EXHAUSTED_FIELD_NUMBER: _ClassVar[int]
    RANGE_FIELD_NUMBER: _ClassVar[int]
    exhausted: bool
    range: TokenRange
    def __init__(self, exhausted: _Optional[bool] = ..., range: _Optional[_Union[TokenRange, _Mapping]] = ...) -> None: ...

class ModelRequest(_message.Message):
    __slots__ = ("worker_id", "session_id", "have_version", "force_full", "wait_seconds", "held_push_ids")
    WORKER_ID_FIELD_NUMBER: _ClassVar[int]
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    HAVE_VERSION_FIELD_NUMBER: _ClassVar[int]
    FORCE_FULL_FIELD_NUMBER: _ClassVar[int]
    WAIT_SECONDS_FIELD_NUMBER: _ClassVar[int]
    HELD_PUSH_IDS_FIELD_NUMBER: _ClassVar[int]
    worker_id: str
    session_id: str
    have_version: int
    force_full: bool
    wait_seconds: float
    held_push_ids: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, worker_id: _Optional[str] = ..., session_id: _Optional[str] = ..., have_version: _Optional[int] = ..., force_full: _Optional[bool] = ..., wait_seconds: _Optional[float] = ..., held_push_ids: _Optional[_Iterable[str]] = ...) -> None: ...

class ModelPart(_message.Message):
    __slots__ = ("header", "chunk")
    HEADER_FIELD_NUMBER: _ClassVar[int]
    CHUNK_FIELD_NUMBER: _ClassVar[int]
    header: ModelHeader
    chunk: bytes
    def __init__(self, header: _Optional[_Union[ModelHeader, _Mapping]] = ..., chunk: _Optional[bytes] = ...) -> None: ...

class ModelHeader(_message.Message):
    __slots__ = ("kind", "version", "total_bytes", "sha256", "params_sha256", "updates", "merged_push_ids", "momentum_bytes")
    class Kind(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
        __slots__ = ()
        FULL: _ClassVar[ModelHeader.Kind]
        UPDATES: _ClassVar[ModelHeader.Kind]
        UNCHANGED: _ClassVar[ModelHeader.Kind]
    FULL: ModelHeader.Kind
    UPDATES: ModelHeader.Kind
    UNCHANGED: ModelHeader.Kind
    KIND_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    TOTAL_BYTES_FIELD_NUMBER: _ClassVar[int]
    SHA256_FIELD_NUMBER: _ClassVar[int]
    PARAMS_SHA256_FIELD_NUMBER: _ClassVar[int]
    UPDATES_FIELD_NUMBER: _ClassVar[int]
    MERGED_PUSH_IDS_FIELD_NUMBER: _ClassVar[int]
    MOMENTUM_BYTES_FIELD_NUMBER: _ClassVar[int]
    kind: ModelHeader.Kind
    version: int
    total_bytes: int
    sha256: str
    params_sha256: str
    updates: _containers.RepeatedCompositeFieldContainer[UpdateInfo]
    merged_push_ids: _containers.RepeatedScalarFieldContainer[str]
    momentum_bytes: int
    def __init__(self, kind: _Optional[_Union[ModelHeader.Kind, str]] = ..., version: _Optional[int] = ..., total_bytes: _Optional[int] = ..., sha256: _Optional[str] = ..., params_sha256: _Optional[str] = ..., updates: _Optional[_Iterable[_Union[UpdateInfo, _Mapping]]] = ..., merged_push_ids: _Optional[_Iterable[str]] = ..., momentum_bytes: _Optional[int] = ...) -> None: ...

class UpdateInfo(_message.Message):
    __slots__ = ("version", "offset", "size", "merged_push_ids", "params_sha256", "relayed", "outer_fraction", "counted")
    VERSION_FIELD_NUMBER: _ClassVar[int]
    OFFSET_FIELD_NUMBER: _ClassVar[int]
    SIZE_FIELD_NUMBER: _ClassVar[int]
    MERGED_PUSH_IDS_FIELD_NUMBER: _ClassVar[int]
    PARAMS_SHA256_FIELD_NUMBER: _ClassVar[int]
    RELAYED_FIELD_NUMBER: _ClassVar[int]
    OUTER_FRACTION_FIELD_NUMBER: _ClassVar[int]
    COUNTED_FIELD_NUMBER: _ClassVar[int]
    version: int
    offset: int
    size: int
    merged_push_ids: _containers.RepeatedScalarFieldContainer[str]
    params_sha256: str
    relayed: _containers.RepeatedCompositeFieldContainer[RelayedDelta]
    outer_fraction: float
    counted: CountedMerge
    def __init__(self, version: _Optional[int] = ..., offset: _Optional[int] = ..., size: _Optional[int] = ..., merged_push_ids: _Optional[_Iterable[str]] = ..., params_sha256: _Optional[str] = ..., relayed: _Optional[_Iterable[_Union[RelayedDelta, _Mapping]]] = ..., outer_fraction: _Optional[float] = ..., counted: _Optional[_Union[CountedMerge, _Mapping]] = ...) -> None: ...

class CountedMerge(_message.Message):
    __slots__ = ("push_ids", "reference_push_id", "deltas", "weight", "scales", "offset", "size", "majority")
    PUSH_IDS_FIELD_NUMBER: _ClassVar[int]
    REFERENCE_PUSH_ID_FIELD_NUMBER: _ClassVar[int]
    DELTAS_FIELD_NUMBER: _ClassVar[int]
    WEIGHT_FIELD_NUMBER: _ClassVar[int]
    SCALES_FIELD_NUMBER: _ClassVar[int]
    OFFSET_FIELD_NUMBER: _ClassVar[int]
    SIZE_FIELD_NUMBER: _ClassVar[int]
    MAJORITY_FIELD_NUMBER: _ClassVar[int]
    push_ids: _containers.RepeatedScalarFieldContainer[str]
    reference_push_id: str
    deltas: int
    weight: float
    scales: _containers.RepeatedScalarFieldContainer[float]
    offset: int
    size: int
    majority: bool
    def __init__(self, push_ids: _Optional[_Iterable[str]] = ..., reference_push_id: _Optional[str] = ..., deltas: _Optional[int] = ..., weight: _Optional[float] = ..., scales: _Optional[_Iterable[float]] = ..., offset: _Optional[int] = ..., size: _Optional[int] = ..., majority: _Optional[bool] = ...) -> None: ...

class RelayedDelta(_message.Message):
    __slots__ = ("push_id", "offset", "size", "weight", "factor")
    PUSH_ID_FIELD_NUMBER: _ClassVar[int]
    OFFSET_FIELD_NUMBER: _ClassVar[int]
    SIZE_FIELD_NUMBER: _ClassVar[int]
    WEIGHT_FIELD_NUMBER: _ClassVar[int]
    FACTOR_FIELD_NUMBER: _ClassVar[int]
    push_id: str
    offset: int
    size: int
    weight: float
    factor: float
    def __init__(self, push_id: _Optional[str] = ..., offset: _Optional[int] = ..., size: _Optional[int] = ..., weight: _Optional[float] = ..., factor: _Optional[float] = ...) -> None: ...

class ShardRequest(_message.Message):
    __slots__ = ("worker_id", "session_id", "shard", "epoch", "first_slot", "sequences")
    WORKER_ID_FIELD_NUMBER: _ClassVar[int]
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    SHARD_FIELD_NUMBER: _ClassVar[int]
    EPOCH_FIELD_NUMBER: _ClassVar[int]
    FIRST_SLOT_FIELD_NUMBER: _ClassVar[int]
    SEQUENCES_FIELD_NUMBER: _ClassVar[int]
    worker_id: str
    session_id: str
    shard: str
    epoch: int
    first_slot: int
    sequences: int
    def __init__(self, worker_id: _Optional[str] = ..., session_id: _Optional[str] = ..., shard: _Optional[str] = ..., epoch: _Optional[int] = ..., first_slot: _Optional[int] = ..., sequences: _Optional[int] = ...) -> None: ...

class DataChunk(_message.Message):
    __slots__ = ("data", "offset", "total_bytes", "sha256")
    DATA_FIELD_NUMBER: _ClassVar[int]
    OFFSET_FIELD_NUMBER: _ClassVar[int]
    TOTAL_BYTES_FIELD_NUMBER: _ClassVar[int]
    SHA256_FIELD_NUMBER: _ClassVar[int]
    data: bytes
    offset: int
    total_bytes: int
    sha256: str
    def __init__(self, data: _Optional[bytes] = ..., offset: _Optional[int] = ..., total_bytes: _Optional[int] = ..., sha256: _Optional[str] = ...) -> None: ...

class DeltaHeader(_message.Message):
    __slots__ = ("worker_id", "session_id", "push_id", "base_version", "tokens", "steps", "mean_loss", "ranges", "total_bytes", "sha256")
    WORKER_ID_FIELD_NUMBER: _ClassVar[int]
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    PUSH_ID_FIELD_NUMBER: _ClassVar[int]
    BASE_VERSION_FIELD_NUMBER: _ClassVar[int]
    TOKENS_FIELD_NUMBER: _ClassVar[int]
    STEPS_FIELD_NUMBER: _ClassVar[int]
    MEAN_LOSS_FIELD_NUMBER: _ClassVar[int]
    RANGES_FIELD_NUMBER: _ClassVar[int]
    TOTAL_BYTES_FIELD_NUMBER: _ClassVar[int]
    SHA256_FIELD_NUMBER: _ClassVar[int]
    worker_id: str
    session_id: str
    push_id: str
    base_version: int
    tokens: int
    steps: int
    mean_loss: float
    ranges: _containers.RepeatedCompositeFieldContainer[TokenRange]
    total_bytes: int
    sha256: str
    def __init__(self, worker_id: _Optional[str] = ..., session_id: _Optional[str] = ..., push_id: _Optional[str] = ..., base_version: _Optional[int] = ..., tokens: _Optional[int] = ..., steps: _Optional[int] = ..., mean_loss: _Optional[float] = ..., ranges: _Optional[_Iterable[_Union[TokenRange, _Mapping]]] = ..., total_bytes: _Optional[int] = ..., sha256: _Optional[str] = ...) -> None: ...

class DeltaPart(_message.Message):
    __slots__ = ("header", "chunk")
    HEADER_FIELD_NUMBER: _ClassVar[int]
    CHUNK_FIELD_NUMBER: _ClassVar[int]
    header: DeltaHeader
    chunk: bytes
    def __init__(self, header: _Optional[_Union[DeltaHeader, _Mapping]] = ..., chunk: _Optional[bytes] = ...) -> None: ...

class PushReply(_message.Message):
    __slots__ = ("result", "model_version", "staleness", "message")
    class Result(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
        __slots__ = ()
        ACCEPTED: _ClassVar[PushReply.Result]
        STALE: _ClassVar[PushReply.Result]
    ACCEPTED: PushReply.Result
    STALE: PushReply.Result
    RESULT_FIELD_NUMBER: _ClassVar[int]
    MODEL_VERSION_FIELD_NUMBER: _ClassVar[int]
    STALENESS_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    result: PushReply.Result
    model_version: int
    staleness: int
    message: str
    def __init__(self, result: _Optional[_Union[PushReply.Result, str]] = ..., model_version: _Optional[int] = ..., staleness: _Optional[int] = ..., message: _Optional[str] = ...) -> None: ...

class StatusRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class WorkerStatus(_message.Message):
    __slots__ = ("worker_id", "name", "device", "stats", "merged_tokens", "pushes", "last_seen_seconds")
    WORKER_ID_FIELD_NUMBER: _ClassVar[int]
    NAME_FIELD_NUMBER: _ClassVar[int]
    DEVICE_FIELD_NUMBER: _ClassVar[int]
    STATS_FIELD_NUMBER: _ClassVar[int]
    MERGED_TOKENS_FIELD_NUMBER: _ClassVar[int]
    PUSHES_FIELD_NUMBER: _ClassVar[int]
    LAST_SEEN_SECONDS_FIELD_NUMBER: _ClassVar[int]
    worker_id: str
    name: str
    device: str
    stats: WorkerStats
    merged_tokens: int
    pushes: int
    last_seen_seconds: float
    def __init__(self, worker_id: _Optional[str] = ..., name: _Optional[str] = ..., device: _Optional[str] = ..., stats: _Optional[_Union[WorkerStats, _Mapping]] = ..., merged_tokens: _Optional[int] = ..., pushes: _Optional[int] = ..., last_seen_seconds: _Optional[float] = ...) -> None: ...

class StatusReply(_message.Message):
    __slots__ = ("run_id", "model_version", "tokens", "val_loss", "train_loss", "workers", "sent_bytes", "received_bytes", "state", "seconds", "status_json")
    RUN_ID_FIELD_NUMBER: _ClassVar[int]
    MODEL_VERSION_FIELD_NUMBER: _ClassVar[int]
    TOKENS_FIELD_NUMBER: _ClassVar[int]
    VAL_LOSS_FIELD_NUMBER: _ClassVar[int]
    TRAIN_LOSS_FIELD_NUMBER: _ClassVar[int]
    WORKERS_FIELD_NUMBER: _ClassVar[int]
    SENT_BYTES_FIELD_NUMBER: _ClassVar[int]
    RECEIVED_BYTES_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    SECONDS_FIELD_NUMBER: _ClassVar[int]
    STATUS_JSON_FIELD_NUMBER: _ClassVar[int]
    run_id: str
    model_version: int
    tokens: int
    val_loss: float
    train_loss: float
    workers: _containers.RepeatedCompositeFieldContainer[WorkerStatus]
    sent_bytes: int
    received_bytes: int
    state: str
    seconds: float
    status_json: str
    def __init__(self, run_id: _Optional[str] = ..., model_version: _Optional[int] = ..., tokens: _Optional[int] = ..., val_loss: _Optional[float] = ..., train_loss: _Optional[float] = ..., workers: _Optional[_Iterable[_Union[WorkerStatus, _Mapping]]] = ..., sent_bytes: _Optional[int] = ..., received_bytes: _Optional[int] = ..., state: _Optional[str] = ..., seconds: _Optional[float] = ..., status_json: _Optional[str] = ...) -> None: ...

class PingRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class PingReply(_message.Message):
    __slots__ = ("name", "worker_id", "state")
    NAME_FIELD_NUMBER: _ClassVar[int]
    WORKER_ID_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    name: str
    worker_id: str
    state: str
    def __init__(self, name: _Optional[str] = ..., worker_id: _Optional[str] = ..., state: _Optional[str] = ...) -> None: ...
