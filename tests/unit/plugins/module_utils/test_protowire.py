"""Tests of the protobuf codec against byte vectors worked out by hand from the protobuf encoding spec.

Where the optional ``protobuf`` package is installed, the well-known types are also compared
with its output (skipped otherwise; the module itself never needs it).
"""
from __future__ import annotations

import datetime

import pytest

from ansible_collections.daemonless.oci.plugins.module_utils import protowire as pw
from ansible_collections.daemonless.oci.plugins.module_utils.protowire import (
    ANY,
    BOOL,
    BYTES,
    DOUBLE,
    EMPTY,
    ENUM,
    FIXED32,
    FIXED64,
    FLOAT,
    INT32,
    INT64,
    MESSAGE,
    STRING,
    TIMESTAMP,
    UINT32,
    UINT64,
    Field,
    Message,
    ProtoDecodeError,
    ProtoEncodeError,
)

# The examples of the protobuf encoding guide: Test1 {int32 a = 1}, Test2 {string b = 2},
# Test3 {Test1 c = 3}, Test4 {string d = 1; repeated int32 e = 4 [packed]}.
TEST1 = Message("Test1", [Field(1, "a", INT32)])
TEST2 = Message("Test2", [Field(2, "b", STRING)])
TEST3 = Message("Test3", [Field(3, "c", MESSAGE, message=TEST1)])
TEST4 = Message("Test4", [Field(1, "d", STRING), Field(4, "e", INT32, repeated=True)])

ALL = Message("All", [
    Field(1, "b", BOOL), Field(2, "i32", INT32), Field(3, "i64", INT64), Field(4, "u32", UINT32),
    Field(5, "u64", UINT64), Field(6, "e", ENUM), Field(7, "s", STRING), Field(8, "raw", BYTES),
    Field(9, "f32", FIXED32), Field(10, "f64", FIXED64), Field(11, "d", DOUBLE), Field(12, "f", FLOAT),
    Field(13, "sub", MESSAGE, message=TEST1), Field(14, "subs", MESSAGE, repeated=True, message=TEST1),
    Field(15, "strs", STRING, repeated=True), Field(16, "nums", UINT64, repeated=True),
])


