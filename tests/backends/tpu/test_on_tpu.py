"""On a TPU: the kernel compiled by Mosaic equals the CPU oracle, and the whole model under
`--backend tpu` gives HF's greedy tokens. Written without a TPU and never run here (CI has
none): docs/tpu.md says how to run it first on a TPU VM (`pytest -m tpu tests/backends/tpu`).
"""

from __future__ import annotations

import jax
import numpy as np
import pytest
from jax.experimental.pallas import tpu as pltpu

from tests.backends.tpu.test_kernel_interpret import CLASSES, make_batch, run_kernel

pytestmark = [
    pytest.mark.tpu,
    pytest.mark.skipif(jax.default_backend() != "tpu", reason="needs a TPU"),
]


def test_compiled_kernel_equals_dense_attention_and_the_interpreter():
    for name, sc in CLASSES.items():
        # f32 matmuls on the MXU take bf16 passes unless asked for full precision.
        tol = dict(atol=2e-3, rtol=2e-3) if sc.dtype == "float32" else dict(atol=3e-2, rtol=3e-2)
        for i in range(3):
            case = make_batch(sc, seed=1000 * i + len(name))
            layer = (i % sc.layers) if sc.layers else None
            with jax.default_matmul_precision("highest"):
                out = run_kernel(case, sc, False, layer)
            n = case.num_tokens
            np.testing.assert_allclose(out[:n], case.expected[:n], **tol,
                                       err_msg=f"{name} batch {i}")
            ref = run_kernel(case, sc, pltpu.InterpretParams(), layer)
            np.testing.assert_allclose(out, ref, **tol, err_msg=f"{name} batch {i} vs interp")


def test_greedy_tokens_equal_hf(tmp_path):
    from engine import LLM, SamplingParams
    from tests.engine.test_generation_vs_hf import PROMPTS, hf_greedy
    from tests.models.hf_reference import make_hf_model

    model = make_hf_model("llama3", seed=3)
    model.save_pretrained(tmp_path, safe_serialization=True)
    with jax.default_matmul_precision("highest"):
        llm = LLM(str(tmp_path), backend="tpu", dtype="float32", page_size=16,
                  chunked_prefill_size=16, max_running_requests=4, max_total_tokens=512)
        outs = llm.generate(PROMPTS, SamplingParams(max_tokens=12, temperature=0.0,
                                                    ignore_eos=True))
    for prompt, out in zip(PROMPTS, outs, strict=True):
        assert out.token_ids == hf_greedy(model, prompt, 12)

