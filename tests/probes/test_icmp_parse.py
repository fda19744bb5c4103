"""Pure ICMP packet parsing and building: arbitrary bytes never raise, built packets round-trip."""

from __future__ import annotations

import socket
import struct

import pytest
from hypothesis import given
from hypothesis import strategies as st

from probes.base import Failure
from probes.icmp import (
    ECHO_REPLY,
    ERROR,
    ICMP4_DEST_UNREACHABLE,
    ICMP4_ECHO_REPLY,
    ICMP4_ECHO_REQUEST,
    ICMP4_TIME_EXCEEDED,
    ICMP6_DEST_UNREACHABLE,
    ICMP6_ECHO_REPLY,
    ICMP6_ECHO_REQUEST,
    UNRELATED,
    EchoTemplate,
    build_echo,
    build_error4,
    build_error6,
    build_ipv4,
    build_ipv6_header,
    failure_for_icmp_error,
    failure_for_send_error,
    internet_checksum,
    parse_extended_error,
    parse_icmp4,
    parse_icmp6,
)

u16 = st.integers(min_value=0, max_value=0xFFFF)
payloads = st.binary(max_size=64)
ipv4s = st.ip_addresses(v=4).map(str)
ipv6s = st.ip_addresses(v=6).map(str)


@given(st.binary(max_size=200), st.booleans())
def test_arbitrary_bytes_never_raise_v4(data: bytes, with_header: bool) -> None:
    parse_icmp4(data, with_header)


@given(st.binary(max_size=200))
def test_arbitrary_bytes_never_raise_v6(data: bytes) -> None:
    parse_icmp6(data)


@given(st.binary(max_size=80), st.booleans())
def test_arbitrary_extended_error_never_raises(data: bytes, v6: bool) -> None:
    parse_extended_error(data, v6)


@given(u16, u16, payloads, st.integers(min_value=1, max_value=255), ipv4s, ipv4s)
def test_echo_reply_v4_round_trip(
    ident: int, seq: int, payload: bytes, ttl: int, src: str, dst: str
) -> None:
    icmp = build_echo(ICMP4_ECHO_REPLY, ident, seq, payload)
    assert internet_checksum(icmp) == 0  # a valid checksum sums to zero
    bare = parse_icmp4(icmp, with_ip_header=False)
    assert bare is not None
    assert (bare.kind, bare.ident, bare.seq, bare.payload, bare.ttl) == (
        ECHO_REPLY, ident, seq, payload, None,
    )  # fmt: skip
    framed = parse_icmp4(build_ipv4(src, dst, icmp, ttl=ttl), with_ip_header=True)
    assert framed is not None
    assert (framed.kind, framed.ident, framed.seq, framed.payload, framed.ttl) == (
        ECHO_REPLY, ident, seq, payload, ttl,
    )  # fmt: skip


@given(u16, u16, payloads)
def test_echo_reply_v6_round_trip(ident: int, seq: int, payload: bytes) -> None:
    parsed = parse_icmp6(build_echo(ICMP6_ECHO_REPLY, ident, seq, payload))
    assert parsed is not None
    assert (parsed.kind, parsed.ident, parsed.seq, parsed.payload) == (
        ECHO_REPLY, ident, seq, payload,
    )  # fmt: skip


@given(u16, u16, payloads)
def test_echo_template_matches_full_checksum(ident: int, seq: int, payload: bytes) -> None:
    template = EchoTemplate(False, ident, payload)
    assert template.packet(seq) == build_echo(ICMP4_ECHO_REQUEST, ident, seq, payload)
    assert internet_checksum(template.packet(seq)) == 0


@given(u16, u16, payloads, ipv4s, ipv4s, st.sampled_from([0, 1, 3, 9, 10, 13]))
def test_unreachable_v4_quoting_our_echo(
    ident: int, seq: int, payload: bytes, src: str, dst: str, code: int
) -> None:
    request = build_ipv4(src, dst, build_echo(ICMP4_ECHO_REQUEST, ident, seq, payload))
    error = build_error4(ICMP4_DEST_UNREACHABLE, code, request[:28])
    parsed = parse_icmp4(build_ipv4("192.0.2.1", src, error), with_ip_header=True)
    assert parsed is not None
    assert (parsed.kind, parsed.ident, parsed.seq, parsed.quoted_dst, parsed.code) == (
        ERROR, ident, seq, dst, code,
    )  # fmt: skip


