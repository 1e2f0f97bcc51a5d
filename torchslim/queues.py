"""Input threads with an owner: a Coordinator, QueueRunners, and prefetch.

As in TF-Slim, background threads fill a queue that the train loop drains; a
:class:`Coordinator` lets them request a stop and report an exception to the
main thread; :class:`QueueRunners` starts :class:`QueueRunner` threads around a
block and joins them at its end. :func:`prefetch` is the train loop's case:
one ordered producer, at most ``depth`` batches ahead, copying to a device.
Every thread here has an owner that stops and joins it, whatever ends the
loop, and a producer's exception reaches the consumer as the same object.

>>> with prefetch(range(5), depth=2) as batches:
...     [b * 10 for b in batches]
[0, 10, 20, 30, 40]
>>> runner = QueueRunner(lambda: iter("abc"))
>>> with QueueRunners(runner):
...     sorted(runner)
['a', 'b', 'c']
"""

from torchslim._coordinator import Coordinator, NestedQueueRunnerError, QueueRunner, QueueRunners
from torchslim._prefetch import Prefetcher, prefetch

__all__ = ["Coordinator", "NestedQueueRunnerError", "Prefetcher", "QueueRunner", "QueueRunners", "prefetch"]
