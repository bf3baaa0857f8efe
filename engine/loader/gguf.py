"""GGUF files (llama.cpp): metadata -> ModelConfig, tensors dequantized to float32 HF tensors.

The container is parsed here with `struct` over an mmap rather than with gguf.GGUFReader: the
reader builds a numpy memmap view per array element, which costs ~7 s on the 49k-token
vocabulary of the default model; this parse takes a fraction of a second. The arithmetic
(block sizes, dequantization) still comes from the `gguf` package.

Container layout (little-endian, versions 2 and 3):
    magic "GGUF", u32 version, u64 tensor_count, u64 kv_count,
    kv_count x (string key, u32 value type, value),
    tensor_count x (string name, u32 n_dims, u64 dims[n_dims] (innermost first), u32 ggml type,
                    u64 offset from the data start),
    padding to `general.alignment` (default 32), then the tensor data.
A string is u64 length + UTF-8 bytes; an array is u32 item type + u64 count + items.
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib.util
import json
import mmap
import os
import re
import shutil
import struct
import sys
import tempfile
import warnings
from pathlib import Path
from typing import Any

import gguf
import numpy as np
from gguf import GGMLQuantizationType as QT
from gguf import GGUFValueType as VT
from tqdm import tqdm

from engine import envs
from engine.loader.checkpoint import Checkpoint, ModelLoadError, check_tensors
from engine.model.config import ConfigError, ModelConfig

SUPPORTED_TYPES = frozenset({
    QT.F32, QT.F16, QT.BF16, QT.Q8_0, QT.Q4_0, QT.Q4_1, QT.Q5_0, QT.Q5_1, QT.Q4_K, QT.Q6_K,
})  # fmt: skip
"""Tensor types we dequantize (Q5_0/Q5_1 are what K-quant files fall back to for rows that
are not a multiple of 256, e.g. SmolLM2's 576)."""
SUPPORTED_ARCHS = ("llama", "qwen2", "qwen3")

_SCALAR = {VT.UINT8: "<B", VT.INT8: "<b", VT.UINT16: "<H", VT.INT16: "<h", VT.UINT32: "<I",
           VT.INT32: "<i", VT.FLOAT32: "<f", VT.BOOL: "<?", VT.UINT64: "<Q", VT.INT64: "<q",
           VT.FLOAT64: "<d"}  # fmt: skip


@dataclasses.dataclass(frozen=True)
class TensorInfo:
    name: str
    qtype: QT | int
    """An int when the file uses a ggml type this gguf package does not know."""
    shape: tuple[int, ...]
    """numpy order (outermost first): GGUF's dims reversed, e.g. attn_q [Hq*D, E]."""
    offset: int
    """Absolute byte offset in the file."""
    nbytes: int


@dataclasses.dataclass
class GGUFFile:
    path: Path
    metadata: dict[str, Any]
    tensors: dict[str, TensorInfo]
    buffer: mmap.mmap

    def raw(self, info: TensorInfo) -> np.ndarray:
        """Undecoded bytes of one tensor: uint8 [*shape[:-1], bytes per row]."""
        data = np.frombuffer(self.buffer, np.uint8, count=info.nbytes, offset=info.offset)
        return data.reshape(*info.shape[:-1], -1)


def read_gguf(path: Path) -> GGUFFile:
    """Parse the header and tensor table; the data stays memory-mapped."""
    try:
        with open(path, "rb") as f:
            buf = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
    except (OSError, ValueError) as e:  # ValueError: an empty file cannot be mapped
        raise ModelLoadError(path, f"cannot read ({e})") from None
    try:
        metadata, tensors = _parse(buf)
    except (struct.error, IndexError, UnicodeDecodeError, ValueError, OverflowError) as e:
        buf.close()
        raise ModelLoadError(path, f"truncated or corrupt GGUF header ({e})") from None
    end, size = max((t.offset + t.nbytes for t in tensors.values()), default=0), len(buf)
    if end > size:
        buf.close()
        raise ModelLoadError(path, f"truncated: {size} bytes, tensor data needs {end}")
    return GGUFFile(path, metadata, tensors, buf)


def _parse(buf: mmap.mmap) -> tuple[dict[str, Any], dict[str, TensorInfo]]:
    pos = 0

    def take(fmt: str) -> Any:
        nonlocal pos
        (value,) = struct.unpack_from(fmt, buf, pos)
        pos += struct.calcsize(fmt)
        return value

    def string() -> str:
        nonlocal pos
        n = take("<Q")
        if pos + n > len(buf):
            raise ValueError("string runs past the end of the file")
        pos += n
        return buf[pos - n : pos].decode("utf-8")

    def value(vtype: int) -> Any:
        nonlocal pos
        vtype = VT(vtype)
        if vtype == VT.STRING:
            return string()
        if vtype != VT.ARRAY:
            return take(_SCALAR[vtype])
        itype, count = VT(take("<I")), take("<Q")
        if itype in (VT.STRING, VT.ARRAY):
            return [value(itype) for _ in range(count)]
        dtype = np.dtype(_SCALAR[itype])
        items = np.frombuffer(buf, dtype, count=count, offset=pos)  # bounds-checked by numpy
        pos += items.nbytes
        return items.copy()  # detached from the mmap, so it can be closed

    if bytes(buf[:4]) != b"GGUF":
        raise ValueError("not a GGUF file (bad magic)")
    pos = 4
    version = take("<I")
    if version not in (2, 3):
        raise ValueError(f"unsupported GGUF version {version} (big-endian files are unsupported)")
    n_tensors, n_kv = take("<Q"), take("<Q")
    metadata: dict[str, Any] = {}
    for _ in range(n_kv):
        key = string()
        metadata[key] = value(take("<I"))
    table = []
    for _ in range(n_tensors):
        name = string()
        dims = [take("<Q") for _ in range(take("<I"))]
        table.append((name, take("<I"), tuple(reversed(dims)), take("<Q")))
    align = int(metadata.get("general.alignment", gguf.GGUF_DEFAULT_ALIGNMENT))
    data_start = -(-pos // align) * align
    tensors = {}
    for name, raw_type, shape, offset in table:
        qtype = QT(raw_type) if raw_type in QT._value2member_map_ else raw_type
        block, type_size = gguf.GGML_QUANT_SIZES.get(qtype, (1, 0))  # unknown type: 0 bytes
        nbytes = int(np.prod(shape)) // block * type_size
        tensors[name] = TensorInfo(name, qtype, shape, data_start + offset, nbytes)
    return metadata, tensors


def config_from_gguf(
    path: Path, meta: dict[str, Any], tensors: dict[str, TensorInfo]
) -> ModelConfig:
    """Map llama.cpp metadata (`{arch}.*`, `tokenizer.ggml.*`) to a ModelConfig."""
    arch = meta.get("general.architecture")
    if arch not in SUPPORTED_ARCHS:
        raise ModelLoadError(
            path, f"unsupported GGUF architecture {arch!r}; supported: {', '.join(SUPPORTED_ARCHS)}"
        )

    def get(key: str, default: Any = KeyError) -> Any:
        found = meta.get(f"{arch}.{key}", default)
        if found is KeyError:
            raise ModelLoadError(path, f"missing metadata {arch}.{key}")
        if isinstance(found, (list, np.ndarray)):  # e.g. per-layer head counts
            raise ModelLoadError(path, f"per-layer metadata {arch}.{key} is not supported")
        return found

    hidden, heads = int(get("embedding_length")), int(get("attention.head_count"))
    head_dim = int(get("attention.key_length", hidden // heads))
    if int(get("attention.value_length", head_dim)) != head_dim:
        raise ModelLoadError(path, "attention.value_length != key_length is not supported")
    if int(get("rope.dimension_count", head_dim)) != head_dim:
        raise ModelLoadError(path, "partial rotary (rope.dimension_count < head dim) unsupported")
    if "rope_freqs.weight" in tensors:  # Llama 3.1-style scaling baked in as a tensor
        raise ModelLoadError(path, "rope_freqs.weight (per-frequency RoPE factors) is unsupported")
    scaling = str(get("rope.scaling.type", "none"))
    if scaling not in ("none", "linear"):
        raise ModelLoadError(path, f"unsupported rope scaling type {scaling!r}")
    rope_scaling = None
    if scaling == "linear":
        rope_scaling = (("factor", float(get("rope.scaling.factor"))), ("rope_type", "linear"))
    vocab = get("vocab_size", None) or len(meta.get("tokenizer.ggml.tokens", ()))
    eos = [meta.get(f"tokenizer.ggml.{k}_token_id") for k in ("eos", "eot")]
    try:
        return ModelConfig(
            arch=arch,
            vocab_size=int(vocab) or tensors["token_embd.weight"].shape[0],
            hidden_size=hidden,
            intermediate_size=int(get("feed_forward_length")),
            num_layers=int(get("block_count")),
            num_heads=heads,
            num_kv_heads=int(get("attention.head_count_kv", heads)),
            head_dim=head_dim,
            rms_norm_eps=float(get("attention.layer_norm_rms_epsilon", 1e-5)),
            rope_theta=float(get("rope.freq_base", 10000.0)),
            rope_scaling=rope_scaling,
            max_position_embeddings=int(get("context_length", 4096)),
            tie_word_embeddings="output.weight" not in tensors,
            qkv_bias=arch == "qwen2",
            qk_norm=arch == "qwen3",
            bos_token_id=meta.get("tokenizer.ggml.bos_token_id"),
            eos_token_ids=tuple(dict.fromkeys(int(i) for i in eos if i is not None)),
        )
    except (ConfigError, KeyError) as e:
        raise ModelLoadError(path, f"unusable model config ({e})") from None


_GLOBAL_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
_LAYER_NAMES = {
    "attn_norm": "input_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "attn_q_norm": "self_attn.q_norm",
    "attn_k_norm": "self_attn.k_norm",
    "ffn_norm": "post_attention_layernorm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
_LAYER_RE = re.compile(r"blk\.(\d+)\.(\w+)\.(weight|bias)")


def hf_name(gguf_name: str) -> str | None:
    """`blk.3.attn_q.weight` -> `model.layers.3.self_attn.q_proj.weight`; None if unknown."""
    if gguf_name in _GLOBAL_NAMES:
        return _GLOBAL_NAMES[gguf_name]
    m = _LAYER_RE.fullmatch(gguf_name)
    if m is None or m[2] not in _LAYER_NAMES:
        return None
    return f"model.layers.{m[1]}.{_LAYER_NAMES[m[2]]}.{m[3]}"


def dequantize(file: GGUFFile, info: TensorInfo) -> np.ndarray:
    """float32 array of `info.shape` (a copy, not a view of the file)."""
    if info.qtype not in SUPPORTED_TYPES:
        kind = info.qtype.name if isinstance(info.qtype, QT) else f"#{info.qtype}"
        raise ModelLoadError(file.path, f"unsupported GGUF tensor type {kind} for {info.name}")
    try:
        out = gguf.quants.dequantize(file.raw(info), info.qtype)
    except ValueError as e:  # a shape that does not fit whole blocks or the byte count
        raise ModelLoadError(file.path, f"corrupt tensor {info.name} {info.shape} ({e})") from None
    return out.copy() if info.qtype == QT.F32 else out  # F32 comes back as a view of the mmap


def unpermute_rows(w: np.ndarray, n_heads: int) -> np.ndarray:
    """Undo convert_hf_to_gguf's llama q/k row order. Per head it stores the rows interleaved,
    [H, D/2, 2, ...] (pairs (i, i + D/2) adjacent, for ggml's pairwise rotary); HF's
    rotate-half wants [H, 2, D/2, ...]. Works for weights [H*D, E] and biases [H*D]."""
    return w.reshape(n_heads, -1, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def load_gguf(path: Path, progress: bool = True) -> Checkpoint:
    """Load a .gguf as float32 HF tensors plus a cached transformers tokenizer folder."""
    file = read_gguf(path)
    try:
        config = config_from_gguf(path, file.metadata, file.tensors)
        tensors: dict[str, np.ndarray] = {}
        infos = file.tensors.values()
        bar = tqdm(infos, f"Dequantizing {path.name}", unit="tensor", disable=not progress)
        for info in bar:
            name = hf_name(info.name)
            if name is None:
                raise ModelLoadError(path, f"unknown GGUF tensor {info.name}")
            tensors[name] = dequantize(file, info)
    finally:
        try:
            file.buffer.close()
        except BufferError:  # a view is still referenced (only on error paths): let GC close it
            pass
    check_tensors(path, config, tensors)
    if config.arch == "llama":  # qwen2/qwen3 conversions do not permute
        for name in tensors:
            if ".q_proj." in name or ".k_proj." in name:
                heads = config.num_heads if ".q_proj." in name else config.num_kv_heads
                tensors[name] = unpermute_rows(tensors[name], heads)
    tokenizer = None
    if "tokenizer.ggml.tokens" in file.metadata:
        tokenizer = gguf_tokenizer_dir(path, progress=progress)
    else:
        warnings.warn(f"{path}: no tokenizer metadata; tokenizer_path is None", stacklevel=2)
    return Checkpoint(config, tensors, tokenizer, path)


def gguf_tokenizer_dir(path: Path, progress: bool = True) -> Path | None:
    """A transformers tokenizer folder built from the GGUF's `tokenizer.*` metadata.

    Building it (transformers re-reads the whole GGUF) takes seconds, so it is done once and
    saved under `<cache>/tokenizers/<stem>-<hash of the gguf path>/`, rebuilt when the file's
    size or mtime changes. None, with a warning, if it cannot be built or saved.
    """
    stat = path.stat()
    source = {"gguf": str(path.resolve()), "size": stat.st_size, "mtime_ns": stat.st_mtime_ns}
    key = hashlib.sha256(source["gguf"].encode()).hexdigest()[:12]
    out = envs.cache_dir() / "tokenizers" / f"{path.stem}-{key}"
    if _built_from(out, source):
        return out
    if progress:
        print(f"Building the tokenizer of {path.name} (once; cached in {out})", file=sys.stderr)
    tmp = None
    try:
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
        out.parent.mkdir(parents=True, exist_ok=True)
        # Build beside `out` and rename into place, so readers never see a half-written folder.
        tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=".building-"))
        tokenizer.save_pretrained(tmp)
        (tmp / _STAMP).write_text(json.dumps(source))
        shutil.rmtree(out, ignore_errors=True)  # a build for an older version of the file
        os.replace(tmp, out)
    except Exception as e:  # noqa: BLE001 - any failure only costs the tokenizer
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
        if _built_from(out, source):  # a concurrent process won the rename race
            return out
        hint = ""
        if importlib.util.find_spec("torch") is None:
            # transformers reads a GGUF's tokenizer through torch (built once, then cached).
            hint = "; transformers needs torch for this: pip install 'engine[gguf]'"
        warnings.warn(f"{path}: no tokenizer from the GGUF metadata ({e}){hint}", stacklevel=2)
        return None
    return out


_STAMP = "engine_gguf_source.json"
"""Written into a built tokenizer folder: the GGUF path, size and mtime it was built from."""


def _built_from(folder: Path, source: dict[str, Any]) -> bool:
    try:
        return json.loads((folder / _STAMP).read_text()) == source
    except (OSError, ValueError):
        return False
