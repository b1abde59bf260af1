"""The `lilllm` command line: argparse only. Each subcommand is a thin wrapper over a lilllm
function; a LilllmError (bad input) is printed as one line and exits with status 2. Every
option is spelt with dashes (--vocab-size, and the training settings --out-dir=...)."""

import argparse
import json
import shlex
import sys

from lilllm import LilllmError
from lilllm.sft import CopyDrill, Finetune
from lilllm.tokenizer import DEFAULT_VOCAB_SIZE
from lilllm.train import RECIPES

DEVICE_HELP = "cpu, cuda, cuda:N or mps (default: $LILLLM_DEVICE, else the best available)"


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
    from lilllm.bench import bench_tokenizer, markdown_tokenizer, print_tokenizer

    result = bench_tokenizer(args.vocab_size, args.repeats)
    _report(args, result, print_tokenizer, markdown_tokenizer)
    return 0 if result["ids_identical"] else 1


def _report(args, result: dict, print_table, markdown, section: str | None = None) -> None:
    """A benchmark's table and JSON line, or (--markdown) the README's table for it, which
    --readme also writes into the README between the marker comments of `section` (default:
    the benchmark's name)."""
    from lilllm.bench import write_readme_section
    from lilllm.runtime import repo_path, shown

    if args.markdown:
        print(markdown(result, args.command_line))
    else:
        print_table(result)
    if args.readme:
        path = write_readme_section(section or args.target, markdown(result, args.command_line), repo_path(args.readme))
        print(f"wrote the table into {shown(path)}", file=sys.stderr)  # stdout still ends with the JSON line


def cmd_train(args) -> int:
    from lilllm.train import make_config, train

    config = make_config(args.recipe, args.settings, args.config)
    resume_command = args.command_line + ("" if args.resume else " --resume")
    result = train(config, resume=args.resume, recipe=args.recipe, resume_command=resume_command)
    return 130 if result.summary["interrupted"] else 0


def cmd_eval(args) -> int:
    from lilllm.train import evaluate_checkpoint

    scores = evaluate_checkpoint(args.checkpoint, args.device)
    print(f"{args.checkpoint} (step {scores['step']:,}): val {scores['val_bpb']:.4f} bits per byte "
          f"({scores['val_loss']:.4f} nats per token)")
    return 0


def cmd_compare(args) -> int:
    from lilllm.progress import compare_runs

    table, figure = compare_runs(args.runs)
    print(table)
    figure.savefig(args.out, dpi=120, bbox_inches="tight")
    print(f"wrote {args.out}")
    return 0


def cmd_bench_pretrain(args) -> int:
    from lilllm.bench import bench_pretrain, markdown_pretrain, print_pretrain

    _report(args, bench_pretrain(args.long, args.steps, args.device), print_pretrain, markdown_pretrain)
    return 0


def cmd_bench_speedrun(args) -> int:
    from lilllm.bench import bench_speedrun, markdown_speedrun, measured_on, print_speedrun
    from lilllm.runtime import repo_path, shown, write_atomically

    result = bench_speedrun(seeds=tuple(range(args.seeds)), budget=args.budget,
                            log=lambda message: print(message, file=sys.stderr, flush=True))  # progress, off stdout
    _report(args, result, print_speedrun, markdown_speedrun)
    if args.save:  # chapter 13 reads its table from this file rather than training for most of an hour
        path = write_atomically(repo_path(args.save), json.dumps({"measured": measured_on(args.command_line), **result},
                                                                  indent=1, ensure_ascii=False) + "\n")
        print(f"wrote {shown(path)}", file=sys.stderr)
    return 0


def _sampling_options(args) -> dict:
    """The sampling settings of `sample` and `chat`, checked before the checkpoint loads."""
    from lilllm.sampling import check_sampling

    check_sampling(args.temperature, args.top_k, args.top_p)
    return {"temperature": args.temperature, "top_k": args.top_k, "top_p": args.top_p, "seed": args.seed}


def cmd_sample(args) -> int:
    from lilllm.chat import stop_ids
    from lilllm.checkpoint import load_model
    from lilllm.sampling import encode_prompt, generate, stream

    options = _sampling_options(args)
    model, tokenizer, _ = load_model(args.checkpoint, args.device)
    prompt = encode_prompt(tokenizer, args.prompt)
    options["stop_ids"] = stop_ids(tokenizer)
    # The prompt first, dimmed on a terminal (plain when piped), then what the model adds to it.
    print(f"\033[2m{args.prompt}\033[0m" if sys.stdout.isatty() else args.prompt, end="", flush=True)
    if args.stream:
        for piece in stream(model, tokenizer, prompt, args.max_new_tokens, **options):
            print(piece, end="", flush=True)
        print()
    else:
        print(tokenizer.decode(generate(model, prompt, args.max_new_tokens, **options)))
    return 0


