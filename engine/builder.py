"""Assemble an Engine from an EngineConfig: backend, weights, KV pool size, runner, scheduler."""

from __future__ import annotations

import concurrent.futures
import dataclasses
import functools
import logging
import os
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp

from engine import probe_memo, program_store
from engine.backend import Backend, get_backend
from engine.compile import (
    Buckets,
    abstract_batch,
    enable_persistent_cache,
    proposer_grid,
    step_buckets,
    verify_grid,
    warmup_grid,
)
from engine.config import EngineConfig
from engine.core.scheduler import Scheduler, SchedulerConfig
from engine.engine import Engine
from engine.envs import cache_dir
from engine.loader.quantize import resolve_auto
from engine.model.config import ModelConfig
from engine.model.presets import preset_config
from engine.model.weights import Place, params_from_hf, place_params, random_params, stack_layers
from engine.parallel.mesh import init_distributed, make_mesh
from engine.parallel.sharding import kv_shards, make_rules, named_sharding
from engine.runner import ModelRunner, make_step, mesh_context
from engine.sampler import SamplingMode
from engine.spec import Proposer
from engine.spec.draft import DraftModelProposer
from engine.spec.eagle import EagleProposer
from engine.spec.eagle_head import (
    EagleConfig,
    load_eagle_params,
    random_eagle_params,
    read_eagle_config,
)
from engine.spec.eagle_runner import EagleRunner
from engine.spec.ngram import NgramProposer
from engine.startup import StartupPhases
from engine.weights_update import (
    Params,
    WeightRecipe,
    check_architecture,
    check_tree,
    commit,
    place_like,
)

log = logging.getLogger(__name__)


@dataclasses.dataclass
class LoadedModel:
    cfg: ModelConfig
    params: dict
    tokenizer: object | None
    name: str
    path: Path | None = None
    """The checkpoint loaded (None for dummy weights)."""
    quantization: str | None = None
    """A pre-quantized checkpoint's weight format (engine.loader.prequant), else None."""
    recipe: Any = None
    """engine.weights_update.WeightRecipe: what load_weights did to the loaded weights."""


def load_tokenizer(path: Path | str | None):
    if path is None:
        return None
    t0 = time.perf_counter()
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(path))
    # Part of start-up's weights phase (transformers' import included): said apart.
    log.info("tokenizer loaded in %.1fs", time.perf_counter() - t0)
    return tokenizer


def dummy_model(model: str | None, dtype: jnp.dtype, scan: bool, seed: int,
                place: Place | None = None) -> LoadedModel:
    """Random weights for a known shape name or a config.json (a file or its folder); the
    folder's tokenizer is used when it has one."""
    cfg = preset_config(model or "")
    tokenizer = None
    if cfg is None:
        path = Path(model or "")
        folder = path if path.is_dir() else path.parent
        if not (folder / "config.json").exists() and not path.is_file():
            raise ValueError(f"--load-format dummy needs a config.json or a known shape name, "
                             f"got {model!r}")
        cfg = ModelConfig.from_json(path if path.is_file() else folder / "config.json")
        if (folder / "tokenizer_config.json").exists():
            tokenizer = load_tokenizer(folder)
    params = random_params(cfg, dtype, scan=scan, seed=seed, place=place)
    return LoadedModel(cfg, params, tokenizer, model or "dummy")


def load_model(config: EngineConfig, backend: Backend, dtype: jnp.dtype, scan: bool,
               place: Place | None = None) -> LoadedModel:
    """The model's weights on the device, or on their shards of the mesh with `place`."""
    model = config.model.model
    if config.model.load_format == "dummy":
        return dummy_model(model, dtype, scan, config.model.seed, place)
    from engine.loader.load import is_orbax_checkpoint, load_checkpoint

    if config.model.load_format == "orbax" or is_orbax_checkpoint(model):
        if model is None:
            raise ValueError("--load-format orbax needs the folder `engine convert` wrote "
                             "as the model")
        return _restore_orbax(str(model), backend, dtype, scan, place)
    ckpt = load_checkpoint(model)
    with jax.default_device(backend.model_devices()[0]):
        params = params_from_hf(ckpt.tensors, ckpt.config, dtype, scan=scan, place=place)
    return LoadedModel(ckpt.config, params, load_tokenizer(ckpt.tokenizer_path),
                       model or "smollm2-135m-instruct", Path(ckpt.path), ckpt.quantization)


