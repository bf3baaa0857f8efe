"""What generation returns: the ecosystem's RequestOutput / CompletionOutput shape."""

from __future__ import annotations

import dataclasses


@dataclasses.dataclass
class CompletionOutput:
    index: int
    text: str = ""
    token_ids: list[int] = dataclasses.field(default_factory=list)
    finish_reason: str | None = None
    """'stop', 'length', 'abort', or None while running."""
    stop_reason: int | str | None = None
    """The stop token id or stop string that ended the output, if any."""
    logprobs: list[dict[int, float]] | None = None
    """Per generated token: {token_id: logprob} with the chosen token and the top-N."""
    cumulative_logprob: float | None = None

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclasses.dataclass
class RequestOutput:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput]
    num_cached_tokens: int = 0
    """Prompt tokens served from the prefix cache (largest over the n outputs)."""
    prompt_logprobs: list[dict[int, float] | None] | None = None
    """Per prompt token (SamplingParams.prompt_logprobs): {token_id: logprob} with the token
    and the top-N, None for the first token and those before prompt_logprobs_start. Set
    with the first generated token."""

    @property
    def finished(self) -> bool:
        # A plain loop: read several times per stream per step, where all() over a
        # generator of properties cost ~1 us.
        for o in self.outputs:
            if o.finish_reason is None:
                return False
        return True

    # The first completion's fields, for the common n == 1 case.
    @property
    def text(self) -> str:
        return self.outputs[0].text

    @property
    def token_ids(self) -> list[int]:
        return self.outputs[0].token_ids

    @property
    def finish_reason(self) -> str | None:
        return self.outputs[0].finish_reason

    @property
    def logprobs(self) -> list[dict[int, float]] | None:
        return self.outputs[0].logprobs
