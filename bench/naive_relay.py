"""The floor: a naive outbox relay. One row at a time, a synchronous send (produce + flush,
waiting for acks=all), one UPDATE per row, polling every 10 ms when idle. Same table, same
producer settings as outbox-relay; no batching, no pipelining.
Usage: naive_relay.py DATABASE_URL BROKERS"""
import signal
import sys
import time

import psycopg
from confluent_kafka import Producer

FETCH = ("SELECT id, topic, key, payload, created_at FROM outbox "
         "WHERE published_at IS NULL AND failed_at IS NULL ORDER BY id LIMIT 1")
MARK = "UPDATE outbox SET published_at = now() WHERE id = %s"


def main():
    url, brokers = sys.argv[1], sys.argv[2]
    stop = []
    signal.signal(signal.SIGTERM, lambda *_: stop.append(1))
    producer = Producer({"bootstrap.servers": brokers, "enable.idempotence": True, "acks": "all",
                         "compression.type": "lz4", "linger.ms": 2, "partitioner": "murmur2_random",
                         "message.timeout.ms": 0})
    errors = []
    with psycopg.connect(url, autocommit=True) as conn:
        while not stop:
            row = conn.execute(FETCH).fetchone()
            if row is None:
                time.sleep(0.01)
                continue
            rid, topic, key, payload, created = row
            errors.clear()
            producer.produce(topic, value=payload, key=key,
                             headers=[("outbox-event-id", str(rid)),
                                      ("outbox-created-at", created.isoformat()),
                                      ("outbox-source", "public.outbox")],
                             on_delivery=lambda err, _m: err and errors.append(err))
            producer.flush()  # synchronous: wait for this row's acknowledgement
            if errors:
                print(f"naive relay: delivery of {rid} failed: {errors[0]}", file=sys.stderr)
                time.sleep(0.1)
                continue
            conn.execute(MARK, (rid,))


if __name__ == "__main__":
    main()
