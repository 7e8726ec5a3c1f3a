#!/usr/bin/env python3
"""Writes the committed fuzz seeds in fuzz/seeds/<target>/.

pgoutput_decode seeds come from the pgoutput messages captured from real
servers in tests/fixtures/pgoutput/: every PostgreSQL 15 fixture, and the
protocol 4 fixtures of PostgreSQL 17 (15 has no protocol 4). One seed per
fixture
(its messages in order, runs of more than two Inserts cut to two) and one
per message type per fixture (inside a streamed block, after that block's
Stream Start). replication_framing seeds are hand-made server byte streams
built from the same messages. Input formats: see fuzz/README.md.

Run from anywhere: python3 fuzz/make_seeds.py
"""

import pathlib
import shutil
import struct

FUZZ = pathlib.Path(__file__).resolve().parent
FIXTURES = FUZZ.parent / "tests" / "fixtures" / "pgoutput"
SEEDS = FUZZ / "seeds"


def read_fixture(path):
    """(protocol version, [message bytes]) of one fixture file."""
    version = int(path.name.split(".proto")[1].split(".")[0])
    lines = path.read_text().splitlines()
    return version, [bytes.fromhex(l) for l in lines if l and not l.startswith("#")]


def capped(messages, run=2):
    """The messages with runs of more than `run` Inserts cut to `run`."""
    out, inserts = [], 0
    for m in messages:
        inserts = inserts + 1 if m[:1] == b"I" else 0
        if inserts <= run:
            out.append(m)
    return out


def decode_input(version, messages):
    """A pgoutput_decode input: version byte, then u16-length-prefixed messages."""
    out = bytes([version - 1])
    for m in messages:
        assert len(m) < 1 << 16, len(m)
        out += struct.pack(">H", len(m)) + m
    return out


def frame(tag, body=b""):
    return tag + struct.pack(">i", len(body) + 4) + body


def xlog(data, lsn=0x16_B374_D848, time=774_000_000_000_000):
    return frame(b"d", b"w" + struct.pack(">QQq", lsn, lsn + 0x100, time) + data)


def keepalive(lsn=0x16_B374_D948, reply=1):
    return frame(b"d", b"k" + struct.pack(">Qqb", lsn, 774_000_000_000_001, reply))


def cstr(s):
    return s.encode() + b"\0"


def fields(*pairs):
    return b"".join(k.encode() + cstr(v) for k, v in pairs) + b"\0"


def framing_input(cut, version, stream):
    return bytes([cut, version - 1]) + stream


def write(target, name, data):
    path = SEEDS / target / name
    path.write_bytes(data)


def main():
    for target in ("pgoutput_decode", "replication_framing"):
        shutil.rmtree(SEEDS / target, ignore_errors=True)
        (SEEDS / target).mkdir(parents=True)

    fixtures = {}
    paths = sorted(FIXTURES.glob("pg15/*.hex")) + sorted(FIXTURES.glob("pg17/*.proto4.hex"))
    for path in paths:
        name = f"{path.parent.name}.{path.name.removesuffix('.hex')}"
        version, messages = read_fixture(path)
        fixtures[name] = (version, messages)
        write("pgoutput_decode", f"{name}.sequence", decode_input(version, capped(messages)))
        seen, stream_start = set(), None
        for m in messages:
            tag = chr(m[0])
            key = (tag, stream_start is not None)
            if key not in seen:
                seen.add(key)
                prefix = [stream_start] if stream_start and tag != "S" else []
                where = "in-stream" if stream_start else "top"
                write("pgoutput_decode", f"{name}.{where}.{m[0]:02x}",
                      decode_input(version, prefix + [m]))
            if tag == "S":
                stream_start = m
            elif tag == "E":
                stream_start = None

    version, insert = fixtures["pg15.insert.proto1"]
    transaction = b"".join(xlog(m) for m in insert) + keepalive()
    write("replication_framing", "insert-transaction.one-read", framing_input(0, version, transaction))
    write("replication_framing", "insert-transaction.split-reads", framing_input(7, version, transaction))
    write("replication_framing", "insert-transaction.byte-reads", framing_input(1, version, transaction))

    version, streamed = fixtures["pg15.stream_commit.proto2"]
    write("replication_framing", "streamed-transaction.split-reads",
          framing_input(200, version, b"".join(xlog(m) for m in capped(streamed, 1))))

    error = frame(b"E", fields(("S", "FATAL"), ("V", "FATAL"), ("C", "57P01"),
                               ("M", "terminating connection due to administrator command"),
                               ("F", "postgres.c"), ("L", "3200"), ("R", "ProcessInterrupts")))
    write("replication_framing", "keepalive-then-error-response",
          framing_input(5, 1, keepalive(reply=0) + xlog(insert[0]) + error))

    notice = frame(b"N", fields(("S", "WARNING"), ("V", "WARNING"), ("C", "01000"),
                                ("M", "slot is lagging"), ("D", "detail"), ("H", "hint")))
    status = frame(b"S", cstr("application_name") + cstr("pgoutbox"))
    end = frame(b"c") + frame(b"C", cstr("COPY 0")) + frame(b"Z", b"I")
    write("replication_framing", "notice-status-and-end-of-copy",
          framing_input(3, 1, keepalive() + notice + status + xlog(insert[-1]) + end))

    startup = (
        frame(b"R", struct.pack(">i", 10) + cstr("SCRAM-SHA-256") + b"\0")
        + frame(b"R", struct.pack(">i", 11) + b"r=abc,s=c2FsdA==,i=4096")
        + frame(b"R", struct.pack(">i", 12) + b"v=c2lnbmF0dXJl")
        + frame(b"R", struct.pack(">i", 0))
        + status
        + frame(b"K", struct.pack(">ii", 4242, 1234567))
        + frame(b"Z", b"I")
        + frame(b"T", struct.pack(">h", 1) + cstr("systemid") + struct.pack(">ihihih", 0, 0, 25, -1, -1, 0))
        + frame(b"D", struct.pack(">hi", 2, 19) + b"7301234567890123456" + struct.pack(">i", -1))
        + frame(b"C", cstr("IDENTIFY_SYSTEM"))
        + frame(b"W", struct.pack(">bh", 0, 0))
    )
    write("replication_framing", "startup-and-identify-system", framing_input(11, 1, startup))

    # A header that claims a near-1 GiB CopyData: the reader must not
    # allocate for bytes that have not arrived.
    write("replication_framing", "huge-length-header",
          framing_input(0, 1, b"d" + struct.pack(">i", (1 << 30) - 2) + b"w"))


if __name__ == "__main__":
    main()
