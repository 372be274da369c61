import threading

import pytest

from dsq.prefetch import prefetched


def prefetch_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name == "dsq-prefetch"]


def test_items_come_in_order():
    assert list(prefetched(iter(range(200)))) == list(range(200))


def test_an_error_is_raised_in_its_place():
    def items():
        yield from range(3)
        raise ValueError("item 3 is broken")

    got = []
    with pytest.raises(ValueError, match="item 3 is broken"):
        for item in prefetched(items()):
            got.append(item)
    assert got == [0, 1, 2]
    assert not prefetch_threads()


def test_the_next_item_is_made_while_the_caller_works():
    made = threading.Event()

    def items():
        yield 0
        made.set()
        yield 1

    stream = prefetched(items())
    assert next(stream) == 0
    assert made.wait(timeout=30)  # item 1 was made before the caller asked for it
    assert list(stream) == [1]


@pytest.mark.parametrize("ahead", [1, 3])
def test_the_thread_runs_at_most_ahead_items_beyond_the_caller(ahead):
    made, waiting = [], threading.Event()

    def items():
        for i in range(100):
            made.append(i)
            if len(made) == ahead + 2:
                waiting.set()  # this item is made; it waits for room in the queue
            yield i

    stream = prefetched(items(), ahead)
    assert next(stream) == 0
    assert waiting.wait(timeout=30)
    (thread,) = prefetch_threads()
    thread.join(timeout=0.2)  # time to run further ahead, were it able to
    assert thread.is_alive() and len(made) == ahead + 2  # the item taken, `ahead` queued, one waiting
    stream.close()


def test_closing_stops_the_thread():
    def forever():
        i = 0
        while True:
            yield i
            i += 1

    stream = prefetched(forever())
    assert [next(stream) for _ in range(5)] == [0, 1, 2, 3, 4]
    stream.close()
    assert not prefetch_threads()
