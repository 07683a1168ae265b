"""A small protocol-buffers (proto3) codec driven by declarative message schemas.

Why our own codec instead of the ``protobuf`` package: the managed node must run the runtime
library with the Python standard library only, and the ``vm`` runtime type needs protobuf only
for a small, fixed set of messages (the ttrpc envelope, the ``containerd.task.v2`` Task API,
``google.protobuf`` Timestamp/Any/Empty and the two cgroup metrics messages). Generating code
with ``protoc`` would add a build step and a heavy dependency for about forty messages whose
field numbers never change. A table-driven encoder/decoder of a few hundred lines covers every
wire feature these messages use, is easy to audit against the ``.proto`` files, and keeps each
message definition a few lines of data.

What is supported (the subset the messages above need):

* wire type 0 (varint) for ``bool``, ``int32``, ``int64``, ``uint32``, ``uint64`` and ``enum``
  (negative ``int32``/``int64`` are ten-byte two's complement varints, as protobuf specifies);
* wire type 2 (length-delimited) for ``string``, ``bytes``, nested messages and packed
  repeated numbers;
* wire types 1 and 5 (``fixed64``/``double`` and ``fixed32``/``float``) for completeness;
* repeated fields: numbers are encoded packed and accepted packed or unpacked on decode,
  strings/bytes/messages are one record per element;
* unknown fields of any wire type are skipped; a truncated or malformed input raises
  ``ProtoDecodeError`` instead of returning a half-decoded message.

Not supported, because no message here needs them: groups (wire types 3/4), ``sint``
(zigzag) types, ``oneof`` bookkeeping and proto2 defaults. ``map<K, V>`` fields are declared as
repeated messages with ``key = 1`` and ``value = 2`` (which is exactly their wire form).

Usage::

    KEY_VALUE = Message("KeyValue", [Field(1, "key", STRING), Field(2, "value", STRING)])
    data = KEY_VALUE.encode({"key": "a", "value": "b"})
    KEY_VALUE.decode(data)  # {"key": "a", "value": "b"}

``decode`` returns a dict holding every declared field: absent scalars read as their proto3
zero value, absent repeated fields as ``[]`` and absent sub-messages as ``None`` (so callers can
tell "not sent" from "sent empty", which matters for ``Timestamp``).
"""
from __future__ import annotations

import datetime
import struct
from dataclasses import dataclass
from typing import Any, Dict, Iterator, List, Mapping, Optional, Sequence, Tuple

from ansible_collections.daemonless.oci.plugins.module_utils.errors import OciError

# Wire types (protobuf encoding spec).
WIRE_VARINT = 0
WIRE_FIXED64 = 1
WIRE_LEN = 2
WIRE_FIXED32 = 5

# Field kinds a schema may declare.
BOOL = "bool"
INT32 = "int32"
INT64 = "int64"
UINT32 = "uint32"
UINT64 = "uint64"
ENUM = "enum"
STRING = "string"
BYTES = "bytes"
MESSAGE = "message"
FIXED32 = "fixed32"
FIXED64 = "fixed64"
DOUBLE = "double"
FLOAT = "float"

_VARINT_KINDS = frozenset((BOOL, INT32, INT64, UINT32, UINT64, ENUM))
_FIXED64_KINDS = frozenset((FIXED64, DOUBLE))
_FIXED32_KINDS = frozenset((FIXED32, FLOAT))
_NUMERIC_KINDS = _VARINT_KINDS | _FIXED64_KINDS | _FIXED32_KINDS
_LEN_KINDS = frozenset((STRING, BYTES, MESSAGE))

_MASK64 = (1 << 64) - 1
_MAX_VARINT_BYTES = 10
_MAX_FIELD_NUMBER = (1 << 29) - 1


class ProtoError(OciError):
    """Base class of codec errors (a message that cannot be encoded or decoded)."""


class ProtoEncodeError(ProtoError, ValueError):
    """A value does not fit the declared field (wrong type, out of range)."""


class ProtoDecodeError(ProtoError, ValueError):
    """The bytes are not a valid encoding of the message (truncated, bad wire type, bad UTF-8)."""


