"""The ``unimoe`` command line. Each subcommand is a thin wrapper over the library; heavy imports happen inside
the handlers so ``unimoe --help`` is fast. Errors a user can cause print one line to stderr and exit 2."""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

from unimoe.errors import ConfigError, UniMoEError

ERRORS_ENV = "UNIMOE_TORCHRUN_ERRORS"  # set by ``unimoe train --nproc N`` for its processes (see ``_torchrun``)

Handler = Callable[[argparse.Namespace], int | None]


def _int_list(text: str) -> list[int]:
    try:
        return [int(x) for x in text.split(",") if x.strip()]
    except ValueError as err:
        raise argparse.ArgumentTypeError(f"expected comma-separated layer indices, got {text!r}") from err


# ----------------------------------------------------------------------------- handlers
def cmd_info(args: argparse.Namespace) -> int:
    from unimoe.presets import list_presets

    if args.model is None:
        print("model presets: " + ", ".join(list_presets()))
        return 0
    import torch

    from unimoe.moe import count_parameters

    if Path(args.model).is_dir():
        from transformers import AutoConfig

        if args.overrides:
            raise ConfigError(f"info {args.model}: key=value overrides apply to presets, not to a saved checkpoint")

        import unimoe  # noqa: F401
        from unimoe.configuration_unimoe import UniMoEConfig
        from unimoe.errors import CheckpointError
        from unimoe.hub import check_checkpoint_dir
        from unimoe.modeling_unimoe import UniMoEForConditionalGeneration

        check_checkpoint_dir(args.model)  # config.json and readable safetensors headers
        try:
            config = AutoConfig.from_pretrained(args.model)
        except (OSError, ValueError) as err:  # invalid JSON, an unknown model_type
            raise CheckpointError(f"{args.model}/config.json: {str(err).strip().splitlines()[0]}") from None
        if not isinstance(config, UniMoEConfig):
            raise CheckpointError(
                f"{args.model} is a {config.model_type} checkpoint, not a UniMoE one "
                "(`unimoe upcycle` turns a dense Qwen2/Llama checkpoint into one)"
            )
        with torch.device("meta"):
            model = UniMoEForConditionalGeneration(config)
    else:
        from unimoe.presets import build_model, parse_cli_overrides

        model = build_model(args.model, parse_cli_overrides(args.overrides), device="meta")
    cfg = model.config
    counts = count_parameters(model)
    moe = cfg.moe_config
    print(f"model: {args.model} ({cfg.text_config.model_type} decoder)")
    tc = cfg.text_config
    print(f"layers: {tc.num_hidden_layers}, hidden: {tc.hidden_size}, MoE layers: {cfg.moe_layer_indices()}")
    print(
        f"experts: {moe.num_experts} x {moe.expert_type}, {moe.routing} (k<={moe.top_k}), "
        f"null: {moe.num_null_experts}, shared: {moe.num_shared_experts}"
    )
    print(f"parameters: total {counts['total']:,}, active per token {counts['active']:,}")
    return 0


def cmd_upcycle(args: argparse.Namespace) -> int:
    from unimoe.presets import parse_cli_overrides
    from unimoe.upcycle import upcycle_checkpoint

    extra = {k.removeprefix("moe."): v for k, v in parse_cli_overrides(args.set).items()}
    if args.lora_rank is not None:
        extra["lora_rank"] = args.lora_rank
        extra.setdefault("lora_alpha", 2 * args.lora_rank)
    out = upcycle_checkpoint(
        args.src,
        args.out,
        num_experts=args.num_experts,
        top_k=args.top_k,
        expert_type=args.expert_type,
        num_shared_experts=args.shared_experts,
        moe_layers=args.moe_layers,
        moe_layer_freq=args.moe_layer_freq,
        dtype=args.dtype,
        **extra,
    )
    print(f"wrote {out}")
    return 0


def cmd_push(args: argparse.Namespace) -> int:
    from unimoe.hub import push_to_hub

    url = push_to_hub(args.dir, args.repo_id, private=args.private)
    print(url)
    return 0