def _restore_orbax(model: str, backend: Backend, dtype: jnp.dtype, scan: bool,
                   place: Place | None) -> LoadedModel:
    """An orbax checkpoint (engine.loader.orbax) read straight onto the mesh's shards."""
    from engine.loader.orbax import restore

    ck = restore(model, dtype=dtype, place=place, device=backend.model_devices()[0])
    params = ck.params
    if scan:
        params["layers"] = stack_layers(params["layers"])
        place_params(params, place)  # stacking may not keep the shardings
    return LoadedModel(ck.config, params, load_tokenizer(ck.tokenizer_path), ck.source,
                       Path(model), quantization=ck.quantization)


def load_weights(config: EngineConfig, backend: Backend, dtype: jnp.dtype, scan: bool,
                 mesh: Any = None, rules: dict[str, Any] | None = None,
                 place: Place | None = None) -> LoadedModel:
    """The weights as the engine runs them: loaded, q/k/v and gate/up fused (or kept apart),
    quantized as configured, on their shards under a mesh; what `engine convert` saves.
    `quantization` is the weights' format afterwards (the checkpoint's, else the one made)."""
    loaded = load_model(config, backend, dtype, scan, place)
    cfg = loaded.cfg
    quant = resolve_auto(config.model.quantization, loaded.path, sharded=mesh is not None)
    if loaded.quantization is not None and quant not in (None, "f32", loaded.quantization):
        raise ValueError(f"the checkpoint is pre-quantized ({loaded.quantization} weights); "
                         f"quantization {quant} contradicts it: drop it, or pass "
                         f"{loaded.quantization}")
    if quant == "f32" and mesh is not None:  # the CPU kernels are not partitioned
        log.info("quantization f32 (the CPU kernels' weight layout) is off under a mesh")
        quant = None
    if quant == "gguf" and loaded.quantization == "gguf":  # kept blocks read back (orbax)
        quant = None
    # q/k/v fused (or kept apart), projections quantized: a recipe weight updates apply too.
    fuse = config.model.fuse_qkv and qkv_fusable(cfg, mesh, rules or {})
    loaded.recipe = WeightRecipe(cfg, dtype, scan, fuse, quant, place,
                                 fuse_gate_up=config.model.fuse_gate_up)
    loaded.params = loaded.recipe.finish(loaded.params, loaded.path)
    if quant is not None:
        loaded.quantization = loaded.quantization or quant
    return loaded


def qkv_fusable(cfg: ModelConfig, mesh: Any, rules: dict[str, Any]) -> bool:
    """Fused q/k/v weights are split by whole KV heads: fine unless the mesh splits the
    query heads but replicates the KV heads (fewer KV heads than devices)."""
    if mesh is None:
        return True
    def shards(axis: str, n_heads: int) -> int:
        m = rules.get(axis)
        return mesh.shape[m] if m is not None and n_heads % mesh.shape[m] == 0 else 1
    return shards("heads", cfg.num_heads) == shards("kv_heads", cfg.num_kv_heads)


def kv_cache_dtype(name: str, dtype: jnp.dtype, backend: Backend | None = None
                   ) -> jnp.dtype:
    """The KV cache's element type: the model's dtype ('auto'), or for 'fp8' the backend's
    e4m3 (Backend.fp8_dtype: float8_e4m3fn, or float8_e4m3fnuz where the ROCm backend runs
    MI300's; e4m3fn without a backend). K/V are stored with scale 1: written clipped to the
    type's largest value (448, fnuz 240), read upcast by the attention."""
    if name != "fp8":
        return dtype
    return jnp.dtype(backend.fp8_dtype if backend is not None else jnp.float8_e4m3fn)