@pytest.mark.parametrize("value, encoded", [
    (0, "00"), (1, "01"), (127, "7f"), (128, "8001"), (150, "9601"), (300, "ac02"), (16384, "808001"),
    ((1 << 64) - 1, "ffffffffffffffffff01"),
])
def test_varint_vectors(value: int, encoded: str) -> None:
    assert pw.encode_varint(value).hex() == encoded
    assert pw.decode_varint(bytes.fromhex(encoded), 0) == (value, len(encoded) // 2)


@pytest.mark.parametrize("data", ["", "80", "ff80"])
def test_truncated_varint_is_an_error(data: str) -> None:
    with pytest.raises(ProtoDecodeError, match="truncated"):
        pw.decode_varint(bytes.fromhex(data), 0)


def test_overlong_and_overflowing_varints_are_errors() -> None:
    with pytest.raises(ProtoDecodeError, match="longer than 10"):
        pw.decode_varint(b"\xff" * 10 + b"\x01", 0)
    with pytest.raises(ProtoDecodeError, match="overflows"):
        pw.decode_varint(b"\xff" * 9 + b"\x02", 0)


def test_varint_range_is_checked_on_encode() -> None:
    with pytest.raises(ProtoEncodeError):
        pw.encode_varint(-1)
    with pytest.raises(ProtoEncodeError):
        pw.encode_varint(1 << 64)


def test_encoding_guide_examples() -> None:
    assert TEST1.encode({"a": 150}).hex() == "089601"
    assert TEST2.encode({"b": "testing"}).hex() == "120774657374696e67"
    assert TEST3.encode({"c": {"a": 150}}).hex() == "1a03089601"
    assert TEST4.encode({"d": "hello", "e": [1, 2, 3]}).hex() == "0a0568656c6c6f2203010203"
    # packed [3, 270, 86942]: 03, 8e 02, 9e a7 05 -> 6 bytes
    assert TEST4.encode({"e": [3, 270, 86942]}).hex() == "2206038e029ea705"


def test_decode_guide_examples() -> None:
    assert TEST1.decode(bytes.fromhex("089601")) == {"a": 150}
    assert TEST3.decode(bytes.fromhex("1a03089601")) == {"c": {"a": 150}}
    assert TEST4.decode(bytes.fromhex("2206038e029ea705")) == {"d": "", "e": [3, 270, 86942]}


def test_unpacked_repeated_numbers_are_accepted() -> None:
    # three separate varint records of field 4 (key 0x20), as a proto2 writer would send them
    assert TEST4.decode(bytes.fromhex("200120022003")) == {"d": "", "e": [1, 2, 3]}
    # mixed packed and unpacked occurrences concatenate
    assert TEST4.decode(bytes.fromhex("2001") + bytes.fromhex("22020203")) == {"d": "", "e": [1, 2, 3]}


def test_negative_ints_are_ten_byte_twos_complement() -> None:
    assert TEST1.encode({"a": -1}).hex() == "08" + "ff" * 9 + "01"
    assert TEST1.decode(bytes.fromhex("08" + "ff" * 9 + "01")) == {"a": -1}
    i64 = Message("I64", [Field(1, "v", INT64)])
    assert i64.decode(i64.encode({"v": -62135596800})) == {"v": -62135596800}
    # an int32 sent as a 5-byte varint (some writers truncate) still reads as negative
    assert TEST1.decode(bytes.fromhex("08ffffffff0f")) == {"a": -1}


def test_bool_fixed_and_float_vectors() -> None:
    assert ALL.encode({"b": True}).hex() == "0801"
    assert ALL.encode({"f32": 1}).hex() == "4d01000000"  # field 9, wire type 5
    assert ALL.encode({"f64": 1}).hex() == "510100000000000000"  # field 10, wire type 1
    assert ALL.encode({"d": 1.0}).hex() == "59000000000000f03f"
    assert ALL.encode({"f": 1.0}).hex() == "650000803f"


def test_full_round_trip() -> None:
    values = {
        "b": True, "i32": -5, "i64": -(1 << 40), "u32": (1 << 32) - 1, "u64": (1 << 64) - 1, "e": 4,
        "s": "héllo", "raw": b"\x00\xff", "f32": 7, "f64": 1 << 60, "d": 2.5, "f": -0.5,
        "sub": {"a": 1}, "subs": [{"a": 1}, {"a": 0}, {"a": -2}], "strs": ["x", "", "z"], "nums": [0, 1, 1 << 63],
    }
    assert ALL.decode(ALL.encode(values)) == values


def test_zero_values_are_omitted_and_absent_fields_read_as_defaults() -> None:
    assert ALL.encode({"b": False, "i32": 0, "s": "", "raw": b"", "strs": [], "sub": None}) == b""
    decoded = ALL.decode(b"")
    assert decoded["s"] == "" and decoded["i64"] == 0 and decoded["b"] is False
    assert decoded["sub"] is None and decoded["subs"] == [] and decoded["nums"] == []
    # an empty but present sub-message is written and reads back as a dict, not None
    assert ALL.encode({"sub": {}}).hex() == "6a00"
    assert ALL.decode(bytes.fromhex("6a00"))["sub"] == {"a": 0}


def test_unknown_fields_of_every_wire_type_are_skipped() -> None:
    unknown = (
        bytes.fromhex("f807ac02")  # field 127 varint 300
        + bytes.fromhex("f9070102030405060708")  # field 127 fixed64
        + bytes.fromhex("fa0703616263")  # field 127 length-delimited "abc"
        + bytes.fromhex("fd0701020304")  # field 127 fixed32
    )
    data = unknown[:4] + TEST1.encode({"a": 150}) + unknown[4:]
    assert TEST1.decode(data) == {"a": 150}


def test_last_scalar_wins_and_repeated_sub_messages_merge() -> None:
    assert TEST1.decode(bytes.fromhex("08010802")) == {"a": 2}
    two = Message("Two", [Field(1, "x", INT32), Field(2, "y", STRING)])
    outer = Message("Outer", [Field(1, "m", MESSAGE, message=two)])
    data = outer.encode({"m": {"x": 5}}) + outer.encode({"m": {"y": "b"}})
    assert outer.decode(data) == {"m": {"x": 5, "y": "b"}}


@pytest.mark.parametrize("data, match", [
    ("0a05616263", "runs past the end"),  # string of 5 bytes with 3 present
    ("5101020304", "truncated fixed64"),
    ("4d0102", "truncated fixed32"),
    ("0b", "unsupported wire type 3"),  # start group
    ("0001", "field number 0"),
    ("08", "truncated varint"),
])
def test_truncated_or_malformed_input_is_an_error(data: str, match: str) -> None:
    with pytest.raises(ProtoDecodeError, match=match):
        ALL.decode(bytes.fromhex(data))


def test_wrong_wire_type_for_a_known_field_is_an_error() -> None:
    with pytest.raises(ProtoDecodeError, match="wire type 2"):
        TEST1.decode(bytes.fromhex("0a0101"))  # field 1 as length-delimited


def test_invalid_utf8_is_an_error() -> None:
    with pytest.raises(ProtoDecodeError, match="UTF-8"):
        TEST2.decode(bytes.fromhex("1202c328"))


def test_packed_fixed_with_bad_length_is_an_error() -> None:
    fixed = Message("F", [Field(1, "v", FIXED32, repeated=True)])
    assert fixed.decode(bytes.fromhex("0a080100000002000000")) == {"v": [1, 2]}
    with pytest.raises(ProtoDecodeError, match="packed fixed32"):
        fixed.decode(bytes.fromhex("0a03010000"))


@pytest.mark.parametrize("values", [
    {"nope": 1}, {"i32": "1"}, {"i32": 1 << 31}, {"u32": -1}, {"b": 1}, {"i32": True}, {"s": b"x"},
    {"raw": "x"}, {"sub": 3}, {"strs": "abc"}, {"f32": -1},
])
def test_bad_values_are_refused_on_encode(values: dict) -> None:
    with pytest.raises(ProtoEncodeError):
        ALL.encode(values)


def test_schema_definition_errors() -> None:
    with pytest.raises(ValueError):
        Field(1, "x", "sint32")
    with pytest.raises(ValueError):
        Field(1, "x", MESSAGE)
    with pytest.raises(ValueError):
        Message("Dup", [Field(1, "a", INT32), Field(1, "b", INT32)])
    with pytest.raises(ProtoEncodeError):
        pw.encode_tag(0, 0)


def test_well_known_types() -> None:
    assert EMPTY.encode({}) == b"" and EMPTY.decode(b"") == {}
    assert EMPTY.decode(bytes.fromhex("0801")) == {}  # unknown content in Empty is skipped
    any_value = pw.pack_any("t/x", b"\x01\x02")
    assert ANY.encode(any_value).hex() == "0a03742f78" + "12020102"
    assert ANY.decode(ANY.encode(any_value)) == any_value
    assert TIMESTAMP.encode({"seconds": 1, "nanos": 2}).hex() == "08011002"


def test_timestamp_conversions() -> None:
    moment = {"seconds": 1700000000, "nanos": 123456789}
    expected = datetime.datetime(2023, 11, 14, 22, 13, 20, 123456, tzinfo=datetime.timezone.utc)
    assert pw.timestamp_to_datetime(moment) == expected
    assert pw.timestamp_to_ns(moment) == 1700000000123456789
    go_zero = TIMESTAMP.decode(TIMESTAMP.encode({"seconds": pw.GO_ZERO_TIME_SECONDS}))
    assert go_zero == {"seconds": -62135596800, "nanos": 0}
    for absent in (None, go_zero, {"seconds": 0, "nanos": 0}):
        assert pw.timestamp_to_datetime(absent) is None
        assert pw.timestamp_to_ns(absent) is None
    back = pw.datetime_to_timestamp(datetime.datetime(2023, 11, 14, 22, 13, 20, 5, tzinfo=datetime.timezone.utc))
    assert back == {"seconds": 1700000000, "nanos": 5000}
    with pytest.raises(ProtoEncodeError):
        pw.datetime_to_timestamp(datetime.datetime(2023, 1, 1))


def test_iter_fields_reports_raw_records() -> None:
    records = list(pw.iter_fields(bytes.fromhex("089601") + bytes.fromhex("120161")))
    assert records == [(1, 0, 150), (2, 2, b"a")]


def test_agrees_with_the_protobuf_package_when_installed() -> None:
    timestamp_pb2 = pytest.importorskip("google.protobuf.timestamp_pb2", reason="protobuf package not installed")
    any_pb2 = pytest.importorskip("google.protobuf.any_pb2")
    theirs = timestamp_pb2.Timestamp(seconds=-62135596800, nanos=7).SerializeToString()
    assert TIMESTAMP.encode({"seconds": -62135596800, "nanos": 7}) == theirs
    assert TIMESTAMP.decode(theirs) == {"seconds": -62135596800, "nanos": 7}
    packed = any_pb2.Any(type_url="types.containerd.io/x", value=b"{}").SerializeToString()
    assert ANY.encode({"type_url": "types.containerd.io/x", "value": b"{}"}) == packed