def cmd_init(args: argparse.Namespace) -> int:
    from unimoe.inference import init_checkpoint
    from unimoe.presets import parse_cli_overrides

    _quiet_transformers()
    out = init_checkpoint(
        args.preset, args.out, parse_cli_overrides(args.overrides), tokenizer_path=args.tokenizer, seed=args.seed
    )
    print(f"wrote {out}")
    return 0


def _close_progress_bars() -> None:
    """A progress bar left open by the failure would share its line with the error message."""
    from tqdm import tqdm

    for bar in list(getattr(tqdm, "_instances", ())):
        bar.close()


def _quiet_transformers() -> None:
    """No weight-loading progress bars or advisory warnings: a CLI answer (or its one error line) stays readable."""
    from transformers.utils import logging

    logging.disable_progress_bar()
    logging.set_verbosity_error()
    # accelerate's save_state warns at every training checkpoint that the tied lm_head was not written twice; the
    # tie is restored on load (resumed runs are checked bitwise-equal in tests/train/test_stages.py)
    import logging as std_logging

    std_logging.getLogger("accelerate.utils.other").setLevel(std_logging.ERROR)


def cmd_chat(args: argparse.Namespace) -> int:
    from unimoe.inference import load_pretrained, respond

    if args.output and args.save_dir is None:
        raise ConfigError(f"--output {args.output}: pass --save-dir DIR to write what is generated")
    _quiet_transformers()
    model, processor = load_pretrained(args.model, device=args.device)
    modalities = [args.modality] if args.modality else None
    if not args.modality and args.file:  # guessed once here; a .npy is a point cloud or a series by its contents
        from unimoe.processing_unimoe import guess_modality

        modalities = [guess_modality(path, getattr(processor, "modalities", None)) for path in args.file]
        for path, read_as in zip(args.file, modalities):
            if Path(path).suffix.lower() == ".npy":
                print(f"({path}: read as {read_as}; --modality to change)", file=sys.stderr)
    reply = respond(
        model,
        processor,
        args.prompt,
        args.file,
        modalities=modalities,
        output=args.output,
        max_new_tokens=args.max_new_tokens,
        temperature=args.temperature,
        seed=args.seed,
        num_inference_steps=args.steps,
        guidance_scale=args.guidance,
    )
    made = len(reply.images) + len(reply.audio) + len(reply.forecasts)
    if reply.text:
        print(reply.text)
    elif not made:
        print("(the model returned no text)")
    if made and args.save_dir is None:
        print(f"(generated {made} media item(s); pass --save-dir DIR to write them)")
    elif made:
        for path in reply.save(args.save_dir):
            print(path)
    return 0