def kv_pages(config: EngineConfig, cfg: ModelConfig, backend: Backend, itemsize: int,
             shards: int = 1, activation_bytes: int = 0, extra_per_page: int = 0) -> int:
    """KV pool size: explicit max_total_tokens, or a fraction of one device's free memory
    after the weights and the step's activation peak (each device holds 1/shards of every
    page when KV heads are sharded). `extra_per_page`: bytes a page also costs elsewhere
    (EAGLE-3: the target's feature pool and the head's own K/V)."""
    page = config.cache.page_size
    if config.cache.max_total_tokens is not None:
        return -(-config.cache.max_total_tokens // page)
    per_page = (2 * cfg.num_layers * page * cfg.num_kv_heads * cfg.head_dim * itemsize // shards
                + extra_per_page)
    free = backend.memory_info().free_bytes - activation_bytes
    if free < per_page:
        raise ValueError(f"no memory left for a KV cache: {free / 2**30:.2f} GiB free after the "
                         f"weights and {activation_bytes / 2**30:.2f} GiB of activations; lower "
                         f"chunked_prefill_size or max_running_requests, or use more devices")
    return max(1, int(free * config.cache.kv_memory_fraction // per_page))


PROBE_PAGES = 256
"""KV pool of the activation probe: fixed, so its program is found in the persistent cache
on the next start (the scratch size does not depend on the pool: the cache is donated)."""


def activation_peak(config: EngineConfig, cfg: ModelConfig, params: Any, backend: Backend,
                    dtype: jnp.dtype, scan: bool, kv_place: Any) -> int:
    """Device bytes the largest step program needs besides weights and KV cache: XLA's
    scratch plus unaliased outputs, read from the compiled program (compiled over abstract
    inputs at the largest token, sequence and page buckets, with every sampling feature on)."""
    page, s = config.cache.page_size, config.scheduler
    max_len = config.model.max_model_len or cfg.max_position_embeddings
    buckets = step_buckets(s, -(-max_len // page), backend.capabilities.min_seq_bucket,
                           backend.capabilities.min_token_bucket)
    shape = backend.kv_cache_shape(PROBE_PAGES, page, cfg.num_kv_heads, cfg.head_dim)
    axes = backend.kv_cache_axes()
    if scan:
        shape, axes = (cfg.num_layers, *shape), ("layers", *axes)
    sds = jax.ShapeDtypeStruct(shape, dtype, sharding=kv_place(shape, axes) if kv_place else None)
    kv = (sds, sds) if scan else [(sds, sds)] * cfg.num_layers
    mode = SamplingMode(all_greedy=False, filters=True, penalties=True, logit_bias=True,
                        num_logprobs=20)
    batch = abstract_batch(buckets.tokens[-1], buckets.seqs[-1], buckets.pages[-1], False,
                           page, cfg.vocab_size, mode, None, buckets.seqs[-1])
    shape_text = (f"largest step: {buckets.tokens[-1]} tokens, {buckets.seqs[-1]} seqs, "
                  f"{buckets.pages[-1]} pages/seq")
    t0 = time.perf_counter()
    key = probe_memo.probe_key(
        backend=backend.name, options=sorted(backend.options.items()),
        devices=[d.device_kind for d in backend.model_devices()], cfg=cfg, page=page,
        buckets=(buckets.tokens[-1], buckets.seqs[-1], buckets.pages[-1]), kv=kv, mode=mode,
        params=probe_memo.tree_signature(params))
    peak = probe_memo.recall(key)
    if peak is not None:
        log.info("activation peak %.2f GiB (%s; remembered from an earlier start of the same "
                 "program, read in %.1fs)", peak / 2**30, shape_text, time.perf_counter() - t0)
        return peak
    step = make_step(cfg, backend, buckets.seqs[-1])
    with mesh_context(backend):
        mem = step.trace(params, kv, *batch, mode).lower().compile().memory_analysis()
    peak = int(mem.temp_size_in_bytes + mem.output_size_in_bytes - mem.alias_size_in_bytes)
    probe_memo.remember(key, peak)
    log.info("activation peak %.2f GiB (%s; measured in %.1fs)", peak / 2**30, shape_text,
             time.perf_counter() - t0)
    return peak


def build_engine(config: EngineConfig) -> tuple[Engine, LoadedModel]:
    """The engine and its model; engine.startup holds the seconds of each start-up phase
    (each logged as it ends; the device's queue drained at each mark, so that work
    dispatched in one phase is not counted in the next)."""
    phases = StartupPhases.for_build()
    backend = get_backend(config.backend.name, dict(config.backend.options))
    caps = backend.capabilities
    init_distributed(config.parallel, caps.platform)
    enable_persistent_cache(cache_dir() / "xla", caps.platform)
    dtype = jnp.dtype(config.model.dtype or caps.default_dtype)
    if config.cache.kv_cache_dtype == "fp8" and not caps.fp8_kv:
        raise ValueError(f"backend {backend.name!r} cannot read an fp8 KV cache yet; drop "
                         f"--kv-cache-dtype fp8 (cpu, cuda and rocm read it)")
    scan = caps.scan_layers if config.backend.scan_layers is None else config.backend.scan_layers
    mesh = make_mesh(config.parallel, backend.devices())
    rules = make_rules(config.parallel.expert_parallel, dict(config.parallel.axis_rules))
    place = None
    if mesh is not None:  # weights are made (or put) on their shards as they load
        backend.mesh, backend.mesh_rules = mesh, rules
        place = functools.partial(named_sharding, mesh=mesh, rules=rules)
        log.info("mesh %s over %s", dict(mesh.shape), mesh.devices.ravel().tolist())
    loaded = load_weights(config, backend, dtype, scan, mesh, rules, place)
    loaded.params = backend.prepare_weights(loaded.params)  # e.g. ROCm: fp8 as MI300's
    backend.compiler_options = backend.options_for(loaded.params)  # of every program made
    loaded.params = jax.block_until_ready(commit(loaded.params))
    phases.mark("weights")
    cfg = loaded.cfg
    kv_dtype = kv_cache_dtype(config.cache.kv_cache_dtype, dtype, backend)
    peak = 0  # host memory (the CPU backend) is ample next to a step's activations
    if config.cache.max_total_tokens is None and caps.platform not in ("cpu", "torch"):
        peak = activation_peak(config, cfg, loaded.params, backend, kv_dtype, scan, place)
    phases.mark("probe")
    sp = config.speculative
    eagle = None  # EAGLE-3: the target's step keeps the head's features (ModelRunner.hidden)
    extra = 0
    if sp.speculative_algorithm == "eagle":
        if caps.own_model_runner or mesh is not None:
            raise ValueError(f"speculative_algorithm eagle runs on one XLA device for now; "
                             f"backend {backend.name!r} with this parallelism cannot")
        eagle = read_eagle_config(sp.speculative_draft_model, cfg)
        h = eagle.head  # per page: features [page, C * Et] and the head's K and V
        extra = config.cache.page_size * dtype.itemsize * (
            len(eagle.aux_layers) * eagle.target_hidden_size + 2 * h.num_kv_heads * h.head_dim)
    num_pages = kv_pages(config, cfg, backend, kv_dtype.itemsize,
                         kv_shards(cfg.num_kv_heads, mesh, rules), peak, extra)
    page = config.cache.page_size
    max_len = min(cfg.max_position_embeddings, num_pages * page,
                  config.model.max_model_len or cfg.max_position_embeddings)
    s = config.scheduler
    log.info("KV pool: %d pages x %d tokens = %d tokens, %.2f GB (%s)", num_pages, page,
             num_pages * page,
             num_pages * page * 2 * cfg.num_layers * cfg.num_kv_heads * cfg.head_dim
             * kv_dtype.itemsize / 1e9, kv_dtype.name)
    scheduler = Scheduler(SchedulerConfig(
        page_size=page, num_pages=num_pages, max_running_requests=s.max_running_requests,
        chunked_prefill_size=s.chunked_prefill_size, schedule_policy=s.schedule_policy,
        disable_radix_cache=s.disable_radix_cache, max_model_len=max_len))
    eos = eos_ids(cfg, loaded)
    # A backend that runs no XLA programs (npu: torch) brings its own runner class.
    runner_cls = backend.runner_class() if caps.own_model_runner else ModelRunner
    runner = runner_cls(cfg, loaded.params, backend, page_size=page, num_pages=num_pages,
                        max_num_tokens=s.chunked_prefill_size,
                        max_num_seqs=s.max_running_requests, max_model_len=max_len,
                        kv_dtype=kv_dtype, eos_token_ids=eos, kv_place=place,
                        buckets=step_buckets(s, -(-max_len // page), caps.min_seq_bucket,
                                             caps.min_token_bucket),
                        **({"capture": eagle.aux_layers} if eagle else {}))
    jax.block_until_ready(runner.kv)
    phases.mark("KV pool")
    if s.warmup_decode_len:
        if jax.process_count() > 1:
            log.warning("warmup_decode_len is single-process only: skipped")
        else:
            extra = [] if sp.speculative_algorithm is None else verify_grid(
                runner.buckets, page, s.warmup_decode_len, sp.speculative_max_batch,
                sp.speculative_num_draft_tokens)
            warm_up(runner, s.warmup_decode_len, prompt_steps=s.warmup_prompt_steps,
                    threads=s.warmup_threads, store=s.warmup_executables, extra=extra)
            runner.warmed_up = True
    phases.mark("warm-up")
    proposer = None
    if sp.speculative_algorithm is not None:
        proposer = PROPOSERS[sp.speculative_algorithm](Target(
            config, backend, dtype, scan, place, runner, cfg.vocab_size, max_len, eagle))
    engine = Engine(runner, scheduler, loaded.tokenizer, eos_token_ids=eos,
                    vocab_size=cfg.vocab_size, max_model_len=max_len, seed=config.model.seed,
                    overlap=s.overlap_schedule, proposer=proposer,
                    num_draft_tokens=sp.speculative_num_draft_tokens,
                    spec_max_batch=sp.speculative_max_batch,
                    spec_adaptive=sp.speculative_adaptive)
    if s.warmup_decode_len and jax.process_count() == 1 and proposer is not None:
        _warm_up_proposer(proposer, s.warmup_decode_len, sp.speculative_max_batch,
                          s.warmup_threads, sp.speculative_num_draft_tokens)
    engine.weight_recipe = loaded.recipe
    phases.mark("engine")
    engine.startup = phases
    return engine, loaded


@dataclasses.dataclass(frozen=True)
class Target:
    """What a proposer of draft tokens may need of the engine being built."""

    config: EngineConfig
    backend: Backend
    dtype: jnp.dtype
    scan: bool
    place: Place | None
    runner: ModelRunner
    vocab_size: int
    max_model_len: int
    eagle: EagleConfig | None = None
    """eagle: the head's config (read before the target's runner, which captures for it)."""


def _ngram(t: Target) -> NgramProposer:
    sp = t.config.speculative
    return NgramProposer(sp.speculative_ngram_min, sp.speculative_ngram_max)


def _draft(t: Target) -> DraftModelProposer:
    """The draft model, loaded like the target (load_weights: the same load format, dtype,
    q/k/v fusion and quantization), with a KV pool of as many pages as the target's (in the
    weights' dtype)."""
    sp, model = t.config.speculative, t.config.model
    config = dataclasses.replace(t.config, model=dataclasses.replace(
        model, model=sp.speculative_draft_model))
    mesh = t.backend.mesh
    loaded = load_weights(config, t.backend, t.dtype, t.scan, mesh,
                          t.backend.mesh_rules if mesh is not None else None, t.place)
    loaded.params = commit(t.backend.prepare_weights(loaded.params))
    cfg = loaded.cfg
    if cfg.vocab_size > t.vocab_size:
        raise ValueError(f"the draft model {sp.speculative_draft_model} has a vocabulary of "
                         f"{cfg.vocab_size} tokens, the model {t.vocab_size}: it needs the "
                         f"same tokenizer")
    k = sp.speculative_num_draft_tokens
    runner = ModelRunner(cfg, loaded.params, t.backend, page_size=t.runner.page_size,
                         num_pages=t.runner.num_pages, max_num_tokens=t.runner.buckets.tokens[-1],
                         max_num_seqs=t.runner.buckets.seqs[-1],
                         max_model_len=t.max_model_len + k, kv_dtype=t.dtype, kv_place=None,
                         buckets=_draft_buckets(t))
    log.info("draft model %s: %d layers, %d KV pages", sp.speculative_draft_model,
             cfg.num_layers, t.runner.num_pages)
    return DraftModelProposer(runner, t.runner.page_size, t.runner.num_pages, t.vocab_size,
                              unroll=bool(t.backend.options.get("draft_unroll", False)))


def _draft_buckets(t: Target) -> Buckets:
    """A proposer runner's buckets: the target's settings (page buckets, wide steps) over
    contexts k tokens longer."""
    caps, k = t.backend.capabilities, t.config.speculative.speculative_num_draft_tokens
    pages = -(-(t.max_model_len + k) // t.runner.page_size)
    return step_buckets(t.config.scheduler, pages, caps.min_seq_bucket, caps.min_token_bucket)


def _eagle(t: Target) -> EagleProposer:
    """The EAGLE-3 head (random under --load-format dummy), in the weights' dtype, with a KV
    pool of as many pages as the target's."""
    sp, ec = t.config.speculative, t.eagle
    if t.config.model.load_format == "dummy":
        params = random_eagle_params(ec, t.dtype, seed=t.config.model.seed or 0)
    else:
        params = load_eagle_params(sp.speculative_draft_model, ec, t.dtype)
    k = sp.speculative_num_draft_tokens
    runner = EagleRunner(ec, params, t.runner, t.backend, num_pages=t.runner.num_pages,
                         max_model_len=t.max_model_len + k, buckets=_draft_buckets(t))
    log.info("EAGLE-3 head %s: width %d, draft vocabulary %d, target layers %s, %d KV pages",
             sp.speculative_draft_model, ec.head.hidden_size, ec.draft_vocab_size,
             list(ec.aux_layers), t.runner.num_pages)
    return EagleProposer(runner, t.runner.page_size, t.runner.num_pages, t.vocab_size,
                         unroll=bool(t.backend.options.get("draft_unroll", False)))


def _warm_up_proposer(proposer: Proposer, max_len: int, max_batch: int, threads: int,
                      k: int) -> None:
    """A model proposer's programs (proposer_grid), compiled before serving like the
    target's: drafting must compile nothing after ready either. A draft model's: its
    runner's steps (catch-up rows) and its fused k-proposal program (engine.spec.draft_step)
    for every shape of the program's first forward. An EAGLE-3 head's: its draft step
    (catch-up rows, and the step-by-step path's) and its fused k-draft program
    (engine.spec.eagle_runner.EagleChain) for every decode-only shape."""
    if isinstance(proposer, DraftModelProposer):
        r = proposer.runner
        grid = proposer_grid(r.buckets, r.page_size, max_len, max_batch)
        n = warm_up(r, max_len, modes=(SamplingMode(),), threads=threads, grid=grid)
        if proposer._program is not None:
            for shape in grid:
                proposer._program.lower_idle(*shape, k).compile()
            n += len(grid)
    elif isinstance(proposer, EagleProposer):
        r = proposer.runner
        grid = proposer_grid(r.buckets, r.page_size, max_len, max_batch)
        n = r.warm_up(grid)
        if proposer._chain is not None:  # its first forward: one token a seq, decode-only
            for shape in [g for g in grid if g[3]]:
                proposer._chain.lower_idle(*shape, k).compile()
                n += 1
    else:
        return
    log.info("speculation: %d draft programs warmed up", n)


PROPOSERS: dict[str, Callable[[Target], Proposer]] = {"ngram": _ngram, "draft": _draft,
                                                      "eagle": _eagle}
"""speculative_algorithm -> the proposer of draft tokens (engine.spec)."""


def warm_up(runner: ModelRunner, max_len: int, prompt_steps: bool = False,
            modes: tuple[SamplingMode, ...] = (SamplingMode(), SamplingMode(all_greedy=False)),
            threads: int = 0, store: bool = False,
            grid: list[tuple[int, int, int, bool]] | None = None,
            extra: list[tuple[int, int, int, bool]] = ()) -> int:
    """Compile (or load from the persistent cache) the programs of warmup_grid, with
    progress in the log. Each is traced and lowered here, one after another (Python holds
    the GIL), and compiled on one of `threads` threads (0: one per CPU core), while the next
    is lowered: XLA compiles without the GIL. The executables land where the jitted step
    finds them (ModelRunner.lower_idle); nothing runs on the device. With `store`
    (warmup_executables), a program stored serialized by an earlier start is loaded instead
    (nothing traced; ModelRunner.call_step runs it), and each one compiled is stored.
    `grid` replaces warmup_grid's shapes; `extra` adds to them (speculation's verify
    steps). Returns the programs."""
    if grid is None:
        grid = warmup_grid(runner.buckets, runner.page_size, max_len, prompt_steps)
    shapes = list(dict.fromkeys([*grid, *extra]))
    grid = [(mode, *g) for mode in modes for g in shapes]
    workers = max(1, min(len(grid), threads or os.cpu_count() or 1))
    t0, done, lock = time.perf_counter(), [0], threading.Lock()

    def compiled(job: tuple, lowered_s: float | None, fut: concurrent.futures.Future) -> None:
        """Progress; lowered_s None: a stored program's load (False: it failed)."""
        mode, t, s, p, dec = job
        if fut.exception() is not None or fut.result() is False:
            return
        with lock:
            done[0] += 1
            n = done[0]
        how = "loaded stored" if lowered_s is None else f"lowered in {lowered_s:.1f}s"
        log.info("warm-up %d/%d: %s step, %d tokens, %d sequences x %d pages, %s (%s; %.1fs "
                 "since the start)", n, len(grid), "decode" if dec else "prompt", t, s, p,
                 "greedy" if mode.all_greedy else "sampling", how, time.perf_counter() - t0)

    def compile_and_store(lowered: jax.stages.Lowered, key: str | None) -> None:
        executable = lowered.compile()
        if key is not None:
            program_store.save(key, executable)

    def load(job: tuple, key: str) -> bool:  # on a thread, as compilations are
        program = program_store.load(key)
        if program is not None:
            runner.loaded_programs[(*job[1:], job[0])] = program
        return program is not None

    keys = {job: program_store.step_key(runner, *job[1:], job[0]) for job in grid} if store \
        else {}
    log.info("warm-up: %d programs, compiled on %d threads", len(grid), workers)
    with concurrent.futures.ThreadPoolExecutor(workers, thread_name_prefix="compile") as pool:
        futures = []

        def lower_and_compile(job: tuple) -> None:
            t1 = time.perf_counter()
            lowered = runner.lower_idle(*job[1:], job[0])
            fut = pool.submit(compile_and_store, lowered, keys.get(job))
            fut.add_done_callback(functools.partial(compiled, job, time.perf_counter() - t1))
            futures.append(fut)

        loads = {job: pool.submit(load, job, key) for job, key in keys.items()
                 if program_store.stored(key)}
        for fut_job, fut in loads.items():
            fut.add_done_callback(functools.partial(compiled, fut_job, None))
        for job in grid:
            if job not in loads:
                lower_and_compile(job)
        for job, fut in loads.items():
            if not fut.result():  # not loadable: compiled instead
                lower_and_compile(job)
        for fut in futures:
            fut.result()  # a failed compilation raises here
    loaded = len(runner.loaded_programs)
    log.info("warm-up: %d programs in %.1fs (%d loaded stored, %d compiled or read from the "
             "compilation cache)", len(grid), time.perf_counter() - t0, loaded,
             len(grid) - loaded)
    return len(grid)


def eos_ids(cfg: ModelConfig, loaded: LoadedModel) -> tuple[int, ...]:
    ids = set(cfg.eos_token_ids)
    tok = loaded.tokenizer
    if tok is not None and tok.eos_token_id is not None:
        ids.add(tok.eos_token_id)
    return tuple(sorted(ids))


def load_update(config: Any, recipe: WeightRecipe, backend: Any, current: Params,
                model_path: str, load_format: str = "auto") -> Params:
    """Weights read from disk through start-up's loader (any source it reads), checked and
    placed like `current`. Runs off the step loop (it takes seconds)."""
    model = dataclasses.replace(config.model, model=model_path, load_format=load_format)
    loaded = load_model(dataclasses.replace(config, model=model), backend,
                        jnp.dtype(recipe.dtype), recipe.scan, recipe.place)
    check_architecture(loaded.cfg, recipe.cfg)
    params = backend.prepare_weights(recipe.finish(loaded.params, loaded.path))
    check_tree(params, current)
    return place_like(params, current)