NOT_CHAT_TUNED = ("note: {checkpoint} is a pretrained model, not chat-tuned: it answers by continuing your message as "
                  "a play, and each reply ends at the end of its speech. For a model that answers, fine-tune one with "
                  "`lilllm sft` and chat with `lilllm chat runs/sft/last.pt --temperature 0`.")
ENDS_CHAT = ("exit", "quit")


def cmd_chat(args) -> int:
    from lilllm.chat import chat_template, stop_ids
    from lilllm.checkpoint import load_model

    options = _sampling_options(args)
    model, tokenizer, state = load_model(args.checkpoint, args.device)
    template_name = args.template or state.get("chat_template", "plain")
    template = chat_template(template_name)
    options["stop_ids"] = stop_ids(tokenizer)
    if "chat_template" not in state:
        print(NOT_CHAT_TUNED.format(checkpoint=args.checkpoint), file=sys.stderr)
    interactive = sys.stdin.isatty()
    if interactive:
        print("type a message and press Enter; Ctrl-C stops a reply; exit, quit or Ctrl-D ends the chat")
    messages = []
    while True:
        if interactive:
            print("you: ", end="", flush=True)
        line = sys.stdin.readline()
        if not line or line.strip().lower() in ENDS_CHAT:  # end of input, or the user said so
            if interactive and not line:
                print()  # Ctrl-D leaves the cursor after "you: "
            return 0
        if not line.strip():
            continue
        messages.append({"role": "user", "content": line.strip()})
        reply = _reply(model, tokenizer, template, messages, args.max_new_tokens, options,
                       until_speech_ends=template_name == "plain")
        if reply is None:
            messages.pop()
        else:
            messages.append({"role": "assistant", "content": reply})


def _reply(model, tokenizer, template, messages, max_new_tokens: int, options: dict, until_speech_ends: bool):
    """Stream the reply to `messages` to the terminal and return it; Ctrl-C stops the reply, not
    the chat. None if the conversation could not be encoded (said on stderr)."""
    from lilllm.sampling import stream, until_blank_line

    try:
        pieces = stream(model, tokenizer, template(tokenizer, messages), max_new_tokens, **options)
    except LilllmError as err:  # e.g. a character the tokenizer lacks: say so, keep chatting
        print(f"error: {err}", file=sys.stderr)
        return None
    if until_speech_ends:
        pieces = until_blank_line(pieces)
    print("assistant: ", end="", flush=True)
    reply = ""
    try:
        for piece in pieces:
            reply += piece
            print(piece, end="", flush=True)
    except KeyboardInterrupt:
        print(" [stopped]", end="")
    print()
    return reply


def cmd_sft(args) -> int:
    from lilllm.chat import load_conversations
    from lilllm.course import pretrained_checkpoint
    from lilllm.next_speaker import chat_dataset
    from lilllm.runtime import shown
    from lilllm.sft import COPY_STEPS, check_finetune, copy_drill_checkpoint, finetune

    init = args.init or pretrained_checkpoint()  # a finished run of the tiny recipe, such as runs/tiny
    print(f"starting from {shown(init)}", flush=True)
    train_file, val_file = args.data, args.val
    if train_file is None:  # the course's chat dataset, built on first use
        files = chat_dataset()
        train_file, val_file = files["train"], val_file or files["val"]
    for path in (train_file, val_file):
        if path is not None:
            load_conversations(path)  # a missing or malformed file fails now, not after the drill
    changes = {name: getattr(args, name) for name in ("steps", "batch_size", "lr", "loss_on", "lora_rank", "lora_alpha",
                                                      "lora_targets", "lora_full") if getattr(args, name) is not None}
    check_finetune(init, **changes)  # so do bad settings (a LoRA target the model lacks)
    copy_steps = COPY_STEPS if args.copy_steps is None else args.copy_steps
    if copy_steps > 0:  # drilled once per starting checkpoint and settings, then reused (--copy-steps 0 skips it)
        init = copy_drill_checkpoint(init, steps=copy_steps, device=args.device)
    result = finetune(init, train_file, val_file, out_dir=args.out, device=args.device, **changes)
    print(f"wrote {result.checkpoint}; talk to it with: lilllm chat {result.checkpoint} --temperature 0")
    return 0


