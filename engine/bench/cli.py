"""`engine bench offline ...`: argument parsing and the side-by-side report."""

from __future__ import annotations

import argparse
import logging

from engine.bench.datasets import add_dataset_args, make_requests
from engine.bench.latency_baselines import BASELINES
from engine.bench.load import register_load
from engine.options import add_engine_args, make_llm

log = logging.getLogger(__name__)


def cmd_offline(args: argparse.Namespace) -> int:
    from engine.bench.hostload import HostLoad, on_cpu
    from engine.bench.offline import run_engine, write_json
    from engine.bench.roofline import copy_bandwidth, matmul_rate

    load = HostLoad.start(on_cpu(args))
    hf = None
    if args.baseline == "hf":  # first: see engine.bench.hf_baseline.baseline
        from engine.bench.hf_baseline import baseline

        hf = baseline(args)
        print(f"\n{'=' * 16} Offline Benchmark Result {'=' * 16}\n{hf.report()}", flush=True)
    llm = make_llm(args)
    reqs = make_requests(args, llm.model_config.vocab_size)
    runs = [("engine", llm)]
    if args.compare_cache_off:
        off = argparse.Namespace(**{**vars(args), "disable_radix_cache": True})
        runs.append(("engine (radix cache off)", make_llm(off)))
    rates = (copy_bandwidth(), matmul_rate())  # for the roofline of each run's steps
    print(f"copy bandwidth (read + write) {rates[0] / 1e9:.1f} GB/s, bf16 matmul "
          f"{rates[1] / 1e12:.1f} TFLOP/s", flush=True)
    results = []
    for name, engine_llm in runs:
        for _ in range(args.warmup_runs):  # compiles every shape the workload meets
            run_engine(engine_llm, reqs, name)
        results.append(run_engine(engine_llm, reqs, name, rates))
        print(f"\n{'=' * 16} Offline Benchmark Result {'=' * 16}\n{results[-1].report()}",
              flush=True)
    results += [hf] if hf else []
    if len(results) > 1:
        base = results[0].output_throughput
        print("\n" + "\n".join(f"{r.name}: {base / r.output_throughput:.2f}x slower than "
                               f"{results[0].name}" if r is not results[0] else
                               f"{r.name}: {r.output_throughput:.1f} output tok/s"
                               for r in results))
    load.finish()
    if args.output_json:
        write_json(args.output_json, results, {k: v for k, v in vars(args).items()
                                               if k != "func"}, host_load=load.as_dict())
    return 0


def cmd_latency(args: argparse.Namespace) -> int:
    import json

    from engine.bench.hostload import HostLoad, on_cpu
    from engine.bench.latency import HEADER, measure, row_line
    from engine.bench.latency_baselines import compare_line, run_baselines
    from engine.bench.roofline import copy_bandwidth

    if args.speculative_algorithm is not None:  # it times steps, not tokens
        raise SystemExit("engine bench latency times decode steps of one token: measure "
                         "speculative decoding with engine bench spec")
    load = HostLoad.start(on_cpu(args))
    base = run_baselines(args) if args.baseline else []  # first: as for --baseline hf offline
    llm = make_llm(args)
    bw = copy_bandwidth()
    print(f"copy bandwidth (read + write): {bw / 1e9:.1f} GB/s\n{HEADER}", flush=True)
    rows = []

    def dump() -> None:  # rewritten after every row: a cut-off run keeps what it had
        if args.output_json:
            with open(args.output_json, "w") as f:
                json.dump({"copy_bandwidth": bw, "rows": rows, "baseline_rows": base,
                           "host_load": load.as_dict()}, f, indent=2)

    for b in args.batch_size:
        rows.append(measure(llm, b, args.input_len, args.output_len))
        print(row_line(rows[-1], bw), flush=True)
        dump()
    for r in base:
        print(compare_line(r, next(e for e in rows if e["batch"] == r["batch"])), flush=True)
    load.finish()
    dump()
    return 0


def cmd_spec(args: argparse.Namespace) -> int:
    import json

    from engine.bench.hostload import HostLoad, on_cpu
    from engine.bench.spec import HEADER, compare, row_line

    load = HostLoad.start(on_cpu(args))
    llm = make_llm(args)
    sp = llm.config.speculative
    print(f"speculative decoding: {sp.speculative_algorithm}, "
          f"{sp.speculative_num_draft_tokens} draft tokens\n{HEADER}", flush=True)
    rows = []
    for b in args.batch_size:
        rows.append(compare(llm, b, args.output_len, args.warmup_runs))
        print(row_line(rows[-1]), flush=True)
        if args.output_json:  # rewritten after every row: a cut-off run keeps what it had
            with open(args.output_json, "w") as f:
                json.dump({"rows": rows, "host_load": load.as_dict()}, f, indent=2)
    load.finish()
    if args.output_json:
        with open(args.output_json, "w") as f:
            json.dump({"rows": rows, "host_load": load.as_dict()}, f, indent=2)
    return 0


def cmd_serving(args: argparse.Namespace) -> int:
    from engine.bench.serving import main

    logging.getLogger("httpx").setLevel(logging.WARNING)  # a line per request
    return main(args)


