"""EAGLE-3 speculation (engine.spec.eagle): heads written here in the published checkpoint
layout (config.json + safetensors with the published tensor names). The head's drafts and
outputs equal an independent numpy implementation of the published architecture fed the
target's features from HF transformers; greedy outputs equal the engine's without
speculation whether the head is random (nearly every draft rejected) or built to propose
what the target will say (long accepted runs); bad heads get clear errors."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import save_file

from engine import LLM, SamplingParams
from engine.model.config import ConfigError
from tests.bench.test_offline_bench import TINY

V, E = 64, 64  # the tiny target: vocabulary and width (equal: see permutation_target)
TARGET = {**TINY, "vocab_size": V, "hidden_size": E, "num_hidden_layers": 8}
HEAD = {"architectures": ["LlamaForCausalLMEagle3"], "model_type": "llama",
        "hidden_size": E, "intermediate_size": 96, "num_hidden_layers": 1,
        "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": V,
        "draft_vocab_size": 32, "target_hidden_size": E, "rms_norm_eps": 1e-5,
        "rope_theta": 10000.0, "max_position_embeddings": 256}
OPTS = dict(backend="cpu", dtype="float32", max_total_tokens=2048, max_running_requests=8,
            chunked_prefill_size=32, speculative_adaptive=False)


def write_target(folder: Path, rng: np.random.Generator, zero_layers: bool = False,
                 lm_head: np.ndarray | None = None) -> Path:
    """A tiny Llama in HF names. zero_layers: every layer adds nothing to the residual
    stream (o_proj and down_proj zero), so each position's features are its embedding."""
    folder.mkdir(parents=True)
    (folder / "config.json").write_text(json.dumps(TARGET))
    c = TARGET
    e, f, h, kv = c["hidden_size"], c["intermediate_size"], 4, 2
    d = e // h

    def r(*shape: int) -> np.ndarray:
        return (rng.standard_normal(shape) * 0.2).astype(np.float32)

    t = {"model.embed_tokens.weight": np.eye(V, e, dtype=np.float32) if zero_layers
         else r(V, e), "model.norm.weight": np.ones(e, np.float32),
         "lm_head.weight": lm_head if lm_head is not None else r(V, e)}
    for i in range(c["num_hidden_layers"]):
        p = f"model.layers.{i}."
        t |= {p + "input_layernorm.weight": np.ones(e, np.float32),
              p + "post_attention_layernorm.weight": np.ones(e, np.float32),
              p + "self_attn.q_proj.weight": r(h * d, e),
              p + "self_attn.k_proj.weight": r(kv * d, e),
              p + "self_attn.v_proj.weight": r(kv * d, e),
              p + "self_attn.o_proj.weight": r(e, h * d) * (not zero_layers),
              p + "mlp.gate_proj.weight": r(f, e), p + "mlp.up_proj.weight": r(f, e),
              p + "mlp.down_proj.weight": r(e, f) * (not zero_layers)}
    save_file(t, str(folder / "model.safetensors"))
    return folder


def head_tensors(rng: np.random.Generator, cfg: dict = HEAD) -> dict[str, np.ndarray]:
    e, f, vd = cfg["hidden_size"], cfg["intermediate_size"], cfg["draft_vocab_size"]
    h, kv = cfg["num_attention_heads"], cfg["num_key_value_heads"]
    d = e // h

    def r(*shape: int) -> np.ndarray:
        return (rng.standard_normal(shape) * 0.2).astype(np.float32)

    p = "midlayer."
    return {"fc.weight": r(e, 3 * cfg["target_hidden_size"]),
            p + "input_layernorm.weight": 1 + r(e), p + "hidden_norm.weight": 1 + r(e),
            p + "post_attention_layernorm.weight": 1 + r(e), "norm.weight": 1 + r(e),
            p + "self_attn.q_proj.weight": r(h * d, 2 * e),
            p + "self_attn.k_proj.weight": r(kv * d, 2 * e),
            p + "self_attn.v_proj.weight": r(kv * d, 2 * e),
            p + "self_attn.o_proj.weight": r(e, h * d),
            p + "mlp.gate_proj.weight": r(f, e), p + "mlp.up_proj.weight": r(f, e),
            p + "mlp.down_proj.weight": r(e, f), "lm_head.weight": r(vd, e),
            # draft id i -> target id i + d2t[i]: distinct target ids, spread over V
            "d2t": (np.sort(rng.choice(V, vd, replace=False)) - np.arange(vd)).astype(np.int64),
            "t2d": np.zeros(V, bool)}


def write_head(folder: Path, tensors: dict[str, np.ndarray], cfg: dict = HEAD) -> Path:
    folder.mkdir(parents=True)
    (folder / "config.json").write_text(json.dumps(cfg))
    save_file(tensors, str(folder / "model.safetensors"))
    return folder


