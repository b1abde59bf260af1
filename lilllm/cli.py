"""The `lilllm` command line. Each subcommand is a thin wrapper over a lilllm function;
a LilllmError (bad input) is printed as one line and exits with status 2."""

import argparse
import sys

from lilllm import LilllmError
from lilllm.tokenizer import DEFAULT_VOCAB_SIZE


def cmd_env(args) -> int:
    from lilllm.env import main

    return main(args.device)


def cmd_prepare(args) -> int:
    from lilllm.data import prepare

    data = prepare(args.tokenizer, args.vocab_size, args.input, args.out, args.text_field, progress=True)
    meta = data.meta
    print(f"wrote {data.path}: {meta['tokenizer']} tokenizer, {meta['vocab_size']:,} tokens ({meta['dtype']} files)")
    for split in ("train", "val"):
        tokens, n_bytes = meta[f"{split}_tokens"], meta[f"{split}_bytes"]
        print(f"  {split}: {tokens:,} tokens from {n_bytes:,} bytes ({n_bytes / tokens:.2f} bytes per token)")
    return 0


def cmd_bench_tokenizer(args) -> int:
    import json

    from lilllm.data import load_text, train_val_split
    from lilllm.tokenizer import benchmark

    text = load_text()
    train, _ = train_val_split(text)
    result = benchmark(train, text, args.vocab_size, args.repeats)
    print(f"training a {result['vocab_size']:,}-token BPE on the train split: {result['train_s']:.2f} s")
    print(f"encoding the corpus ({result['megabytes']:.2f} MB, {result['tokens']:,} tokens) in one call, best of {args.repeats}:")
    print(f"  tokenizers {result['hf_mb_s']:6.2f} MB/s")
    print(f"  tiktoken   {result['tiktoken_mb_s']:6.2f} MB/s  ({result['speedup']}x faster)")
    print(f"  identical ids: {'yes' if result['ids_identical'] else 'NO'}")
    print(json.dumps(result))
    return 0 if result["ids_identical"] else 1


def cmd_train(args) -> int:
    from lilllm.train import make_config, train

    config = make_config(args.preset, args.settings, args.config)
    result = train(config, resume=args.resume)
    return 130 if result.summary["interrupted"] else 0


def cmd_eval(args) -> int:
    from lilllm.train import evaluate_checkpoint

    scores = evaluate_checkpoint(args.checkpoint, args.device)
    print(f"{args.checkpoint} (step {scores['step']:,}): val {scores['val_bpb']:.4f} bits per byte "
          f"({scores['val_loss']:.4f} nats per token)")
    return 0


def cmd_bench_pretrain(args) -> int:
    import json

    from lilllm.train import bench_pretrain

    result = bench_pretrain(args.long, args.steps, args.device)
    print(f"matmul throughput: {result['matmul_flops'] / 1e9:.0f} GFLOP/s")
    print(f"{'recipe':<12} {'val bpb':>8} {'best bpb':>8} {'steps':>7} {'train s':>8} {'bytes/s':>9} {'MFU':>6}")
    for name, run in result["runs"].items():
        print(f"{name:<12} {run['val_bpb']:8.4f} {run['best_val_bpb']:8.4f} {run['step']:7,} {run['train_time_s']:8.1f} "
              f"{run['bytes_per_s']:9,.0f} {run['mfu']:6.1%}")
    print(json.dumps(result["line"]))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lilllm", description="Build, train, fine-tune and sample a small language model.")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    env = commands.add_parser("env", help="check Python, the dependencies, the device and the data")
    env.add_argument("--device", help="cpu, cuda, cuda:N or mps (default: $LILLLM_DEVICE, else the best available)")
    env.set_defaults(run=cmd_env)

    prepare = commands.add_parser("prepare", help="train a tokenizer and write the token files of a corpus")
    prepare.add_argument("--tokenizer", choices=("char", "bpe"), default="bpe", help="tokenizer kind (default: bpe)")
    prepare.add_argument("--vocab-size", type=int, help=f"BPE vocabulary size, special tokens included (default: {DEFAULT_VOCAB_SIZE})")
    prepare.add_argument("--input", nargs="+", metavar="FILE",
                         help="local .txt, .jsonl/.json or .parquet files (default: the vendored tiny-shakespeare)")
    prepare.add_argument("--text-field", default="text", help="the field that holds the text in jsonl/parquet rows (default: text)")
    prepare.add_argument("--out", metavar="DIR", help="output folder (default: data/<corpus>-<tokenizer>[-<vocab size>])")
    prepare.set_defaults(run=cmd_prepare)

    bench = commands.add_parser("bench", help="measure speed").add_subparsers(dest="target", required=True, metavar="TARGET")
    bench_tokenizer = bench.add_parser("tokenizer", help="time BPE training and encoding with tokenizers vs tiktoken")
    bench_tokenizer.add_argument("--vocab-size", type=int, default=DEFAULT_VOCAB_SIZE, help=f"(default: {DEFAULT_VOCAB_SIZE})")
    bench_tokenizer.add_argument("--repeats", type=int, default=3, help="time each step this many times, keep the best (default: 3)")
    bench_tokenizer.set_defaults(run=cmd_bench_tokenizer)
    bench_pretrain = bench.add_parser("pretrain", help="nanoGPT's CPU recipe, then the default recipe for the same time")
    bench_pretrain.add_argument("--long", action="store_true", help="also train the `long` recipe (10 minutes)")
    bench_pretrain.add_argument("--steps", type=int, help="shorten the nanoGPT run to this many steps (a quick check)")
    bench_pretrain.add_argument("--device", help="cpu, cuda, cuda:N or mps (default: the best available)")
    bench_pretrain.set_defaults(run=cmd_bench_pretrain)

    train = commands.add_parser("train", help="pretrain a model (a preset, changed with --key=value settings)",
                                epilog="settings: any TrainConfig field as --key=value (--lr=3e-4, --steps=500), "
                                       "model fields as --model.key=value (--model.d_model=192); "
                                       "run under `torchrun --nproc_per_node=N` for several processes")
    train.add_argument("preset", nargs="?", default="tiny", help="tiny (default), nanogpt-cpu or long")
    train.add_argument("--config", metavar="FILE", help="a JSON file of settings, applied before --key=value ones")
    train.add_argument("--resume", action="store_true", help="continue the run in out_dir from its last.pt")
    train.set_defaults(run=cmd_train, takes_settings=True)

    evaluate = commands.add_parser("eval", help="score a checkpoint on the val split, in bits per byte")
    evaluate.add_argument("checkpoint", help="a .pt file written by `lilllm train` (e.g. runs/tiny/best.pt)")
    evaluate.add_argument("--device", help="cpu, cuda, cuda:N or mps (default: the best available)")
    evaluate.set_defaults(run=cmd_eval)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, settings = parser.parse_known_args(argv)  # --key=value settings are the train command's
    if settings and not getattr(args, "takes_settings", False):
        parser.error(f"unrecognized arguments: {' '.join(settings)}")
    args.settings = settings
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