def cmd_data_build(args: argparse.Namespace) -> int:
    from unimoe.data.build import build_suite, check_task_names

    tasks = list(dict.fromkeys(t for item in args.tasks for t in item.split(",") if t)) if args.tasks else None
    if tasks:
        check_task_names(tasks)
    cards = build_suite(args.out, tasks, seed=args.seed, force=args.force)
    print(f"{len(cards)} task(s) in {args.out} (see {args.out}/DATASETS.md)")
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    from unimoe.eval import evaluate, resolve_tasks
    from unimoe.eval.report import picture_files, results_table
    from unimoe.inference import load_pretrained

    _quiet_transformers()
    tasks = resolve_tasks(args.tasks, reader_split=args.split)
    if args.split is not None and not any(t.reader for t in tasks):
        raise ConfigError("--split applies to READER:PATH tasks; built-in tasks are scored on their test split")
    model, processor = load_pretrained(args.model, device=args.device)
    summary = evaluate(
        model,
        processor,
        tasks,
        out_dir=args.out,
        data_root=args.data,
        batch_size=args.batch_size,
        limit=args.limit,
        model_name=str(args.model),
    )
    print(results_table(summary))
    pictures = picture_files(summary)
    if pictures:
        print("pictures: " + ", ".join(f"{args.out}/{name}" for name in pictures))
    print(f"wrote {args.out}/results.json")
    return 0


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _torchrun(nproc: int, argv: list[str]) -> int:
    """Run ``unimoe ARGV`` in ``nproc`` processes with torchrun's launcher, in this process. A failed process's
    one-line error is printed once however many processes hit it (a checkpoint that none of them can load): the
    processes leave their lines in a folder of this launch (``ERRORS_ENV``) and this process prints each distinct
    one. torchrun's agent logs and ``ChildFailedError`` traceback are replaced by one line with the first failure's
    exit status (2 for a bad input, as in one process) or the signal that killed it (a process killed by the
    kernel, e.g. for memory, prints nothing itself). Ctrl-C stops every process and exits 130, as in one process.
    Without ``OMP_NUM_THREADS`` each process gets an equal share of the cores (torchrun would set 1 and print a
    warning about it)."""
    import logging
    import signal
    import tempfile

    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import get_args_parser, run

    launch = get_args_parser().parse_args(["--nproc_per_node", str(nproc), "--master_addr", "127.0.0.1",
                                           "--master_port", str(_free_port()), "-m", "unimoe.cli", *argv])  # fmt: skip
    logging.getLogger("torch.distributed.elastic").setLevel(logging.CRITICAL)
    os.environ.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // nproc)))
    with tempfile.TemporaryDirectory(prefix="unimoe-errors-") as errors:
        os.environ[ERRORS_ENV] = errors  # the processes inherit it
        try:
            run(launch)
        except ChildFailedError as err:
            rank, first = err.get_first_failure()
            ranks = ", ".join(str(r) for r in sorted(err.failures))
            lines = [f.read_text().strip() for f in sorted(Path(errors).glob("rank-*.txt"), key=_rank_of)]
            for line in dict.fromkeys(line for line in lines if line):  # distinct, in rank order
                print(line, file=sys.stderr)
            if first.exitcode > 0:
                code, how = first.exitcode, f"exit status {first.exitcode}; see above"
            else:  # killed by a signal: the process had no chance to say why
                code, how = 1, f"process {rank} killed by {first.signal_name()}, e.g. out of memory"
            print(f"unimoe {argv[0]}: process(es) {ranks} of {nproc} failed ({how})", file=sys.stderr)
            return code
        except SignalException as err:  # torchrun's handlers turn Ctrl-C / SIGTERM into this, after stopping workers
            print(f"unimoe {argv[0]}: interrupted", file=sys.stderr)
            return 130 if err.sigval == signal.SIGINT else 128 + int(err.sigval)
        finally:
            os.environ.pop(ERRORS_ENV, None)
    return 0


def _rank_of(path: Path) -> int:
    return int(path.stem.removeprefix("rank-"))


def cmd_train(args: argparse.Namespace) -> int:
    from unimoe.presets import parse_cli_overrides
    from unimoe.train import load_stage, train_stage

    stage = load_stage(args.config, parse_cli_overrides(args.overrides))  # validate before launching
    if args.nproc > 1:
        from unimoe.train.loop import check_before_launch

        check_before_launch(stage, init=args.init, data_root=args.data, nproc=args.nproc)  # once, not per process
        argv = [a for a in sys.argv[1:] if not a.startswith("--nproc")]
        if "--nproc" in sys.argv[1:]:
            i = sys.argv[1:].index("--nproc")
            argv = sys.argv[1 : i + 1] + sys.argv[i + 3 :]
        return _torchrun(args.nproc, argv)
    _quiet_transformers()
    result = train_stage(stage, init=args.init, out_dir=args.out, data_root=args.data, resume=args.resume)
    if os.environ.get("RANK", "0") != "0":  # under torchrun every process returns here; one summary line is enough
        return 0
    print(f"stage {result.name}: {result.steps} steps, loss {result.final_loss:.4f}, "
          f"{result.tokens_per_second:.0f} tokens/s -> {result.checkpoint or args.out}")  # fmt: skip
    return 0


def cmd_run(args: argparse.Namespace) -> int:
    from unimoe.presets import parse_cli_overrides
    from unimoe.train import load_recipe, run_recipe

    _quiet_transformers()
    recipe = load_recipe(args.recipe, parse_cli_overrides(args.overrides))
    run_recipe(recipe, args.out, data_root=args.data, resume=args.resume)
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from unimoe.demo import launch

    _quiet_transformers()
    launch(args.model, host=args.host, port=args.port, share=args.share, device=args.device)
    return 0


def cmd_smoke(args: argparse.Namespace) -> int:
    from unimoe.smoke import run_smoke

    run_smoke(args.out, steps=args.steps, seed=args.seed)
    return 0