def cmd_export(args) -> int:
    from lilllm.hf import FILES, export, loading_code
    from lilllm.runtime import shown

    out = export(args.checkpoint, args.out_dir, template=args.template)
    print(f"wrote {shown(out)}: {', '.join(FILES)}")
    print(f"load it with transformers: {loading_code(out)}")
    return 0


def cmd_bench_generate(args) -> int:
    from lilllm.bench import (bench_generate, bench_generate_hf, markdown_generate, markdown_generate_hf,
                              print_generate, print_generate_hf)
    from lilllm.runtime import pick_device

    log = lambda message: print(message, file=sys.stderr, flush=True)  # progress, off stdout
    lengths = {"lengths": args.lengths} if args.lengths else {}  # else each benchmark's own
    if args.hf:
        if args.device not in (None, "cpu"):
            raise LilllmError("--hf times lilllm and transformers on the CPU, in fp32: leave --device out")
        result = bench_generate_hf(prompt_len=args.prompt_len, repeats=args.repeats, log=log, **lengths)
        _report(args, result, print_generate_hf, markdown_generate_hf, section="generate-hf")
        return 0
    result = bench_generate(prompt_len=args.prompt_len, device=pick_device(args.device), repeats=args.repeats,
                            log=log, **lengths)
    _report(args, result, print_generate, markdown_generate)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lilllm", description="Build, train, fine-tune and sample a small language model.")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for add in (_add_setup_commands, _add_training_commands, _add_sampling_commands, _add_export_command,
                _add_bench_commands):
        add(commands)
    return parser


def _add_setup_commands(commands) -> None:
    env = commands.add_parser("env", help="check Python, the dependencies, the device and the data")
    env.add_argument("--device", help=DEVICE_HELP)
    env.set_defaults(run=cmd_env)

    prepare = commands.add_parser("prepare", help="train a tokenizer and write the token files of a corpus")
    prepare.add_argument("--tokenizer", choices=("char", "bpe"), default="bpe", help="tokenizer kind (default: bpe)")
    prepare.add_argument("--vocab-size", type=int, help=f"BPE vocabulary size, special tokens included (default: {DEFAULT_VOCAB_SIZE})")
    prepare.add_argument("--input", nargs="+", metavar="FILE",
                         help="local .txt, .jsonl/.json or .parquet files (default: the vendored tiny-shakespeare)")
    prepare.add_argument("--text-field", default="text", help="the field that holds the text in jsonl/parquet rows (default: text)")
    prepare.add_argument("--out", metavar="DIR", help="output folder (default: data/<corpus>-<tokenizer>[-<vocab size>])")
    prepare.set_defaults(run=cmd_prepare)


def _add_bench_commands(commands) -> None:
    bench = commands.add_parser("bench", help="measure speed").add_subparsers(dest="target", required=True, metavar="TARGET")
    bench_tokenizer = bench.add_parser("tokenizer", help="time BPE training and encoding with tokenizers vs tiktoken")
    bench_tokenizer.add_argument("--vocab-size", type=int, default=DEFAULT_VOCAB_SIZE, help=f"(default: {DEFAULT_VOCAB_SIZE})")
    bench_tokenizer.add_argument("--repeats", type=int, default=3, help="time each step this many times, keep the best (default: 3)")
    bench_tokenizer.set_defaults(run=cmd_bench_tokenizer)
    bench_pretrain = bench.add_parser("pretrain", help="nanoGPT's CPU recipe, then the default recipe for the same time")
    bench_pretrain.add_argument("--long", action="store_true", help="also train the `long` recipe (10 minutes)")
    bench_pretrain.add_argument("--steps", type=int, help="shorten the nanoGPT run to this many steps (a quick check)")
    bench_pretrain.add_argument("--device", help=DEVICE_HELP)
    bench_pretrain.set_defaults(run=cmd_bench_pretrain)
    bench_generate = bench.add_parser("generate", help="tokens/s of generation with and without the KV cache, "
                                                       "for the tiny recipe's model and the default config")
    bench_generate.add_argument("--lengths", type=int, nargs="+", metavar="N",
                                help="numbers of new tokens to time (default: 64 256 512 1024; with --hf 64 256 512)")
    bench_generate.add_argument("--prompt-len", type=int, default=16, help="prompt tokens (default: 16)")
    bench_generate.add_argument("--repeats", type=int, default=2, help="time each run this many times, keep the best (default: 2)")
    bench_generate.add_argument("--device", help=DEVICE_HELP)
    bench_generate.add_argument("--hf", action="store_true", help="instead, time one model in lilllm and in Hugging "
                                "Face transformers (exported with lilllm.hf), on the CPU in fp32")
    bench_generate.set_defaults(run=cmd_bench_generate)
    bench_speedrun = bench.add_parser("speedrun", help="the tiny recipe as it was (AdamW, cosine) and each change to it "
                                                       "(Muon, QK-norm, ReLU², ...) for the same training time, over seeds")
    bench_speedrun.add_argument("--seeds", type=int, default=3, help="seeds per change, 0, 1, ... (default: 3)")
    bench_speedrun.add_argument("--budget", type=float, default=100.0, help="seconds of training per run (default: 100)")
    bench_speedrun.add_argument("--save", nargs="?", const="results/speedrun.json", metavar="FILE",
                                help="also write the results as JSON (default file: results/speedrun.json, which "
                                     "chapter 13 reads)")
    bench_speedrun.set_defaults(run=cmd_bench_speedrun)
    for command in (bench_tokenizer, bench_pretrain, bench_generate, bench_speedrun):
        command.add_argument("--markdown", action="store_true", help="print the README's table, with the date and "
                                                                     "the machine, instead of the plain one")
        command.add_argument("--readme", nargs="?", const="README.md", metavar="FILE",
                             help="also write that table into the repository's README.md (or FILE), between the "
                                  "benchmark's <!-- bench NAME --> marker comments")


