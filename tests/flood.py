"""A publisher that floods a broker, in a process of its own (so that its memory is not the
ingest's): ``python -m tests.flood FILE HOST PORT`` publishes each line of FILE (``<topic>
<base64 body>``) at QoS 1 as fast as the broker takes them, then exits 0 once all are PUBACKed.

Used by tests/test_backpressure.py.
"""

from __future__ import annotations

import base64
import sys
import uuid
from pathlib import Path

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion

IN_FLIGHT = 100


def flood(lines: list[str], host: str, port: int) -> None:
    client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=f"flood-{uuid.uuid4().hex[:8]}",
                         protocol=mqtt.MQTTv5)
    client.max_inflight_messages_set(IN_FLIGHT)
    client.connect(host, port)
    client.loop_start()
    sent = []
    for line in lines:
        topic, body = line.split(" ", 1)
        sent.append(client.publish(topic, base64.b64decode(body), qos=1))
    for info in sent:
        info.wait_for_publish(60)
    client.disconnect()
    client.loop_stop()


def main(argv: list[str]) -> int:
    if len(argv) != 3 or not argv[2].isdigit():
        print("usage: python -m tests.flood FILE HOST PORT", file=sys.stderr)
        return 2
    flood(Path(argv[0]).read_text().splitlines(), argv[1], int(argv[2]))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