# ----------------------------------------------------------------------------- parser
def _positive_int(text: str) -> int:
    """argparse type: an integer >= 1 (a batch size, a count of steps or examples)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def _non_negative_float(text: str) -> float:
    """argparse type: a number >= 0 (a sampling temperature; 0 = greedy)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number >= 0, got {text!r}") from None
    if not value >= 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {text}")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="unimoe", description="Unified multimodal Mixture-of-Experts LLMs.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("info", help="show a preset's or checkpoint's architecture and parameter counts")
    p.add_argument("model", nargs="?", help="preset name, preset YAML or checkpoint directory (none: list presets)")
    p.add_argument("overrides", nargs="*", help="key=value overrides, e.g. moe.num_experts=16")
    p.set_defaults(func=cmd_info)

    p = sub.add_parser("upcycle", help="turn a local dense Qwen2/Qwen3/Llama checkpoint into a UniMoE checkpoint")
    p.add_argument("src", help="dense checkpoint directory (safetensors)")
    p.add_argument("out", help="output directory")
    p.add_argument("--num-experts", type=int, required=True)
    p.add_argument("--top-k", type=int, required=True)
    p.add_argument("--expert-type", choices=["lora", "ffn"], default="ffn")
    p.add_argument("--shared-experts", type=int, default=0)
    p.add_argument("--moe-layers", type=_int_list, default=None, help="comma-separated layer indices (default: all)")
    p.add_argument("--moe-layer-freq", type=_positive_int, default=1, help="MoE on every n-th layer")
    p.add_argument("--lora-rank", type=_positive_int, default=None)
    p.add_argument("--dtype", default="float32")
    p.add_argument("--set", nargs="*", default=[], metavar="moe.KEY=VALUE", help="other MoE settings")
    p.set_defaults(func=cmd_upcycle)

    p = sub.add_parser("push", help="upload a checkpoint directory to the Hugging Face Hub")
    p.add_argument("dir", help="a checkpoint directory (config.json + safetensors)")
    p.add_argument("repo_id", help="the Hub repository, e.g. me/unimoe-tiny (created if missing)")
    p.add_argument("--private", action="store_true", help="create the repository as private")
    p.set_defaults(func=cmd_push)

    p = sub.add_parser("init", help="write a randomly initialized checkpoint of a preset (model, processor, tokenizer)")
    p.add_argument("preset", help="preset name or YAML file")
    p.add_argument("out", help="output directory")
    p.add_argument("overrides", nargs="*", help="key=value overrides")
    p.add_argument("--tokenizer", default=None, help="tokenizer directory (presets without a built-in tokenizer)")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=cmd_init)

    p = sub.add_parser("chat", help="answer one prompt with optional media files")
    p.add_argument("model", help="checkpoint directory or Hub id")
    p.add_argument("prompt")
    p.add_argument("--file", action="append", default=[], help="a media file (repeatable)")
    p.add_argument("--modality", default=None, help="override the modality guessed from the file suffix")
    p.add_argument("--max-new-tokens", type=_positive_int, default=64)
    p.add_argument("--temperature", type=_non_negative_float, default=0.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--save-dir", default=None, help="write generated images / audio / forecasts here")
    p.add_argument("--output", choices=["image", "audio", "series"], default=None,
                   help="ask for this medium instead of letting the model decide")  # fmt: skip
    p.add_argument("--steps", type=_positive_int, default=None, help="diffusion sampling steps (default: the head's)")
    p.add_argument("--guidance", type=float, default=None, help="classifier-free guidance scale (1 = none)")
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto (the GPU if there is one; default)")
    p.set_defaults(func=cmd_chat)

    p = sub.add_parser("data", help="build the offline benchmark suite")
    data_sub = p.add_subparsers(dest="data_command", required=True, metavar="ACTION")
    b = data_sub.add_parser("build", help="build tasks (deterministic, offline; re-running is a no-op)")
    b.add_argument("--out", default="data", help="output directory (default: ./data)")
    b.add_argument("--tasks", nargs="*", default=None, help="task names (default: all)")
    b.add_argument("--force", action="store_true", help="rebuild even if complete")
    b.add_argument("--seed", type=int, default=0)
    b.set_defaults(func=cmd_data_build)

    p = sub.add_parser("eval", help="evaluate a checkpoint on tasks or suites")
    p.add_argument("model", help="checkpoint directory or Hub id")
    p.add_argument("--tasks", required=True, help="comma-separated tasks / suites (all, tiny, ...) or READER:PATH")
    p.add_argument("--out", required=True, help="output directory for results.json, samples_*.jsonl, reports")
    p.add_argument("--data", default="data", help="directory of the built suite (default: ./data)")
    p.add_argument("--batch-size", type=_positive_int, default=8)
    p.add_argument("--limit", type=_positive_int, default=None, help="at most N examples per task")
    p.add_argument("--split", default=None, help="split for READER:PATH tasks (default: the reader's own)")
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto (the GPU if there is one; default)")
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("train", help="run one training stage")
    p.add_argument("config", help="stage preset (align, specialize, tune) or YAML file")
    p.add_argument("overrides", nargs="*", help="key=value overrides, e.g. steps=100 data.tasks=[digits_cls]")
    p.add_argument("--init", required=True, help="checkpoint to start from (e.g. one written by `unimoe init`)")
    p.add_argument("--out", required=True, help="stage output directory (checkpoints/, final/, train_log.jsonl)")
    p.add_argument("--data", default="data", help="directory of the built suite")
    p.add_argument("--resume", action="store_true", help="continue from the last checkpoint in --out")
    p.add_argument("--nproc", type=_positive_int, default=1, help="processes (torchrun; gloo on CPU)")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("run", help="run a whole recipe: data, stages, evaluation, final checkpoint")
    p.add_argument("recipe", help="recipe preset (tiny, dense, tiny_fg: configs/recipes/) or YAML file")
    p.add_argument("overrides", nargs="*", help="key=value overrides of the recipe")
    p.add_argument("--out", required=True)
    p.add_argument("--data", default="data", help="directory of the built suite (built if missing)")
    p.add_argument("--resume", action="store_true")
    p.set_defaults(func=cmd_run)

    p = sub.add_parser("demo", help="serve the Gradio demo: multimodal chat, generated media, expert routing panel")
    p.add_argument("model", nargs="?", default=None, help="checkpoint folder or Hub id (default: runs/tiny/final)")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (0.0.0.0: the whole network)")
    p.add_argument("--port", type=int, default=None, help="port (default: gradio's, 7860 or the next free one)")
    p.add_argument("--share", action="store_true", help="also open a public gradio.live link")
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto (the GPU if there is one; default)")
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser("smoke", help="in seconds: build, briefly train, save and reload the tiny model")
    p.add_argument("--out", default="runs/smoke", help="output directory (default: runs/smoke)")
    p.add_argument("--steps", type=_positive_int, default=30, help="training steps (default: 30)")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=cmd_smoke)
    return parser