# ---------------------------------------------------------------------------------------------
# Primitive encoders/decoders
# ---------------------------------------------------------------------------------------------

def encode_varint(value: int) -> bytes:
    """Encode a non-negative integer below 2**64 as a base-128 varint (7 bits per byte, LSB first)."""
    if value < 0 or value > _MASK64:
        raise ProtoEncodeError("varint out of range: {}".format(value))
    out = bytearray()
    while True:
        byte = value & 0x7F
        value >>= 7
        if value:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def decode_varint(data: bytes, pos: int) -> Tuple[int, int]:
    """Read a varint at ``pos``; return (value, next position). Truncation or >10 bytes is an error."""
    result = 0
    shift = 0
    for index in range(_MAX_VARINT_BYTES):
        if pos + index >= len(data):
            raise ProtoDecodeError("truncated varint at offset {}".format(pos))
        byte = data[pos + index]
        result |= (byte & 0x7F) << shift
        if not byte & 0x80:
            if result > _MASK64:
                raise ProtoDecodeError("varint at offset {} overflows 64 bits".format(pos))
            return result, pos + index + 1
        shift += 7
    raise ProtoDecodeError("varint at offset {} is longer than 10 bytes".format(pos))


def encode_tag(number: int, wire_type: int) -> bytes:
    """The key that precedes every field: (field number << 3) | wire type, as a varint."""
    if not 1 <= number <= _MAX_FIELD_NUMBER:
        raise ProtoEncodeError("invalid field number {}".format(number))
    return encode_varint((number << 3) | wire_type)


def encode_length_delimited(number: int, payload: bytes) -> bytes:
    """A wire-type-2 record: tag, length varint, payload."""
    return encode_tag(number, WIRE_LEN) + encode_varint(len(payload)) + payload


def _signed64(value: int) -> int:
    """Reinterpret an unsigned 64-bit varint as two's complement."""
    return value - (1 << 64) if value & (1 << 63) else value


def _signed32(value: int) -> int:
    """Keep the low 32 bits of a varint as a signed int32 (how protobuf reads int32)."""
    value &= 0xFFFFFFFF
    return value - (1 << 32) if value & (1 << 31) else value


def _varint_for(kind: str, value: Any, name: str) -> int:
    """Map a Python value of ``kind`` to the unsigned integer that goes on the wire."""
    if kind == BOOL:
        if not isinstance(value, bool):
            raise ProtoEncodeError("field {}: expected bool, got {!r}".format(name, value))
        return int(value)
    if isinstance(value, bool) or not isinstance(value, int):
        raise ProtoEncodeError("field {}: expected int, got {!r}".format(name, value))
    limits = {
        INT32: (-(1 << 31), (1 << 31) - 1),
        ENUM: (-(1 << 31), (1 << 31) - 1),
        INT64: (-(1 << 63), (1 << 63) - 1),
        UINT32: (0, (1 << 32) - 1),
        UINT64: (0, _MASK64),
    }
    low, high = limits[kind]
    if not low <= value <= high:
        raise ProtoEncodeError("field {}: {} out of range for {}".format(name, value, kind))
    return value & _MASK64


def _value_from_varint(kind: str, raw: int) -> Any:
    """Map a decoded varint to the Python value of ``kind``."""
    if kind == BOOL:
        return raw != 0
    if kind in (INT32, ENUM):
        return _signed32(raw)
    if kind == INT64:
        return _signed64(raw)
    if kind == UINT32:
        return raw & 0xFFFFFFFF
    return raw


def _fixed_bytes(kind: str, value: Any, name: str) -> bytes:
    """Encode a fixed-width number (little-endian, as protobuf specifies)."""
    try:
        if kind == FIXED64:
            return struct.pack("<Q", value)
        if kind == DOUBLE:
            return struct.pack("<d", value)
        if kind == FIXED32:
            return struct.pack("<I", value)
        return struct.pack("<f", value)
    except struct.error as exc:
        raise ProtoEncodeError("field {}: {!r} does not fit {}: {}".format(name, value, kind, exc)) from exc


