"""`tensorjet generate | chat | serve | bench | tune | eval | quantize`: the command line.

Every engine option is a flag spelled as in the guide (`--max_batch_size`) or with dashes
(`--max-batch-size`).
"""

from __future__ import annotations

import argparse
import logging
import sys

from tensorjet.config import ENGINE_OPTIONS
from tensorjet.engine_args import add_engine_args, engine_options

MODEL_HELP = ENGINE_OPTIONS["model"].help


def _sampling_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--max_tokens", "--max-tokens", type=int, default=128)
    parser.add_argument("--temperature", type=float, default=0.0)
    parser.add_argument("--top_p", "--top-p", type=float, default=1.0)
    parser.add_argument("--top_k", "--top-k", type=int, default=0)
    parser.add_argument("--seed_request", type=int, default=None, help="per-request sampling seed")


def _sampling_params(args):
    from tensorjet.sampling_params import SamplingParams

    return SamplingParams(
        max_tokens=args.max_tokens,
        temperature=args.temperature,
        top_p=args.top_p,
        top_k=args.top_k,
        seed=args.seed_request,
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="tensorjet", description="Fast, readable LLM inference.")
    parser.add_argument("--log-level", default="WARNING")
    sub = parser.add_subparsers(dest="command", required=True)

    gen = sub.add_parser("generate", help="generate from prompts (streams a single prompt)")
    gen.add_argument("prompts", nargs="+", help="one or more prompts")
    gen.add_argument("--model", default=None, help=MODEL_HELP)
    gen.add_argument(
        "--chat_template",
        "--chat-template",
        action="store_true",
        help="wrap each prompt as a user message in the model's chat template",
    )
    _sampling_args(gen)
    add_engine_args(gen)

    from tensorjet.bench.cli import register as register_bench
    from tensorjet.calibration.cli import register as register_quantize
    from tensorjet.eval.cli import register as register_eval
    from tensorjet.serve.cli import register as register_serve

    register_serve(sub)
    register_bench(sub)
    register_eval(sub)
    register_quantize(sub)

    chat = sub.add_parser("chat", help="interactive chat with the model's chat template")
    chat.add_argument("--model", default=None, help=MODEL_HELP)
    chat.add_argument("--system", default=None, help="system message")
    _sampling_args(chat)
    add_engine_args(chat)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    if hasattr(args, "func"):  # serve, bench, tune, eval, quantize
        return args.func(args)
    try:
        if args.command == "generate":
            return _generate(args)
        return _chat(args)
    except ValueError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2


def _generate(args) -> int:
    import asyncio

    from tensorjet.llm import LLM

    llm = LLM(**engine_options(args))
    try:  # shut down: tensor-parallel workers stop and leave their process group
        params = _sampling_params(args)
        prompts = args.prompts
        if args.chat_template:
            prompts = [llm.apply_chat_template([{"role": "user", "content": p}]) for p in prompts]
        if len(prompts) == 1:
            asyncio.run(_stream(llm, prompts[0], params))
            return 0
        for out in llm.generate(prompts, params, use_tqdm=True):
            print(f"=== {out.prompt if out.prompt is not None else '(chat)'}\n{out.outputs[0].text}\n")
        return 0
    finally:
        llm.shutdown()


async def _stream(llm, prompt, params) -> str:
    text = ""
    async for out in llm.generate_async(prompt, params, streaming=True):
        delta = out.outputs[0].text_diff
        text += delta
        print(delta, end="", flush=True)
    print()
    return text


def _chat(args) -> int:
    import asyncio

    from tensorjet.llm import LLM

    llm = LLM(**engine_options(args))
    try:
        params = _sampling_params(args)
        messages: list[dict[str, str]] = []
        if args.system:
            messages.append({"role": "system", "content": args.system})
        print("tensorjet chat: type a message, an empty line or Ctrl-D to quit.", file=sys.stderr)
        while True:
            try:
                line = input("> ")
            except EOFError:
                break
            if not line.strip():
                break
            messages.append({"role": "user", "content": line})
            reply = asyncio.run(_stream(llm, llm.apply_chat_template(messages), params))
            messages.append({"role": "assistant", "content": reply})
        return 0
    finally:
        llm.shutdown()


if __name__ == "__main__":
    sys.exit(main())
