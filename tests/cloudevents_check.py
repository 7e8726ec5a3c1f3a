"""Reads Kafka records (a JSON list on stdin: headers as text, key, value
as text) with the CloudEvents SDK's Kafka binding and prints, as JSON, the
attributes and data it found in each. An independent reading of pgoutbox's
`cloudevents` record format: tests/formats.rs compares it with the rows."""

import datetime
import json
import sys

from cloudevents.core.bindings import kafka

EPOCH = datetime.datetime(1970, 1, 1, tzinfo=datetime.timezone.utc)


def micros(t):
    """An instant as whole microseconds since the epoch, as text."""
    return str((t - EPOCH) // datetime.timedelta(microseconds=1))


out = []
for record in json.load(sys.stdin):
    message = kafka.KafkaMessage(
        headers={k: v.encode() for k, v in record["headers"].items()},
        key=record["key"].encode(),
        value=record["value"].encode(),
    )
    if record["mode"] == "binary":
        event = kafka.from_binary_event(message)
    else:
        event = kafka.from_structured_event(message)
    attributes = event.get_attributes()
    data = event.get_data()
    if isinstance(data, (bytes, bytearray)):
        data = json.loads(data)
    out.append(
        {
            "attributes": {
                k: (micros(v) if isinstance(v, datetime.datetime) else str(v))
                for k, v in attributes.items()
            },
            "data": data,
        }
    )
json.dump(out, sys.stdout)