def _value_from_fixed(kind: str, raw: bytes) -> Any:
    fmt = {FIXED64: "<Q", DOUBLE: "<d", FIXED32: "<I", FLOAT: "<f"}[kind]
    return struct.unpack(fmt, raw)[0]


def _wire_type_of(kind: str) -> int:
    if kind in _VARINT_KINDS:
        return WIRE_VARINT
    if kind in _FIXED64_KINDS:
        return WIRE_FIXED64
    if kind in _FIXED32_KINDS:
        return WIRE_FIXED32
    return WIRE_LEN


# ---------------------------------------------------------------------------------------------
# Raw record iteration
# ---------------------------------------------------------------------------------------------

def iter_fields(data: bytes) -> Iterator[Tuple[int, int, Any]]:
    """Yield (field number, wire type, raw value) for each record of an encoded message.

    The raw value is an int for varints and bytes for the other wire types. Any truncation is a
    ``ProtoDecodeError``; groups (wire types 3 and 4) are refused as nothing here uses them.
    """
    pos = 0
    size = len(data)
    while pos < size:
        key, pos = decode_varint(data, pos)
        number, wire_type = key >> 3, key & 7
        if number == 0:
            raise ProtoDecodeError("field number 0 at offset {}".format(pos))
        if wire_type == WIRE_VARINT:
            value, pos = decode_varint(data, pos)
        elif wire_type == WIRE_LEN:
            length, pos = decode_varint(data, pos)
            if pos + length > size:
                raise ProtoDecodeError("field {}: length {} runs past the end ({} bytes left)".format(
                    number, length, size - pos))
            value, pos = bytes(data[pos:pos + length]), pos + length
        elif wire_type in (WIRE_FIXED64, WIRE_FIXED32):
            width = 8 if wire_type == WIRE_FIXED64 else 4
            if pos + width > size:
                raise ProtoDecodeError("field {}: truncated fixed{} value".format(number, width * 8))
            value, pos = bytes(data[pos:pos + width]), pos + width
        else:
            raise ProtoDecodeError("field {}: unsupported wire type {}".format(number, wire_type))
        yield number, wire_type, value


# ---------------------------------------------------------------------------------------------
# Schemas
# ---------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Field:
    """One declared field: number, Python-side name, kind, repetition and (for MESSAGE) its schema."""

    number: int
    name: str
    kind: str
    repeated: bool = False
    message: Optional["Message"] = None

    def __post_init__(self) -> None:
        if self.kind not in _NUMERIC_KINDS | _LEN_KINDS:
            raise ValueError("field {}: unknown kind {!r}".format(self.name, self.kind))
        if (self.kind == MESSAGE) != (self.message is not None):
            raise ValueError("field {}: a message schema goes with kind MESSAGE only".format(self.name))

    def default(self) -> Any:
        """The value ``decode`` reports when the field is absent."""
        if self.repeated:
            return []
        if self.kind == MESSAGE:
            return None
        return _ZERO[self.kind]


_ZERO: Dict[str, Any] = {BOOL: False, INT32: 0, INT64: 0, UINT32: 0, UINT64: 0, ENUM: 0, FIXED32: 0,
                         FIXED64: 0, DOUBLE: 0.0, FLOAT: 0.0, STRING: "", BYTES: b""}


