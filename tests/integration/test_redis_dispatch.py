"""Redis Streams dispatch against the real Redis: delivery, takeover, dead letters, data loss."""

from __future__ import annotations

import time
from typing import Any

import pytest
import redis

from ml_platform import dispatch
from ml_platform.dispatch import Dispatch, RedisDispatcher
from tests.conftest import RedisTarget

pytestmark = pytest.mark.integration


def _dispatcher(
    client: redis.Redis,
    target: RedisTarget,
    consumer: str,
    claim_idle_seconds: float = 0.2,
    **options: object,
) -> RedisDispatcher:
    return RedisDispatcher(
        client,
        consumer=consumer,
        prefix=target.prefix,
        queues=["default", "gpu"],
        claim_idle_seconds=claim_idle_seconds,
        republish_seconds=0.5,
        **options,  # type: ignore[arg-type]  # keyword options of the dispatcher under test
    )


def test_published_attempts_reach_one_consumer_each_and_acks_remove_them(
    redis_client: redis.Redis, redis_target: RedisTarget
) -> None:
    # A long idle time: on a slow machine no delivery may be taken over during this test.
    one = _dispatcher(redis_client, redis_target, "one", claim_idle_seconds=60)
    two = _dispatcher(redis_client, redis_target, "two", claim_idle_seconds=60)
    one.publish([Dispatch(1, "default"), Dispatch(2, "gpu"), Dispatch(3, "default")])
    one.publish([Dispatch(1, "default")])  # re-published while live: not duplicated
    first = one.receive(2, block_seconds=0.1)
    assert len(first) == 2  # never more than asked for
    second = two.receive(10, block_seconds=0.1) + one.receive(10)
    ids = sorted(d.attempt_id for d in first + second)
    assert ids == [1, 2, 3]  # each delivered once, across both consumers
    assert {d.queue for d in first + second} == {"default", "gpu"}
    for delivery in first + second:
        one.ack(delivery)
    assert one.queue_depth() == {"default": 0, "gpu": 0}
    assert two.receive(10, block_seconds=0.05) == []


def test_a_batch_of_deliveries_is_acknowledged_in_one_round_trip(
    redis_client: redis.Redis, redis_target: RedisTarget
) -> None:
    """A worker acknowledges a batch's deliveries together: one pipeline (XACK and XDEL for
    each), after which none is pending, none is left in its stream, and none comes back."""
    one = _dispatcher(redis_client, redis_target, "one", claim_idle_seconds=0.05)
    one.publish([Dispatch(i, "gpu" if i % 3 == 0 else "default") for i in range(1, 10)])
    taken = one.receive(20, block_seconds=0.1)
    assert sorted(d.attempt_id for d in taken) == list(range(1, 10))
    sent: list[object] = []
    execute = redis.client.Pipeline.execute

    def counted(pipe: Any, *args: Any, **kwargs: Any) -> Any:
        sent.append(pipe)
        return execute(pipe, *args, **kwargs)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(redis.client.Pipeline, "execute", counted)
        one.ack(*taken)
    assert len(sent) == 1
    for queue in ("default", "gpu"):
        stream = one.stream(queue)
        assert redis_client.xpending(stream, one.group)["pending"] == 0
        assert redis_client.xlen(stream) == 0
    time.sleep(0.1)  # past the takeover idle time: nothing is left to take over
    assert one.receive(20, block_seconds=0.05) == []


