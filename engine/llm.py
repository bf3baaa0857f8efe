"""The offline API: `LLM(...).generate(prompts, sampling_params)` and `.chat(messages)`."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

from tqdm import tqdm

from engine import heap
from engine.backend import detect_backend
from engine.builder import build_engine
from engine.config import CONFIG_DIR, EngineConfig
from engine.outputs import RequestOutput
from engine.sampling_params import SamplingParams

log = logging.getLogger(__name__)

Prompt = str | list[int]


def default_preset(backend: str) -> str | None:
    """The configs/<backend>.yaml preset for the chosen backend, when there is one."""
    name = detect_backend() if backend == "auto" else backend
    return name if (CONFIG_DIR / f"{name}.yaml").exists() else None


class LLM:
    """Load a model once and generate for batches of prompts.

    `model`: HF directory, .gguf file, alias, or None for the default (SmolLM2-135M-Instruct).
    Other keywords are engine options (page_size, max_total_tokens, max_running_requests,
    chunked_prefill_size, schedule_policy, disable_radix_cache, max_model_len, scan_layers,
    load_format, seed, ...). `config` is a YAML file or a preset name in configs/.
    """

    def __init__(self, model: str | None = None, backend: str = "auto", dtype: str | None = None,
                 *, config: str | None = None, **options: Any) -> None:
        if config is None:
            config = default_preset(backend)
        self.config = EngineConfig.build(config, model=model, backend=backend if backend != "auto"
                                         else None, dtype=dtype, **options)
        self.engine, self.model = build_engine(self.config)
        log.info(self.engine.startup.summary("engine built"))
        # As the server does at ready: what exists now lives as long as the engine; frozen,
        # the cyclic GC's full collections stop walking it every few steps (offline 32 x 64
        # on the 2-core CPU: the collector was ~4% of the process's CPU, 2026-12-04).
        heap.settle()
        self.tokenizer = self.model.tokenizer
        self.model_config = self.model.cfg

    def update_weights(self, params: Any, *, name_map: dict[str, str] | None = None,
                       weight_version: str | None = None) -> str:
        """Generate with new weights of the same model from now on (an RL trainer's, after a
        training step). `params`: jax.Arrays (or numpy) as the model's parameter tree (its
        serving form, or as loaded: wq/wk/wv, unquantized) or as a flat mapping of HF names
        (`name_map` renames the caller's names to HF's first). q/k/v fusion and the configured
        quantization are applied as at load; arrays already on the serving shardings are
        used as they are, others are resharded. The prefix cache is flushed and the compiled
        step programs are reused. Raises ValueError naming the first mismatched parameter.
        Returns the new weight version."""
        from engine.weights_update import prepare, swap

        new = prepare(params, self.engine.runner.params, self.engine.weight_recipe,
                      name_map=name_map, backend=self.engine.runner.backend)
        version = swap(self.engine, new, weight_version)
        self.model.params = new  # the old weights are freed with their last reference
        return version

    def _encode(self, prompt: Prompt) -> list[int]:
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise ValueError("this model has no tokenizer: pass prompts as token id lists")
            return self.tokenizer.encode(prompt, add_special_tokens=True)
        return list(prompt)

    def generate(self, prompts: Prompt | Sequence[Prompt],
                 sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
                 *, use_tqdm: bool = False) -> list[RequestOutput]:
        """One RequestOutput per prompt, in order. A prompt is a string or token ids."""
        if isinstance(prompts, str) or (prompts and isinstance(prompts[0], int)):
            prompts = [prompts]  # type: ignore[list-item]
        prompts = list(prompts)
        if sampling_params is None or isinstance(sampling_params, SamplingParams):
            sampling_params = [sampling_params or SamplingParams()] * len(prompts)
        if len(sampling_params) != len(prompts):
            raise ValueError(f"got {len(sampling_params)} sampling params for "
                             f"{len(prompts)} prompts")
        encoded = [self._encode(p) for p in prompts]  # validate all before queueing any
        ids = []
        try:
            for prompt, toks, sp in zip(prompts, encoded, sampling_params, strict=True):
                ids.append(self.engine.add_request(
                    toks, sp, prompt=prompt if isinstance(prompt, str) else None))
        except ValueError:
            for rid in ids:
                self.engine.abort(rid)
            raise
        return self._run(ids, use_tqdm)

    def _run(self, ids: list[str], use_tqdm: bool) -> list[RequestOutput]:
        done: dict[str, RequestOutput] = {}
        bar = tqdm(total=len(ids), desc="generate", disable=not use_tqdm)
        while len(done) < len(ids):
            for out in self.engine.step():
                if out.finished and out.request_id not in done:
                    done[out.request_id] = out
                    bar.update(1)
        bar.close()
        return [done[i] for i in ids]

    def chat(self, messages: list[dict[str, str]] | list[list[dict[str, str]]],
             sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
             **kwargs: Any) -> list[RequestOutput]:
        """Apply the model's chat template (one conversation or a list of them)."""
        convs = [messages] if messages and isinstance(messages[0], dict) else messages
        prompts = [self.apply_chat_template(c) for c in convs]  # type: ignore[arg-type]
        return self.generate(prompts, sampling_params, **kwargs)

    def apply_chat_template(self, messages: list[dict[str, str]]) -> list[int]:
        if self.tokenizer is None or not getattr(self.tokenizer, "chat_template", None):
            raise ValueError("this model has no chat template")
        text = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True,
                                                  tokenize=False)
        return self.tokenizer.encode(text, add_special_tokens=False)
