"""A custom scheduling policy: admit the waiting request with the least to compute first.

Use it in the engine, and certify that fast's scheduler obeys it (run from the repository root):

    from fast import LLM
    from examples.shortest_prompt_first import ShortestPromptFirst
    llm = LLM(model, policy=ShortestPromptFirst())

    python -m conformance --tier scheduler --policy examples.shortest_prompt_first:ShortestPromptFirst

The contract a policy keeps (deterministic, pure, returns a request of the queue it was given,
reads only the documented `Request` fields) is `fast.core.policy.SchedulingPolicy`'s docstring.
With requests arriving all the time, a long prompt can wait forever behind short ones (as with
any shortest-job-first); with no new arrivals every request finishes.
"""

from __future__ import annotations

from collections.abc import Sequence

from fast.core.policy import SchedulingPolicy
from fast.core.request import Request


class ShortestPromptFirst(SchedulingPolicy):
    name = "shortest-prompt-first"

    def next_waiting(self, waiting: Sequence[Request]) -> Request:
        # Fewest tokens still to compute (a waiting request has computed none: a preempted one
        # recomputes its prompt and its outputs so far); ties by arrival, so the choice is total.
        return min(waiting, key=lambda r: (r.num_tokens - r.num_computed_tokens, r.arrival))

    def pick_victim(self, running: Sequence[Request]) -> Request:
        # The latest admitted, as fcfs. Not the longest one: preempting by size can ping-pong two
        # requests that each lose their progress in turn (a livelock). Preempting the latest
        # admitted never preempts the oldest running request while others run, so it always finishes.
        return running[-1]
