"""Make the next items of an iterable in a background thread while the caller works on this one."""

from __future__ import annotations

import queue
import threading
from typing import Iterable, Iterator, TypeVar

T = TypeVar("T")
POLL_SECONDS = 0.1  # how often a producer blocked on a full queue checks whether the caller has stopped


def prefetched(items: Iterable[T], ahead: int = 1) -> Iterator[T]:
    """Yield `items` in their order, each made by a background thread up to `ahead` items before
    the caller asks for it: image decoding (Pillow and torch release the GIL) overlaps the model.

    What iterating `items` raises is raised here, in its place in the sequence. Closing the
    generator (or an error in the caller) stops the thread once its current item is made."""
    made: queue.Queue = queue.Queue(ahead)
    stop = threading.Event()

    def put(entry) -> bool:
        while not stop.is_set():
            try:
                made.put(entry, timeout=POLL_SECONDS)
                return True
            except queue.Full:
                pass
        return False

    def produce() -> None:
        try:
            for item in items:
                if not put((True, item)):
                    return
        except BaseException as error:  # handed to the caller, who raises it
            put((False, error))
            return
        put((False, None))

    thread = threading.Thread(target=produce, name="dsq-prefetch", daemon=True)
    thread.start()
    try:
        while True:
            more, value = made.get()
            if more:
                yield value
            elif value is None:
                return
            else:
                raise value
    finally:
        stop.set()
        thread.join()
