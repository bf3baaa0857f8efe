"""The server's host path at 400 streams, on the CPU: what each client costs the server.

`engine serve --backend cpu` runs a tiny random Llama (2 layers, hidden 64: a 400-row decode
step is a few ms, so the host path dominates) with the 8B shape's 49k-token tokenizer
(detokenization costs what it does on a GPU host), and both clients send the same workload,
one after the other, at rate inf:
  - ours: `engine bench serving` (token-id prompts, /v1/completions, OpenAI stream events);
  - SGLang's: `.bench/bench_serving.py --backend sglang --dataset-name random-ids` (text
    prompts to /generate, events with the whole text so far and meta_info), as
    scripts/gpu/serve.sh runs it on the H200.
Per client: output tok/s, ITL median/p99 (each client's own figures), the server process's CPU
time per generated token split by thread (the asyncio/HTTP thread, the engine loop, the rest:
XLA's pools and the tokenizer threads), and the client's own CPU time (it shares the cores).
CPU times come from /proc (utime + stime), so they hold on a host shared with other work where
wall-clock rates do not.

    python scripts/host_serving.py [--num-prompts 400 --input-len 256 --output-len 128]
        [--clients ours sglang] [--repeat 1] [--out .out/host_serving] [-- server flags]

Needs .bench/ (scripts/gpu/bench_serving_setup.sh): bench_serving.py and llama-3.1-8b/.
A warm-up pass of our client runs first (unmeasured) so that step programs compile before
the measured runs; `compiles` counts what still compiled during each run.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

TINY_49K = {"model_type": "llama", "vocab_size": 49152, "hidden_size": 64,
            "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
            "num_key_value_heads": 2, "max_position_embeddings": 4096, "rms_norm_eps": 1e-5,
            "rope_theta": 10000.0, "tie_word_embeddings": False,
            "architectures": ["LlamaForCausalLM"]}
"""A model whose step is cheap next to the host's work, over the 49k-token vocabulary."""
TICK = os.sysconf("SC_CLK_TCK")


def thread_times(pid: int) -> dict[int, tuple[str, float]]:
    """tid -> (thread name, CPU seconds: utime + stime) of every live thread of `pid`."""
    out = {}
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            stat = (task / "stat").read_text()
        except OSError:  # ended meanwhile
            continue
        name = stat[stat.index("(") + 1:stat.rindex(")")]
        fields = stat[stat.rindex(")") + 2:].split()
        out[int(task.name)] = (name, (int(fields[11]) + int(fields[12])) / TICK)
    return out