def test_a_batch_is_published_in_one_round_trip_and_a_live_one_not_again(
    redis_client: redis.Redis, redis_target: RedisTarget
) -> None:
    """A fan-out's attempts, over two queues, reach Redis in one round trip (markers and
    messages together); published again while their markers live, they add nothing."""
    one = _dispatcher(redis_client, redis_target, "one", claim_idle_seconds=60)
    one.publish([Dispatch(0, "default"), Dispatch(-1, "gpu")])  # the groups made once
    batch = [Dispatch(i, "gpu" if i % 3 == 0 else "default") for i in range(1, 301)]
    trips: list[bytes] = []
    send: Any = redis.connection.AbstractConnection.send_packed_command

    def counted(connection: Any, command: Any, *args: Any, **kwargs: Any) -> Any:
        trips.append(command)
        return send(connection, command, *args, **kwargs)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(redis.connection.AbstractConnection, "send_packed_command", counted)
        one.publish(batch)
        assert len(trips) == 1
        one.publish(batch)  # the scheduler's next pass, within republish_seconds
        assert len(trips) == 2
    lengths = [redis_client.xlen(one.stream(queue)) for queue in ("default", "gpu")]
    assert lengths == [201, 101]  # with the two published first
    taken = one.receive(400, block_seconds=0.1)
    assert sorted(d.attempt_id for d in taken) == list(range(-1, 301))


def test_publishing_survives_redis_losing_its_script_and_splits_a_large_batch(
    redis_client: redis.Redis, redis_target: RedisTarget
) -> None:
    """After a restart Redis no longer has the publishing script: the next publish sends it
    again and publishes. A batch larger than PUBLISH_BATCH goes in several calls, none lost."""
    one = _dispatcher(redis_client, redis_target, "one", claim_idle_seconds=60)
    one.publish([Dispatch(1, "default")])
    redis_client.script_flush()  # what a restart leaves: no scripts
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(dispatch, "PUBLISH_BATCH", 7)
        one.publish([Dispatch(i, "default") for i in range(2, 31)])  # 29: five calls
    assert sorted(d.attempt_id for d in one.receive(50, block_seconds=0.1)) == list(range(1, 31))


def test_deliveries_of_a_dead_consumer_are_taken_over(
    redis_client: redis.Redis, redis_target: RedisTarget
) -> None:
    dead = _dispatcher(redis_client, redis_target, "dead", claim_idle_seconds=1.0)
    alive = _dispatcher(redis_client, redis_target, "alive", claim_idle_seconds=1.0)
    dead.publish([Dispatch(7, "default")])
    [lost] = dead.receive(1)
    assert alive.receive(1) == []  # not idle long enough yet
    time.sleep(1.1)
    [taken] = alive.receive(1)
    assert taken.attempt_id == 7 and taken.message_id == lost.message_id


def test_a_message_delivered_too_often_goes_to_the_dead_letter_stream(
    redis_client: redis.Redis, redis_target: RedisTarget
) -> None:
    dead_letters: list[tuple[int, str]] = []
    consumer = _dispatcher(
        redis_client,
        redis_target,
        "crashy",
        max_deliveries=2,
        on_dead_letter=lambda attempt_id, reason: dead_letters.append((attempt_id, reason)),
    )
    consumer.publish([Dispatch(9, "default")])
    assert [d.attempt_id for d in consumer.receive(1)] == [9]
    time.sleep(0.3)
    assert [d.attempt_id for d in consumer.receive(1)] == [9]  # second delivery
    time.sleep(0.3)
    assert consumer.receive(1) == []  # third would exceed the limit: dead-lettered instead
    assert dead_letters == [(9, "undeliverable: delivered 2 times without an ack")]
    entries: Any = redis_client.xrange(consumer.dead_letter_stream)
    assert [fields[b"attempt"] for _, fields in entries] == [b"9"]


def test_lost_redis_data_recovers_by_republishing(
    redis_client: redis.Redis, redis_target: RedisTarget
) -> None:
    dispatcher = _dispatcher(redis_client, redis_target, "one")
    dispatcher.publish([Dispatch(11, "default")])
    # A restart without persistence: every key of ours is gone, groups included.
    redis_client.delete(*redis_client.keys(f"{redis_target.prefix}:*"))
    assert dispatcher.receive(1, block_seconds=0.05) == []
    dispatcher.publish([Dispatch(11, "default")])  # the scheduler's next pass
    assert [d.attempt_id for d in dispatcher.receive(1, block_seconds=0.1)] == [11]