class Message:
    """A message schema: a name (for error messages) and its fields. Encodes dicts, decodes to dicts."""

    def __init__(self, name: str, fields: Sequence[Field]) -> None:
        self.name = name
        self.fields: Tuple[Field, ...] = tuple(fields)
        self._by_number = {f.number: f for f in self.fields}
        self._by_name = {f.name: f for f in self.fields}
        if len(self._by_number) != len(self.fields) or len(self._by_name) != len(self.fields):
            raise ValueError("message {}: duplicate field number or name".format(name))

    def __repr__(self) -> str:
        return "Message({!r})".format(self.name)

    # -- encoding ---------------------------------------------------------------------------

    def encode(self, values: Optional[Mapping[str, Any]] = None) -> bytes:
        """Encode ``values`` (field name -> value). Unknown names are an error; zero values are omitted.

        Proto3 semantics: a scalar equal to its zero value and an empty repeated field are not
        written; a sub-message is written whenever its value is not None (an empty dict gives an
        empty but present sub-message).
        """
        values = values or {}
        unknown = set(values) - set(self._by_name)
        if unknown:
            raise ProtoEncodeError("message {} has no field(s) {}".format(self.name, ", ".join(sorted(unknown))))
        out = bytearray()
        for fdef in self.fields:
            if fdef.name in values:
                out += self._encode_field(fdef, values[fdef.name])
        return bytes(out)

    def _encode_field(self, fdef: Field, value: Any) -> bytes:
        if value is None:
            return b""
        if fdef.repeated:
            if isinstance(value, (str, bytes)) or not isinstance(value, (list, tuple)):
                raise ProtoEncodeError("field {}.{}: expected a list".format(self.name, fdef.name))
            return self._encode_repeated(fdef, value)
        if fdef.kind != MESSAGE and value == _ZERO[fdef.kind] and type(value) is type(_ZERO[fdef.kind]):
            return b""
        return self._encode_one(fdef, value)

    def _encode_repeated(self, fdef: Field, items: Sequence[Any]) -> bytes:
        if not items:
            return b""
        if fdef.kind in _NUMERIC_KINDS:  # packed
            body = b"".join(self._encode_scalar_body(fdef, item) for item in items)
            return encode_length_delimited(fdef.number, body)
        return b"".join(self._encode_one(fdef, item) for item in items)

    def _encode_one(self, fdef: Field, value: Any) -> bytes:
        if fdef.kind == MESSAGE:
            if not isinstance(value, Mapping):
                raise ProtoEncodeError("field {}.{}: expected a dict".format(self.name, fdef.name))
            return encode_length_delimited(fdef.number, fdef.message.encode(value))
        if fdef.kind == STRING:
            if not isinstance(value, str):
                raise ProtoEncodeError("field {}.{}: expected str, got {!r}".format(self.name, fdef.name, value))
            return encode_length_delimited(fdef.number, value.encode("utf-8"))
        if fdef.kind == BYTES:
            if not isinstance(value, (bytes, bytearray, memoryview)):
                raise ProtoEncodeError("field {}.{}: expected bytes".format(self.name, fdef.name))
            return encode_length_delimited(fdef.number, bytes(value))
        return encode_tag(fdef.number, _wire_type_of(fdef.kind)) + self._encode_scalar_body(fdef, value)

    def _encode_scalar_body(self, fdef: Field, value: Any) -> bytes:
        label = "{}.{}".format(self.name, fdef.name)
        if fdef.kind in _VARINT_KINDS:
            return encode_varint(_varint_for(fdef.kind, value, label))
        return _fixed_bytes(fdef.kind, value, label)

    # -- decoding ---------------------------------------------------------------------------

    def decode(self, data: bytes) -> Dict[str, Any]:
        """Decode ``data`` into a dict with every declared field (defaults for absent ones).

        Unknown field numbers are skipped whatever their wire type. For a non-repeated field
        seen twice the last value wins, and two occurrences of a sub-message are merged, as the
        protobuf specification requires.
        """
        result: Dict[str, Any] = {f.name: f.default() for f in self.fields}
        for number, wire_type, raw in iter_fields(bytes(data)):
            fdef = self._by_number.get(number)
            if fdef is None:
                continue
            self._decode_into(result, fdef, wire_type, raw)
        return result

    def _decode_into(self, result: Dict[str, Any], fdef: Field, wire_type: int, raw: Any) -> None:
        expected = _wire_type_of(fdef.kind)
        if fdef.repeated and fdef.kind in _NUMERIC_KINDS and wire_type == WIRE_LEN:
            result[fdef.name].extend(self._decode_packed(fdef, raw))
            return
        if wire_type != expected:
            raise ProtoDecodeError("{}.{}: wire type {} where {} was expected".format(
                self.name, fdef.name, wire_type, expected))
        value = self._decode_one(fdef, raw)
        if fdef.repeated:
            result[fdef.name].append(value)
        elif fdef.kind == MESSAGE and result[fdef.name] is not None:
            result[fdef.name] = fdef.message.decode(fdef.message.encode(result[fdef.name]) + raw)
        else:
            result[fdef.name] = value

    def _decode_one(self, fdef: Field, raw: Any) -> Any:
        if fdef.kind in _VARINT_KINDS:
            return _value_from_varint(fdef.kind, raw)
        if fdef.kind in _FIXED64_KINDS or fdef.kind in _FIXED32_KINDS:
            return _value_from_fixed(fdef.kind, raw)
        if fdef.kind == STRING:
            try:
                return raw.decode("utf-8")
            except UnicodeDecodeError as exc:
                raise ProtoDecodeError("{}.{}: invalid UTF-8: {}".format(self.name, fdef.name, exc)) from exc
        if fdef.kind == BYTES:
            return raw
        return fdef.message.decode(raw)

    def _decode_packed(self, fdef: Field, raw: bytes) -> List[Any]:
        values: List[Any] = []
        pos = 0
        if fdef.kind in _VARINT_KINDS:
            while pos < len(raw):
                number, pos = decode_varint(raw, pos)
                values.append(_value_from_varint(fdef.kind, number))
            return values
        width = 8 if fdef.kind in _FIXED64_KINDS else 4
        if len(raw) % width:
            raise ProtoDecodeError("{}.{}: packed fixed{} data of {} bytes".format(
                self.name, fdef.name, width * 8, len(raw)))
        return [_value_from_fixed(fdef.kind, raw[i:i + width]) for i in range(0, len(raw), width)]