def cmd_structured(args: argparse.Namespace) -> int:
    import json

    from engine.bench.structured import HEADER, compare, compile_time, row_line

    llm = make_llm(args)
    if llm.tokenizer is None:
        raise SystemExit("structured outputs need a tokenizer: with --load-format dummy, give "
                         "--model a folder holding config.json and the tokenizer files")
    limit = llm.engine.scheduler.config.max_running_requests
    if max(args.batch_size) > limit:
        raise SystemExit(f"batch size {max(args.batch_size)} exceeds --max-running-requests "
                         f"{limit}")
    out: dict = {"backend": llm.engine.grammar_backend,
                 "compile_s": compile_time(llm), "rows": []}
    print(f"grammar backend: {out['backend']}; JSON schema compile: "
          f"{out['compile_s'] * 1e3:.2f} ms\n{HEADER}", flush=True)
    for b in args.batch_size:
        out["rows"].append(compare(llm, b, args.output_len))
        print(row_line(out["rows"][-1]), flush=True)
        if args.output_json:  # rewritten after every row: a cut-off run keeps what it had
            with open(args.output_json, "w") as f:
                json.dump(out, f, indent=2)
    return 0


def cmd_weights(args: argparse.Namespace) -> int:
    import json

    from engine.bench.weights import report, time_updates

    out = time_updates(make_llm(args), args.repeats)
    print(report(out), flush=True)
    if args.output_json:
        with open(args.output_json, "w") as f:
            json.dump(out, f, indent=2)
    return 0


def register_bench(sub: argparse._SubParsersAction) -> None:

    bench = sub.add_parser("bench", help="benchmarks").add_subparsers(dest="mode", required=True)
    p = bench.add_parser("offline", help="a workload in-process: throughput, cache hit rate")
    add_engine_args(p)
    add_dataset_args(p)
    p.add_argument("--baseline", choices=["hf"], default=None,
                   help="also run the workload through HF transformers generate")
    p.add_argument("--hf-batch-size", type=int, default=16)
    p.add_argument("--hf-num-prompts", type=int, default=None,
                   help="run HF on the first N prompts only (its throughput is per second, "
                   "so a subset compares; HF is too slow for 1000 long prompts)")
    p.add_argument("--compare-cache-off", action="store_true",
                   help="also run with the radix cache disabled, side by side")
    p.add_argument("--warmup-runs", type=int, default=1)
    p.add_argument("--output-json", default=None)
    p.set_defaults(func=cmd_offline)

    p = bench.add_parser("latency", help="one batch: prefill time, decode step vs roofline")
    add_engine_args(p)
    p.add_argument("--batch-size", type=int, nargs="+", default=[1])
    p.add_argument("--input-len", type=int, default=1024)
    p.add_argument("--output-len", type=int, default=32)
    p.add_argument("--baseline", nargs="+", choices=list(BASELINES), default=None,
                   help="also run the same batches through these, before the engine: hf "
                   "(transformers generate on the same weights), llama.cpp (llama-cpp-python, "
                   "the 'bench' extra, on the GGUF file itself; batch 1)")
    p.add_argument("--output-json", default=None)
    p.set_defaults(func=cmd_latency)

    p = bench.add_parser("spec", help="speculative decoding off and on, side by side: "
                         "output tok/s, tokens per step, acceptance (a repetitive workload)")
    add_engine_args(p)
    p.add_argument("--batch-size", type=int, nargs="+", default=[1])
    p.add_argument("--output-len", type=int, default=128)
    p.add_argument("--warmup-runs", type=int, default=1)
    p.add_argument("--output-json", default=None)
    p.set_defaults(func=cmd_spec)

    p = bench.add_parser("serving", help="a workload against a running server: throughput, "
                         "TTFT, TPOT, ITL, E2E latency")
    p.add_argument("--base-url", default=None, help="default: http://HOST:PORT")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=30000)
    p.add_argument("--model", default=None, help="the model name to send (default: none, "
                   "which the server accepts as its own)")
    p.add_argument("--api-key", default=None)
    p.add_argument("--request-rate", type=float, default=float("inf"),
                   help="requests per second, Poisson arrivals (inf: all at once)")
    p.add_argument("--max-concurrency", type=int, default=None)
    p.add_argument("--warmup-requests", type=int, default=1)
    p.add_argument("--vocab-size", type=int, default=32000,
                   help="prompt ids are drawn below half of this (32000 suits most models)")
    p.add_argument("--seed", type=int, default=0, help="seed of the arrival times")
    add_dataset_args(p)
    p.add_argument("--output-json", default=None)
    p.set_defaults(func=cmd_serving)

    p = bench.add_parser("structured", help="ITL with and without a JSON schema, and the "
                         "host time of the grammar token masks")
    add_engine_args(p)
    p.add_argument("--batch-size", type=int, nargs="+", default=[1, 16, 32])
    p.add_argument("--output-len", type=int, default=32, help="decode steps timed")
    p.add_argument("--output-json", default=None)
    p.set_defaults(func=cmd_structured)

    register_load(bench)

    p = bench.add_parser("weights", help="LLM.update_weights in-process from device arrays: "
                         "seconds per update, and no step recompiled")
    add_engine_args(p)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--output-json", default=None)
    p.set_defaults(func=cmd_weights)