def _report_error(line: str) -> None:
    """Print a one-line error; a process started by ``unimoe train --nproc N`` leaves it for the launcher instead,
    which prints each distinct line once."""
    _close_progress_bars()
    errors, rank = os.environ.get(ERRORS_ENV), os.environ.get("RANK")
    if errors and rank is not None and Path(errors).is_dir():
        (Path(errors) / f"rank-{int(rank)}.txt").write_text(line + "\n")
        return
    print(line, file=sys.stderr)


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    # key=value overrides may come after options (argparse stops collecting positionals at the first option)
    overrides = [e for e in extra if "=" in e and not e.startswith("-")]
    if overrides and hasattr(args, "overrides"):
        args.overrides = list(args.overrides) + overrides
        extra = [e for e in extra if e not in overrides]
    if extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    try:
        return int(args.func(args) or 0)
    except UniMoEError as err:
        _report_error(f"unimoe {args.command}: error: {err}")
        return 2
    except (FileExistsError, NotADirectoryError, IsADirectoryError, PermissionError) as err:
        # an output path that is a file, a file where a folder is needed, no write access: the path is the message
        problem = "exists and is not a directory" if isinstance(err, FileExistsError) else err.strerror or str(err)
        where = f"{err.filename}: " if err.filename else ""
        _report_error(f"unimoe {args.command}: error: {where}{problem}")
        return 2
    except KeyboardInterrupt:
        print(f"unimoe {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