# ---------------------------------------------------------------------------------------------
# Well-known types
# ---------------------------------------------------------------------------------------------

EMPTY = Message("google.protobuf.Empty", [])
TIMESTAMP = Message("google.protobuf.Timestamp", [Field(1, "seconds", INT64), Field(2, "nanos", INT32)])
ANY = Message("google.protobuf.Any", [Field(1, "type_url", STRING), Field(2, "value", BYTES)])

# Go's zero time.Time (0001-01-01T00:00:00Z) as a Timestamp: what the runc shim sends for
# "not exited yet" because its exited_at fields are non-nullable.
GO_ZERO_TIME_SECONDS = -62135596800
_EPOCH = datetime.datetime(1970, 1, 1, tzinfo=datetime.timezone.utc)


def timestamp_to_datetime(value: Optional[Mapping[str, int]]) -> Optional[datetime.datetime]:
    """A decoded Timestamp as an aware UTC datetime; None for absent, all-zero or Go's zero time.

    Nanoseconds are truncated to microseconds (datetime's resolution); use ``timestamp_to_ns``
    when the full precision matters.
    """
    if value is None:
        return None
    seconds, nanos = value.get("seconds", 0), value.get("nanos", 0)
    if (seconds == 0 and nanos == 0) or seconds <= GO_ZERO_TIME_SECONDS:
        return None
    try:
        return _EPOCH + datetime.timedelta(seconds=seconds, microseconds=nanos // 1000)
    except OverflowError as exc:
        raise ProtoDecodeError("timestamp {}s is out of range".format(seconds)) from exc


def timestamp_to_ns(value: Optional[Mapping[str, int]]) -> Optional[int]:
    """A decoded Timestamp as integer nanoseconds since the epoch, with the same None rule."""
    if value is None:
        return None
    seconds, nanos = value.get("seconds", 0), value.get("nanos", 0)
    if (seconds == 0 and nanos == 0) or seconds <= GO_ZERO_TIME_SECONDS:
        return None
    return seconds * 1_000_000_000 + nanos


def datetime_to_timestamp(moment: datetime.datetime) -> Dict[str, int]:
    """An aware datetime as a Timestamp dict (naive datetimes are refused: their zone is unknown)."""
    if moment.tzinfo is None:
        raise ProtoEncodeError("naive datetime {} has no time zone".format(moment))
    delta = moment - _EPOCH
    seconds = delta.days * 86400 + delta.seconds
    return {"seconds": seconds, "nanos": delta.microseconds * 1000}


def pack_any(type_url: str, value: bytes) -> Dict[str, Any]:
    """An Any dict ready to be a MESSAGE field value."""
    return {"type_url": type_url, "value": bytes(value)}