def _add_training_commands(commands) -> None:
    train = commands.add_parser("train", help="pretrain a model (a recipe, changed with --key=value settings)",
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=_train_settings_help())
    train.add_argument("recipe", nargs="?", default="tiny", help=f"{', '.join(RECIPES)} (default: tiny)")
    train.add_argument("--config", metavar="FILE", help="a JSON file of settings, applied before --key=value ones")
    train.add_argument("--resume", action="store_true", help="continue the run in --out-dir from its last.pt")
    train.set_defaults(run=cmd_train, takes_settings=True)

    evaluate = commands.add_parser("eval", help="score a checkpoint on the val split, in bits per byte")
    evaluate.add_argument("checkpoint", help="a .pt file written by `lilllm train` (e.g. runs/tiny/best.pt)")
    evaluate.add_argument("--device", help=DEVICE_HELP)
    evaluate.set_defaults(run=cmd_eval)

    compare = commands.add_parser("compare", help="several runs in one table and one figure of val bits per byte "
                                                  "against time and steps")
    compare.add_argument("runs", nargs="+", metavar="RUN_DIR", help="folders of `lilllm train` runs (their metrics.jsonl)")
    compare.add_argument("--out", default="compare.png", metavar="FILE.png", help="the figure (default: compare.png)")
    compare.set_defaults(run=cmd_compare)

    sft = commands.add_parser("sft", help="fine-tune a checkpoint on conversations, with the loss on the assistant's tokens")
    sft.add_argument("--init", metavar="CKPT", help="the checkpoint to start from (default: a finished run of the tiny "
                                                    "recipe, such as runs/tiny/best.pt, else one trained once and "
                                                    "cached in runs/pretrained-tiny)")
    sft.add_argument("--data", metavar="FILE.jsonl", help='train conversations, one {"messages": [...]} per line '
                                                          '(default: "who speaks next?" from tiny-shakespeare, built once)')
    sft.add_argument("--val", metavar="FILE.jsonl", help="val conversations for the val loss (default: the built set's, "
                                                         "without --data; else none)")
    sft.add_argument("--copy-steps", type=int, metavar="N", help="steps of the copy drill before fine-tuning, 0 for "
                                                                 f"none (default: {CopyDrill.steps}; drilled once per "
                                                                 "checkpoint and settings, cached in runs/copy-drill-*)")
    sft.add_argument("--steps", type=int, metavar="N", help=f"fine-tuning steps, after the drill (default: {Finetune.steps})")
    sft.add_argument("--batch-size", type=int, metavar="N", help=f"conversations per step (default: {Finetune.batch_size})")
    sft.add_argument("--lr", type=float, metavar="RATE", help=f"peak learning rate (default: {Finetune.lr})")
    sft.add_argument("--loss-on", choices=("assistant", "all"),
                     help=f"assistant: the SFT loss; all: every token, an ablation (default: {Finetune.loss_on})")
    sft.add_argument("--lora-rank", type=int, metavar="R", help="train only rank-R LoRA adapters, the model frozen; "
                                                              "out/adapter.pt keeps them, out/last.pt has them merged "
                                                              "(default: full fine-tuning)")
    sft.add_argument("--lora-alpha", type=float, metavar="A", help="LoRA's alpha: the adapters' output is scaled by A/R "
                                                                 "(default: R, a scale of 1)")
    sft.add_argument("--lora-targets", metavar="NAMES", help="the projections LoRA adapts, comma-separated, among "
                                                             "q_proj, k_proj, v_proj, out_proj, gate, up, down "
                                                             f"(default: {Finetune.lora_targets})")
    sft.add_argument("--lora-full", metavar="NAMES", help="modules that train in full beside the adapters, such as "
                                                          "tok_emb (the embedding: the chat tokens are new to a "
                                                          "pretrained model) (default: none)")
    sft.add_argument("--out", default="runs/sft", metavar="DIR", help="output folder, overwritten (default: runs/sft)")
    sft.add_argument("--device", help=DEVICE_HELP)
    sft.set_defaults(run=cmd_sft)


