"""The `engine` command: generate, serve, bench, precompile, deploy, convert."""

from __future__ import annotations

import argparse
import logging
import sys

from engine.bench.cli import register_bench
from engine.convert import register_convert
from engine.deploy.cli import register_deploy
from engine.loader.checkpoint import ModelLoadError
from engine.model.config import ConfigError
from engine.options import add_engine_args, make_llm
from engine.precompile import register_precompile
from engine.server.cli import register_serve  # imports no FastAPI/uvicorn until it serves


def cmd_generate(args: argparse.Namespace) -> int:
    from engine.sampling_params import SamplingParams

    llm = make_llm(args)
    params = SamplingParams(max_tokens=args.max_tokens, temperature=args.temperature,
                            top_p=args.top_p, top_k=args.top_k, seed=args.seed)
    if args.chat:
        out = llm.chat([{"role": "user", "content": args.prompt}], params)[0]
    else:
        out = llm.generate(args.prompt, params)[0]
    print(out.text)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="engine", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    g = sub.add_parser("generate", help="generate text for one prompt")
    add_engine_args(g)
    g.add_argument("prompt")
    g.add_argument("--chat", action="store_true", help="apply the model's chat template")
    g.add_argument("--max-tokens", type=int, default=128)
    g.add_argument("--temperature", type=float, default=0.0)
    g.add_argument("--top-p", type=float, default=1.0)
    g.add_argument("--top-k", type=int, default=-1)
    g.set_defaults(func=cmd_generate)
    for register in (register_serve, register_bench, register_precompile, register_deploy,
                     register_convert):
        register(sub)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s",
                        stream=sys.stderr)
    try:
        return args.func(args)
    except (ValueError, ConfigError, ModelLoadError, FileNotFoundError) as e:
        print(f"engine: error: {e}", file=sys.stderr)  # one line a user can act on
        return 2


if __name__ == "__main__":
    sys.exit(main())
