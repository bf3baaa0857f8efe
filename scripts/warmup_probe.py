"""Start-up warm-up time by compile threads: each run builds an engine (random weights) with
the full warm-up on a fresh persistent cache, then again on that warm cache, in a child
process per run, and prints the warm-up's seconds, the engine's total start and the host's
load average (other work on the host slows the parallel runs first).

    python scripts/warmup_probe.py --threads 1 2 -- --backend cpu --model smollm2-135m \
        --max-total-tokens 4096 --max-running-requests 16 --chunked-prefill-size 256

The engine arguments after `--` are `engine serve`'s; the warm-up options are added here
(--warmup-decode-len 1000000 --warmup-prompt-steps --page-buckets max --wide-tokens 16
unless given).
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
import time

CHILD = """
import logging, sys, time
logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stdout)
from engine.builder import build_engine
from engine.config import EngineConfig
from engine.options import engine_options, add_engine_args
import argparse
p = argparse.ArgumentParser(); add_engine_args(p)
a = p.parse_args(sys.argv[1:])
from engine.llm import default_preset
t0 = time.perf_counter()
cfg = EngineConfig.build(a.config or default_preset(a.backend), model=a.model,
    backend=None if a.backend == "auto" else a.backend, **engine_options(a))
build_engine(cfg)
print(f"START {time.perf_counter() - t0:.2f}")
"""

WARMUP = (("--warmup-decode-len", "1000000"), ("--warmup-prompt-steps",),
          ("--page-buckets", "max"), ("--wide-tokens", "16"))


def run(engine_args: list[str], threads: int, cache: str) -> tuple[float, float, int]:
    env = dict(os.environ, ENGINE_CACHE_DIR=cache)
    args = [*engine_args, "--load-format", "dummy", "--warmup-threads", str(threads)]
    for flag in WARMUP:
        if flag[0] not in args:
            args += flag
    res = subprocess.run([sys.executable, "-c", CHILD, *args], env=env, capture_output=True,
                         text=True)
    if res.returncode:
        raise SystemExit(f"the engine failed:\n{res.stderr[-3000:]}")
    out = res.stdout
    warm = re.search(r"warm-up: (\d+) programs in ([\d.]+)s", out)
    start = re.search(r"START ([\d.]+)", out)
    return float(warm.group(2)), float(start.group(1)), int(warm.group(1))


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--threads", type=int, nargs="+", default=[1, 0])
    p.add_argument("engine_args", nargs=argparse.REMAINDER)
    a = p.parse_args()
    engine_args = [x for x in a.engine_args if x != "--"]
    print(f"host: {os.cpu_count()} cores")
    for threads in a.threads:
        with tempfile.TemporaryDirectory() as cache:
            for which in ("cold", "warm"):
                load0 = os.getloadavg()[0]
                t0 = time.perf_counter()
                warm_s, start_s, n = run(engine_args, threads, cache)
                print(f"threads={threads or os.cpu_count()} {which}: {n} programs, warm-up "
                      f"{warm_s:.1f}s, engine built in {start_s:.1f}s (process "
                      f"{time.perf_counter() - t0:.1f}s); load average {load0:.2f} -> "
                      f"{os.getloadavg()[0]:.2f}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
