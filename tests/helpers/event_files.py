"""Read TensorBoard event files back (tensorboardX's protos; TFRecord framing), for tests."""

import glob
import os
import struct

from tensorboardX.proto import event_pb2


def read_events(logdir) -> list:
    """Every `Event` of the event files in `logdir`, file by file in name order.

    A TFRecord is: length (uint64 LE), its masked crc (4 bytes), the data, the data's crc (4 bytes).
    """
    events = []
    for path in sorted(glob.glob(os.path.join(str(logdir), "events.out.tfevents.*"))):
        with open(path, "rb") as f:
            events += parse_events(f.read())
    return events


def parse_events(data: bytes) -> list:
    """Every `Event` of the bytes of one event file (TFRecord framing, as `read_events`); a
    truncated record fails."""
    events = []
    pos = 0
    while pos < len(data):
        (n,) = struct.unpack("<Q", data[pos : pos + 8])
        assert pos + 12 + n + 4 <= len(data), f"truncated record at byte {pos}"
        events.append(event_pb2.Event.FromString(data[pos + 12 : pos + 12 + n]))
        pos += 12 + n + 4
    return events


def summary_values(logdir) -> list[tuple[int, object]]:
    """(step, `Summary.Value`) of every summary value in `logdir`, in write order."""
    return [(e.step, v) for e in read_events(logdir) for v in e.summary.value]
