"""The `lilllm` command line. Each subcommand is a thin wrapper over a lilllm function;
a LilllmError (bad input) is printed as one line and exits with status 2."""

import argparse
import sys

from lilllm import LilllmError


def cmd_env(args) -> int:
    from lilllm.env import main

    return main(args.device)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lilllm", description="Build, train, fine-tune and sample a small language model.")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    env = commands.add_parser("env", help="check Python, the dependencies, the device and the data")
    env.add_argument("--device", help="cpu, cuda, cuda:N or mps (default: $LILLLM_DEVICE, else the best available)")
    env.set_defaults(run=cmd_env)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.run(args)
    except LilllmError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