# -- an independent reference of the published head, in numpy (float64) --------------------
def _rms(x: np.ndarray, w: np.ndarray, eps: float = 1e-5) -> np.ndarray:
    return x / np.sqrt((x * x).mean(-1, keepdims=True) + eps) * w


def _rope(x: np.ndarray) -> np.ndarray:  # x [n, H, D] at positions 0..n-1, rotate-half
    d = x.shape[-1]
    ang = np.arange(x.shape[0])[:, None] / 10000.0 ** (np.arange(0, d, 2) / d)  # [n, D/2]
    cos, sin = np.cos(ang)[:, None], np.sin(ang)[:, None]
    x1, x2 = x[..., :d // 2], x[..., d // 2:]
    return np.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], -1)


def reference_head(t: dict[str, np.ndarray], embed: np.ndarray, tokens: list[int],
                   hidden: np.ndarray) -> np.ndarray:
    """Pre-norm outputs [n, E] of the head over rows (tokens[i], hidden[i]) at positions i."""
    t = {k: v.astype(np.float64) for k, v in t.items()}
    p, h, kv = "midlayer.", HEAD["num_attention_heads"], HEAD["num_key_value_heads"]
    n = len(tokens)
    a = np.concatenate([_rms(embed[tokens], t[p + "input_layernorm.weight"]),
                        _rms(hidden, t[p + "hidden_norm.weight"])], -1)  # [n, 2E]
    q = _rope((a @ t[p + "self_attn.q_proj.weight"].T).reshape(n, h, -1))
    k = _rope((a @ t[p + "self_attn.k_proj.weight"].T).reshape(n, kv, -1))
    v = (a @ t[p + "self_attn.v_proj.weight"].T).reshape(n, kv, -1)
    k, v = np.repeat(k, h // kv, axis=1), np.repeat(v, h // kv, axis=1)  # HF's repeat_kv
    s = np.einsum("qhd,khd->hqk", q, k) / np.sqrt(q.shape[-1])
    s = np.where(np.tril(np.ones((n, n), bool)), s, -np.inf)
    w = np.exp(s - s.max(-1, keepdims=True))
    o = np.einsum("hqk,khd->qhd", w / w.sum(-1, keepdims=True), v).reshape(n, -1)
    x = hidden + o @ t[p + "self_attn.o_proj.weight"].T
    m = _rms(x, t[p + "post_attention_layernorm.weight"])
    g, u = m @ t[p + "mlp.gate_proj.weight"].T, m @ t[p + "mlp.up_proj.weight"].T
    return x + (g / (1 + np.exp(-g)) * u) @ t[p + "mlp.down_proj.weight"].T


def reference_drafts(t: dict[str, np.ndarray], embed: np.ndarray, tokens: list[int],
                     feats: np.ndarray, k: int) -> tuple[list[int], np.ndarray]:
    """k chained drafts after `tokens` (feats [len - 1, 3E]: the target's at each computed
    position), and the last draft's pre-norm output."""
    rows = tokens[1:]  # row p: token p + 1 with the features of position p
    hidden = feats.astype(np.float64) @ t["fc.weight"].T.astype(np.float64)  # [n, E]
    drafts = []
    for _ in range(k):
        x = reference_head(t, embed, rows, hidden)
        logits = _rms(x[-1], t["norm.weight"]) @ t["lm_head.weight"].T
        best = int(np.argmax(logits))
        drafts.append(best + int(t["d2t"][best]))
        rows, hidden = rows + [drafts[-1]], np.concatenate([hidden, x[-1:]])
    return drafts, x[-1]


def plain_and_spec(llm: LLM, prompts: list, params: list) -> tuple[list, list]:
    """Token ids without speculation (the same engine, its proposer off) and with it."""
    eng = llm.engine
    proposer, eng.proposer = eng.proposer, None
    plain = [o.outputs[0].token_ids for o in llm.generate(prompts, params)]
    eng.proposer = proposer
    return plain, [o.outputs[0].token_ids for o in llm.generate(prompts, params)]


def test_head_equals_a_reference_and_outputs_equal_without_speculation(tmp_path: Path
                                                                         ) -> None:
    """A random head in the published layout: its chain of drafts and its last output
    equal the numpy reference fed HF transformers' features; greedy and seeded outputs equal
    the engine's without speculation (nearly every draft rejected), every page back."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    rng = np.random.default_rng(0)
    target = write_target(tmp_path / "target", rng)
    tensors = head_tensors(rng)
    head = write_head(tmp_path / "head", tensors)
    llm = LLM(str(target), speculative_algorithm="eagle3", speculative_draft_model=str(head),
              speculative_max_batch=8, **OPTS)
    eng = llm.engine
    prompt = rng.integers(1, V, size=45).tolist()  # longer than a step: chunked catch-up
    eng.add_request(prompt, SamplingParams(max_tokens=8, temperature=0, ignore_eos=True))
    while not eng.scheduler.running or eng.scheduler.running[0].num_computed_tokens < len(prompt):
        eng.step()
    req = eng.scheduler.running[0]
    tokens = req.all_token_ids  # the prompt and its first output token
    drafts = eng.proposer.propose([req], 4)[0]

    hf = transformers.LlamaForCausalLM.from_pretrained(str(target), torch_dtype=torch.float32)
    with torch.no_grad():
        out = hf(torch.tensor([prompt]), output_hidden_states=True)
    assert tokens[-1] == int(out.logits[0, -1].argmax())
    hs = [h[0].numpy() for h in out.hidden_states]  # hs[i]: the input of layer i
    feats = np.concatenate([hs[2], hs[4], hs[5]], -1)  # layers 2, L // 2, L - 3 of L = 8
    embed = hf.model.embed_tokens.weight.detach().numpy().astype(np.float64)
    want, last = reference_drafts(tensors, embed, tokens, feats, 4)
    assert drafts == want
    got = np.asarray(eng.proposer.runner._prev)[0]  # the last draft step's pre-norm output
    np.testing.assert_allclose(got, last, rtol=2e-3, atol=2e-3)
    while eng.has_unfinished():
        eng.step()

    prompts = [rng.integers(1, V, size=int(n)).tolist() for n in (20, 50, 7)]
    params = [SamplingParams(max_tokens=m, temperature=t, seed=3, ignore_eos=True)
              for m, t in ((16, 0), (12, 0), (14, 0.8))]
    plain, spec = plain_and_spec(llm, prompts, params)
    assert spec == plain
    stats = eng.scheduler.stats()
    assert stats.num_draft_tokens > 50 and stats.kv_pages_used == 0
    assert stats.spec_acceptance_rate < 0.5  # a head trained for nothing: mostly rejected
    pool = eng.proposer.pool  # the head's pages: held only by requests it tracks
    held = sum(len(s.page_ids) for s in eng.proposer._seqs.values())
    assert pool.num_free + held == pool.num_pages


def permutation_target(tmp_path: Path, rng: np.random.Generator) -> tuple[Path, Path]:
    """A target whose next token is pi(current token), pi(t) = (2t + 2) mod V (embedding the
    identity, every layer adding nothing, lm_head the permutation's matrix), and a head that
    always proposes what it will say. The head's hidden state stands for the next token t:
    fc maps the features of position p (one-hot t_p, first block) to one-hot pi(t_p) =
    one-hot t_(p+1); attention adds nothing; the MLP turns one-hot t into one-hot pi(t)
    (gate and up the identity on the first E of its channels, so the channel of t carries
    h_t^2 sigmoid(h_t) at h = rms_norm(one-hot t) = 8 one-hot t, and down moves it from t to
    pi(t)); lm_head reads it back over a draft vocabulary of the even ids (d2t[i] = i: draft
    i is target 2i, and pi's image is even). Chained, the fed-back output is one-hot t_(p+2),
    the next row's hidden state."""
    pi = (2 * np.arange(V) + 2) % V
    perm = np.zeros((V, E), np.float32)
    perm[pi, np.arange(E)] = 1.0  # [V, E]: logits of one-hot(t) peak at pi(t)
    target = write_target(tmp_path / "target", rng, zero_layers=True, lm_head=perm)
    t = head_tensors(rng)
    f = HEAD["intermediate_size"]
    eye = np.eye(f, E, dtype=np.float32)  # [F, E]
    carried = 64 / (1 + np.exp(-8.0))  # h_t^2 sigmoid(h_t) at h_t = 8
    t |= {"fc.weight": np.concatenate([perm, np.zeros((E, 2 * E), np.float32)], 1),
          "midlayer.mlp.gate_proj.weight": eye, "midlayer.mlp.up_proj.weight": eye,
          "midlayer.mlp.down_proj.weight": ((perm - np.eye(E)) @ eye.T / carried
                                            ).astype(np.float32),
          "midlayer.post_attention_layernorm.weight": np.ones(E, np.float32),
          "norm.weight": np.ones(E, np.float32),
          "lm_head.weight": np.ascontiguousarray(np.eye(E, dtype=np.float32)[0::2]),
          "d2t": np.arange(HEAD["draft_vocab_size"], dtype=np.int64)}
    t["midlayer.self_attn.o_proj.weight"][:] = 0
    return target, write_head(tmp_path / "head", t)


def test_head_that_knows_the_target_has_long_accepted_runs(tmp_path: Path) -> None:
    """Nearly every draft accepted, with preemption (a small KV pool) and overlap steps
    while more than 2 run: outputs equal the plain engine's, and every page comes back."""
    rng = np.random.default_rng(2)
    target, head = permutation_target(tmp_path, rng)
    prompts = [rng.integers(0, V, size=int(n)).tolist() for n in (9, 40, 5, 17)]
    params = SamplingParams(max_tokens=40, temperature=0, ignore_eos=True)
    llm = LLM(str(target), speculative_algorithm="eagle", speculative_draft_model=str(head),
              speculative_num_draft_tokens=5, speculative_max_batch=2, overlap_schedule=True,
              **{**OPTS, "max_total_tokens": 96})
    plain, spec = plain_and_spec(llm, prompts, params)
    pi = (2 * np.arange(V) + 2) % V
    assert plain[0] == [int(x) for x in _orbit(pi, prompts[0][-1], 40)]  # the target's rule
    assert spec == plain
    stats = llm.engine.scheduler.stats()
    assert stats.spec_acceptance_rate > 0.9 and stats.num_accepted_tokens > 60
    assert stats.num_preemptions > 0 and stats.kv_pages_used == 0


def _orbit(pi: np.ndarray, t: int, n: int) -> list[int]:
    out = []
    for _ in range(n):
        t = int(pi[t])
        out.append(t)
    return out


def test_dummy_head_and_bad_heads(tmp_path: Path) -> None:
    rng = np.random.default_rng(3)
    cfg = tmp_path / "t.json"
    cfg.write_text(json.dumps(TARGET))
    head = tmp_path / "dummy"
    head.mkdir()
    (head / "config.json").write_text(json.dumps(HEAD))
    prompts = [rng.integers(1, V, size=12).tolist()]
    params = SamplingParams(max_tokens=12, temperature=0, ignore_eos=True)
    llm = LLM(str(cfg), speculative_algorithm="eagle", speculative_draft_model=str(head),
              **{**OPTS, "load_format": "dummy"})
    plain, spec = plain_and_spec(llm, prompts, [params])
    assert spec == plain
    assert llm.engine.scheduler.stats().num_draft_tokens > 0

    target = write_target(tmp_path / "target", rng)
    bad = [({**HEAD, "architectures": ["LlamaForCausalLM"]}, head_tensors(rng),
            "not an EAGLE-3 head"),
           ({**HEAD, "target_hidden_size": 32}, head_tensors(rng), "trained for another model"),
           (HEAD, {k: v for k, v in head_tensors(rng).items() if k != "fc.weight"},
            "fc.weight missing"),
           (HEAD, {**head_tensors(rng), "lm_head.weight": np.zeros((8, E), np.float32)},
            "lm_head.weight has shape")]
    for i, (c, tensors, msg) in enumerate(bad):
        folder = write_head(tmp_path / f"bad{i}", tensors, c)
        with pytest.raises(ConfigError, match=msg):
            LLM(str(target), speculative_algorithm="eagle", speculative_draft_model=str(folder),
                **OPTS)


def test_speculative_programs_compile_before_ready(tmp_path: Path) -> None:
    """With a warm-up, the target's verify steps (1 + k rows a decode) and the proposer's
    own programs (an EAGLE-3 head's; a draft model's) are compiled before the engine is
    ready: a varied speculative workload (1 to 3 running, prompts
    longer than a step, greedy and sampled) then compiles nothing (jax's compile events)."""
    from engine.compile import CompileCounter

    cfg = tmp_path / "t.json"
    cfg.write_text(json.dumps(TARGET))
    head = tmp_path / "head"
    head.mkdir()
    (head / "config.json").write_text(json.dumps(HEAD))
    opts = dict(backend="cpu", load_format="dummy", max_total_tokens=1024,
                max_running_requests=4, chunked_prefill_size=16, max_model_len=128,
                page_buckets="max", wide_tokens=16, warmup_decode_len=128,
                warmup_prompt_steps=True, speculative_max_batch=2,
                speculative_num_draft_tokens=3)
    rng = np.random.default_rng(4)
    for spec in (dict(speculative_algorithm="eagle", speculative_draft_model=str(head)),
                 dict(speculative_algorithm="draft", speculative_draft_model=str(cfg))):
        llm = LLM(str(cfg), **opts, **spec)
        counter = CompileCounter()
        before = counter.compiles
        for wave in (1, 3, 2):
            prompts = [rng.integers(1, V, size=int(n)).tolist()
                       for n in rng.integers(1, 70, size=wave)]
            params = [SamplingParams(max_tokens=int(rng.integers(5, 20)), ignore_eos=True,
                                     temperature=float(rng.choice([0.0, 0.8])), seed=i)
                      for i in range(wave)]
            llm.generate(prompts, params)
        stats = llm.engine.scheduler.stats()
        assert stats.num_spec_verifies > 0 and stats.kv_pages_used == 0
        assert counter.compiles == before, spec["speculative_algorithm"]