@given(u16, u16, ipv6s, ipv6s)
def test_unreachable_v6_quoting_our_echo(ident: int, seq: int, src: str, dst: str) -> None:
    echo = build_echo(ICMP6_ECHO_REQUEST, ident, seq, b"12345678")
    quoted = build_ipv6_header(src, dst, len(echo)) + echo
    parsed = parse_icmp6(build_error6(ICMP6_DEST_UNREACHABLE, 3, quoted))
    assert parsed is not None
    canonical_dst = socket.inet_ntop(socket.AF_INET6, socket.inet_pton(socket.AF_INET6, dst))
    assert (parsed.kind, parsed.ident, parsed.seq, parsed.quoted_dst) == (
        ERROR, ident, seq, canonical_dst,
    )  # fmt: skip


def test_error_about_other_traffic_is_unrelated() -> None:
    udp = build_ipv4("10.0.0.1", "10.0.0.2", struct.pack("!HHHH", 1234, 53, 8, 0), protocol=17)
    parsed = parse_icmp4(build_error4(ICMP4_DEST_UNREACHABLE, 3, udp), with_ip_header=False)
    assert parsed is not None and parsed.kind == UNRELATED
    udp6 = build_ipv6_header("fd00::1", "fd00::2", 8, next_header=17) + bytes(8)
    parsed6 = parse_icmp6(build_error6(ICMP6_DEST_UNREACHABLE, 0, udp6))
    assert parsed6 is not None and parsed6.kind == UNRELATED


@pytest.mark.parametrize(
    "packet",
    [
        b"",
        b"\x00\x00\x00",  # shorter than an ICMP header
        build_error4(ICMP4_DEST_UNREACHABLE, 1, b"\x45\x00"),  # quote too short
        build_error4(ICMP4_TIME_EXCEEDED, 0, b"\x65" + bytes(27)),  # quote is not IPv4
    ],
)
def test_truncated_or_garbage_v4_is_none(packet: bytes) -> None:
    assert parse_icmp4(packet, with_ip_header=False) is None


def test_ipv4_header_checks() -> None:
    echo = build_echo(ICMP4_ECHO_REPLY, 1, 2, b"x")
    assert parse_icmp4(build_ipv4("10.0.0.1", "10.0.0.2", echo)[:24], True) is None  # cut short
    assert parse_icmp4(build_ipv4("10.0.0.1", "10.0.0.2", echo, protocol=6), True) is None
    assert parse_icmp4(b"\x60" + bytes(40), True) is None  # IPv6 bytes on an IPv4 socket


def test_extended_error_fields() -> None:
    offender = struct.pack("=HH4s8x", socket.AF_INET, 0, socket.inet_aton("10.99.0.2"))
    cdata = struct.pack("=IBBBBII", 113, 2, 3, 1, 0, 0, 0) + offender
    parsed = parse_extended_error(cdata, v6=False)
    assert parsed is not None
    assert (parsed.errno, parsed.origin, parsed.icmp_type, parsed.code, parsed.offender) == (
        113, 2, 3, 1, "10.99.0.2",
    )  # fmt: skip
    assert parse_extended_error(cdata[:10], v6=False) is None


@pytest.mark.parametrize(
    ("v6", "icmp_type", "code", "expected"),
    [
        (False, 3, 0, Failure.NETWORK_UNREACHABLE),
        (False, 3, 1, Failure.HOST_UNREACHABLE),
        (False, 3, 13, Failure.HOST_UNREACHABLE),
        (False, 11, 0, Failure.NETWORK_UNREACHABLE),
        (True, 1, 0, Failure.NETWORK_UNREACHABLE),
        (True, 1, 3, Failure.HOST_UNREACHABLE),
        (True, 3, 0, Failure.NETWORK_UNREACHABLE),
    ],
)
def test_failure_for_icmp_error(v6: bool, icmp_type: int, code: int, expected: Failure) -> None:
    assert failure_for_icmp_error(v6, icmp_type, code) is expected


@pytest.mark.parametrize(
    ("err", "expected"),
    [
        (113, Failure.HOST_UNREACHABLE),
        (101, Failure.NETWORK_UNREACHABLE),
        (22, Failure.NETWORK_UNREACHABLE),
        (1, Failure.OTHER),
    ],
)
def test_failure_for_send_error(err: int, expected: Failure) -> None:
    assert failure_for_send_error(err) is expected
