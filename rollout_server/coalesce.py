"""The batches asked for in one turn of the event loop, sent to the engine as ONE ``/generate``.

Why: the episodes a rollout server starts for a batch of leases all ask for their group in the
same turn. Sent one by one, they reach the engine over a few milliseconds, and it starts
prefilling the first group while the others are still on their way: several staggered prefills
instead of one batch (benchmarks/README.md, "the eta = 0 step hop by hop": +9% trained samples/s
at eta 0, +12% at eta 4 once coalesced).

How: ``Coalescer.generate`` queues a call; the first call of a turn schedules the flush with
``call_soon``, which runs after every task already ready in that turn has queued its own. The
flush cuts the queue, in order, into chunks of at most ``MAX_BATCH_PROMPTS`` prompts and
``MAX_BATCH_TOKENS`` prompt tokens (well under an engine's body limit), posts each chunk as one
batched request and hands every caller its own answers, in order.

Failures:
* SGLang refuses a whole batch (4xx) when one of its prompts is refused (too long, say): a chunk
  so refused is sent again as each caller's own request, so the refusal reaches only the caller
  it concerns. A refused request delivered nothing: sending it again repeats no sample.
* any other failure fails every caller of the chunk with the same error (the call may have run:
  it is never blindly repeated);
* a cancelled caller's answers are dropped; the chunk's call is cancelled once none of its
  callers is waiting, and ``close`` cancels every call under way (its callers get an error).
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

MAX_BATCH_PROMPTS = 1024  # one coalesced /generate carries at most this many prompts ...
MAX_BATCH_TOKENS = 2**20  # ... and this many prompt tokens (~7 MB of JSON; the engine takes 64 MiB)

# post(inputs, sampling_params, timeout_s) -> one answer per prompt, in order
Post = Callable[[list[list[int]], list[dict], float], Awaitable[list[Any]]]


@dataclass(slots=True)
class Queued:
    """One caller's batch, waiting for the turn's request."""

    inputs: list[list[int]]
    sampling_params: list[dict]
    timeout_s: float
    answer: asyncio.Future


def chunks(queued: list[Queued]) -> list[list[Queued]]:
    """The turn's calls, in order, cut at MAX_BATCH_PROMPTS prompts and MAX_BATCH_TOKENS prompt
    tokens (a call larger than that alone is a chunk of its own)."""
    out: list[list[Queued]] = []
    prompts = tokens = 0
    for q in queued:
        size, length = len(q.inputs), sum(len(p) for p in q.inputs)
        if not out or prompts + size > MAX_BATCH_PROMPTS or tokens + length > MAX_BATCH_TOKENS:
            out.append([])
            prompts = tokens = 0
        out[-1].append(q)
        prompts, tokens = prompts + size, tokens + length
    return out


class Coalescer:
    """Coalesces the ``generate`` calls of each event-loop turn into batched ``post`` calls.
    ``refused(error)`` says whether an error is the engine refusing the request as a whole."""

    def __init__(self, post: Post, refused: Callable[[Exception], bool], closed_error: Callable[[], Exception]):
        self.post, self.refused, self.closed_error = post, refused, closed_error
        self.queued: list[Queued] = []
        self.posts: set[asyncio.Task] = set()

    async def generate(self, inputs: list[list[int]], sampling_params: list[dict], timeout_s: float) -> list[Any]:
        loop = asyncio.get_running_loop()
        call = Queued(inputs, sampling_params, timeout_s, loop.create_future())
        self.queued.append(call)
        if len(self.queued) == 1:  # the first call of the turn: the others of this turn are queued before it runs
            loop.call_soon(self._flush)
        return await call.answer

    def close(self) -> None:
        for post in list(self.posts):
            post.cancel()

    def _flush(self) -> None:
        queued, self.queued = self.queued, []
        for chunk in chunks(queued):
            post = asyncio.ensure_future(self._send(chunk))
            self.posts.add(post)
            post.add_done_callback(self.posts.discard)
            for q in chunk:
                q.answer.add_done_callback(lambda _, c=chunk, p=post: p.cancel() if all(
                    x.answer.cancelled() for x in c) else None)

    async def _send(self, chunk: list[Queued]) -> None:
        try:
            outs = await self.post([p for q in chunk for p in q.inputs],
                                   [p for q in chunk for p in q.sampling_params], max(q.timeout_s for q in chunk))
        except asyncio.CancelledError:  # nobody waits any more, or the client is closing
            self._fail(chunk, self.closed_error())
            raise
        except Exception as e:
            if len(chunk) > 1 and self.refused(e):  # refused whole: each caller's own request again
                await asyncio.gather(*(self._send([q]) for q in chunk))
            else:
                self._fail(chunk, e)
            return
        start = 0
        for q in chunk:
            if not q.answer.done():
                q.answer.set_result(outs[start:start + len(q.inputs)])
            start += len(q.inputs)

    @staticmethod
    def _fail(chunk: list[Queued], error: Exception) -> None:
        for q in chunk:
            if not q.answer.done():
                q.answer.set_exception(error)