def process_time(pid: int) -> float:
    """CPU seconds of the whole process, ended threads included."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICK


def group_of(pid: int, tid: int, name: str) -> str:
    if tid == pid:
        return "http"  # the main thread runs uvicorn's event loop
    if name == "engine-loop":
        return "engine"
    return "other"  # XLA's thread pools, the tokenizer executor, ...


def metric(port: int, name: str) -> float:
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
    return sum(float(line.split()[-1]) for line in text.splitlines() if line.startswith(name))


def client_command(kind: str, a: argparse.Namespace, out: Path, tag: str) -> list[str]:
    common = ["--port", str(a.port), "--num-prompts", str(a.num_prompts), "--random-input-len",
              str(a.input_len), "--random-output-len", str(a.output_len),
              "--random-range-ratio", "0.5", "--request-rate", "inf"]
    if kind == "ours":
        return [sys.executable, "-m", "engine.cli", "bench", "serving", "--dataset", "random",
                "--vocab-size", "49152", *common, "--output-json", str(out / f"{tag}.json")]
    return [sys.executable, str(a.bench), "--backend", "sglang", "--model", str(a.tokenizer),
            "--tokenizer", str(a.tokenizer), "--dataset-name", "random-ids", "--disable-tqdm",
            *common, "--output-file", str(out / f"{tag}.jsonl")]


def client_result(kind: str, out: Path, tag: str) -> dict[str, float]:
    if kind == "ours":
        r = json.loads((out / f"{tag}.json").read_text())
        return {"tokens": r["total_output_tokens"], "tok_s": r["output_throughput"],
                "itl_med": r["itl_ms"]["median"], "itl_p99": r["itl_ms"]["p99"],
                "ok": r["completed"]}
    r = json.loads((out / f"{tag}.jsonl").read_text().splitlines()[-1])
    return {"tokens": r["total_output_tokens"], "tok_s": r["output_throughput"],
            "itl_med": r["median_itl_ms"], "itl_p99": r["p99_itl_ms"], "ok": r["completed"]}


def run_client(kind: str, a: argparse.Namespace, server: int, out: Path,
               tag: str) -> dict[str, float]:
    """One client run; the server's CPU seconds by thread group and the client's."""
    before, total0 = thread_times(server), process_time(server)
    compiles0 = metric(a.port, "engine:step_compilations_total")
    spy = None
    if a.py_spy and tag != "warmup":  # sampled stacks of every server thread, collapsed
        spy = subprocess.Popen(["py-spy", "record", "-p", str(server), "-r", "100", "-f", "raw",
                                "--threads", "-o", str(out / f"{tag}.stacks"),
                                *{"native": ["--native"], "gil": ["--gil", "--nonblocking"]}.get(
                                    a.py_spy, ["--nonblocking"])],
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    with open(out / f"{tag}.txt", "w") as log:
        proc = subprocess.Popen(client_command(kind, a, out, tag), stdout=log,
                                stderr=subprocess.STDOUT)
        _, status, usage = os.wait4(proc.pid, 0)
    if spy is not None:
        spy.send_signal(signal.SIGINT)
        spy.wait(60)
    if status != 0:
        sys.exit(f"{tag}: the client failed (see {out / f'{tag}.txt'})")
    after, total1 = thread_times(server), process_time(server)
    res = client_result(kind, out, tag)
    groups = {"http": 0.0, "engine": 0.0, "other": 0.0}
    for tid, (name, t) in after.items():
        groups[group_of(server, tid, name)] += t - before.get(tid, (name, 0.0))[1]
    # threads that ended during the run count as "other"
    groups["other"] += (total1 - total0) - sum(groups.values())
    res.update({f"cpu_{k}": v for k, v in groups.items()})
    res.update(cpu_server=total1 - total0, cpu_client=usage.ru_utime + usage.ru_stime,
               compiles=metric(a.port, "engine:step_compilations_total") - compiles0)
    return res


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--num-prompts", type=int, default=400)
    p.add_argument("--input-len", type=int, default=256)
    p.add_argument("--output-len", type=int, default=128)
    p.add_argument("--clients", nargs="+", default=["ours", "sglang"],
                   choices=["ours", "sglang"])
    p.add_argument("--repeat", type=int, default=1, help="runs per client, alternating")
    p.add_argument("--port", type=int, default=30123)
    p.add_argument("--bench", type=Path, default=Path(".bench/bench_serving.py"))
    p.add_argument("--tokenizer", type=Path, default=Path(".bench/llama-3.1-8b"))
    p.add_argument("--out", type=Path, default=Path(".out/host_serving"))
    p.add_argument("--py-spy", choices=["python", "gil", "native"],
                   help="profile the server during each measured run (py-spy on PATH): "
                   "OUT/TAG.stacks, collapsed stacks per thread (gil: only the thread that "
                   "holds the GIL; python counts threads waiting for it too)")
    p.add_argument("server_args", nargs="*", help="more `engine serve` flags (after --)")
    a = p.parse_args()
    for f in (a.bench, a.tokenizer / "tokenizer.json"):
        if not f.exists():
            sys.exit(f"missing {f}: run scripts/gpu/bench_serving_setup.sh")
    a.out.mkdir(parents=True, exist_ok=True)
    model = Path(tempfile.mkdtemp(prefix="host_serving_"))
    (model / "config.json").write_text(json.dumps(TINY_49K))
    for f in a.tokenizer.iterdir():
        if f.name != "config.json":
            shutil.copy(f, model)
    tokens = a.num_prompts * (a.input_len + a.output_len) * 2  # the whole burst fits the pool
    cmd = [sys.executable, "-m", "engine.cli", "serve", "--backend", "cpu", "--model",
           str(model), "--load-format", "dummy", "--port", str(a.port),
           "--max-running-requests", str(max(512, a.num_prompts)), "--chunked-prefill-size",
           "8192", "--max-total-tokens", str(tokens), "--overlap-schedule",
           # repeated runs send the same prompts: no run may find another's in the cache
           "--disable-radix-cache", *a.server_args]
    with open(a.out / "server.log", "w") as log:
        server = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
    try:
        for _ in range(600):
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{a.port}/health", timeout=2)
                break
            except OSError:
                if server.poll() is not None:
                    sys.exit(f"the server exited: see {a.out / 'server.log'}")
                time.sleep(0.5)
        if server.poll() is not None:  # /health answered by another server on the port
            sys.exit(f"the server exited: see {a.out / 'server.log'}")
        run_client("ours", a, server.pid, a.out, "warmup")
        rows = []
        for r in range(a.repeat):
            for kind in a.clients:
                rows.append((kind, run_client(kind, a, server.pid, a.out, f"{kind}{r}")))
    finally:
        server.terminate()
        server.wait(60)
        shutil.rmtree(model, ignore_errors=True)
    print(f"{a.num_prompts} prompts, {a.input_len} +-50% in, {a.output_len} +-50% out, rate inf")
    print(f"{'client':<8}{'tokens':>8}{'tok/s':>8}{'ITL med':>9}{'ITL p99':>9}"
          f"{'server CPU ms/token: all':>26}{'http':>7}{'engine':>8}{'other':>7}"
          f"{'client CPU s':>14}{'compiles':>10}")
    for kind, r in rows:
        per = {k: 1000 * r[f"cpu_{k}"] / r["tokens"] for k in ("server", "http", "engine",
                                                              "other")}
        print(f"{kind:<8}{r['tokens']:>8.0f}{r['tok_s']:>8.0f}{r['itl_med']:>9.1f}"
              f"{r['itl_p99']:>9.1f}{per['server']:>26.3f}{per['http']:>7.3f}"
              f"{per['engine']:>8.3f}{per['other']:>7.3f}{r['cpu_client']:>14.1f}"
              f"{r['compiles']:>10.0f}")
    (a.out / "summary.json").write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