def _train_settings_help() -> str:
    """`lilllm train --help`'s list of settings, read from TrainConfig and ModelConfig (their
    fields, the tiny recipe's values and the fields' comments), then what the other recipes change."""
    from lilllm.settings import dashed, settings_help, spelt
    from lilllm.train import TrainConfig

    tiny = TrainConfig()
    changes = [f"  {name}: " + " ".join(f"--{dashed(key)}={spelt(value)}" for key, value in recipe.items())
               for name, recipe in RECIPES.items() if recipe]
    return "\n".join([
        "settings, as --key=value (default: the tiny recipe's value):", settings_help(tiny), "",
        "model settings, as --model.key=value (default: the tiny recipe's model):",
        settings_help(tiny.model_config(tiny.vocab_size), prefix="model.", skip=("vocab_size",)), "",
        "the other recipes change:", *changes, "",
        "Run under `torchrun --nproc_per_node=N` for several processes."])


def _add_sampling_commands(commands) -> None:
    def add_sampling_options(command):
        command.add_argument("checkpoint", help="a .pt file written by `lilllm train` (e.g. runs/tiny/best.pt)")
        command.add_argument("--max-new-tokens", type=int, default=200, help="the most tokens to generate (default: 200)")
        command.add_argument("--temperature", type=float, default=1.0, help="0: greedy; <1 sharper, >1 flatter (default: 1)")
        command.add_argument("--top-k", type=int, default=0, help="keep the k most likely tokens; 0: off (default)")
        command.add_argument("--top-p", type=float, default=1.0, help="keep the nucleus of mass p; 1: off (default)")
        command.add_argument("--seed", type=int, help="make the sampling reproducible")
        command.add_argument("--device", help=DEVICE_HELP)

    sample = commands.add_parser("sample", help="continue a prompt with a trained model")
    add_sampling_options(sample)
    sample.add_argument("--prompt", required=True, help="the text to continue")
    sample.add_argument("--stream", action="store_true", help="print the text as it is generated")
    sample.set_defaults(run=cmd_sample)

    chat = commands.add_parser("chat", help="talk with a model, one line per message (stdin may be piped)")
    add_sampling_options(chat)
    chat.add_argument("--template", help="chat template by name (default: the checkpoint's, else plain)")
    chat.set_defaults(run=cmd_chat)


def _add_export_command(commands) -> None:
    export = commands.add_parser("export", help="write a checkpoint as a Hugging Face folder (Llama or GPT-2) "
                                                "that transformers loads")
    export.add_argument("checkpoint", help="a .pt file written by `lilllm train` or `lilllm sft`")
    export.add_argument("out_dir", help="the folder to write (config.json, model.safetensors, tokenizer files)")
    export.add_argument("--template", help="chat template by name (default: the checkpoint's, else plain)")
    export.set_defaults(run=cmd_export)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, settings = parser.parse_known_args(argv)  # --key=value settings are the train command's
    if settings and not getattr(args, "takes_settings", False):
        parser.error(f"unrecognized arguments: {' '.join(settings)}")
    args.settings = settings
    args.command_line = shlex.join(["lilllm", *(sys.argv[1:] if argv is None else argv)])  # as typed: resume, bench
    try:
        return args.run(args)
    except LilllmError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("\ninterrupted", file=sys.stderr)  # after the ^C the terminal echoed
        return 130


if __name__ == "__main__":
    sys.exit(main())
