"""The session inbox: order, bounds, wake-ups, close and cancellation."""

import pytest
import trio

from overlay.inbox import Inbox, InboxClosed


async def test_batches_keep_order_and_respect_max_count():
    inbox = Inbox(limit=10)
    for i in range(5):
        assert inbox.put(b"%d" % i)
    assert await inbox.get_batch(3) == [b"0", b"1", b"2"]
    assert await inbox.get_batch(10) == [b"3", b"4"]
    assert len(inbox) == 0


async def test_full_inbox_drops_and_counts():
    inbox = Inbox(limit=2)
    assert inbox.put(b"a") and inbox.put(b"b")
    assert not inbox.put(b"c")
    assert inbox.dropped == 1
    assert await inbox.get_batch(5) == [b"a", b"b"]
    assert inbox.put(b"d")


async def test_parked_reader_wakes_on_put():
    inbox = Inbox(limit=4)
    got: list[list[bytes]] = []

    async def reader():
        got.append(await inbox.get_batch(4))

    async with trio.open_nursery() as nursery:
        nursery.start_soon(reader)
        await trio.testing.wait_all_tasks_blocked()
        assert got == []
        inbox.put(b"x")
        inbox.put(b"y")
    assert got == [[b"x", b"y"]]


async def test_close_delivers_what_was_queued_then_raises():
    inbox = Inbox(limit=4)
    inbox.put(b"last")
    inbox.close()
    assert not inbox.put(b"late")
    assert await inbox.get_batch(4) == [b"last"]
    with pytest.raises(InboxClosed):
        await inbox.get_batch(4)


async def test_close_wakes_a_parked_reader():
    inbox = Inbox(limit=4)
    async with trio.open_nursery() as nursery:

        async def reader():
            with pytest.raises(InboxClosed):
                await inbox.get_batch(4)

        nursery.start_soon(reader)
        await trio.testing.wait_all_tasks_blocked()
        inbox.close()


async def test_a_parked_reader_can_be_cancelled_and_nothing_is_lost():
    inbox = Inbox(limit=4)
    with trio.move_on_after(0.01) as scope:
        await inbox.get_batch(4)
    assert scope.cancelled_caught
    inbox.put(b"after")
    assert await inbox.get_batch(4) == [b"after"]


async def test_get_batch_is_a_checkpoint_even_with_data_queued():
    inbox = Inbox(limit=4)
    inbox.put(b"x")
    with trio.CancelScope() as scope:
        scope.cancel()
        await inbox.get_batch(4)
    assert scope.cancelled_caught
    assert len(inbox) == 1  # cancelled before taking anything
