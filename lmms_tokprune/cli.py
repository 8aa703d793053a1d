"""The `lmms-tokprune` command."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import List, Optional


def _demo(args: argparse.Namespace) -> int:
    from .demo import format_table, rows_as_json, run_demo

    methods = [m.strip() for m in args.methods.split(",") if m.strip()] if args.methods else None
    try:
        budgets = [int(b) for b in str(args.budget).split(",") if b.strip()]
    except ValueError:
        raise SystemExit(f"--budget: expected visual-token counts separated by commas, got {args.budget!r}")
    def progress(line: str) -> None:
        print(line, file=sys.stderr, flush=True)

    if args.video:
        from .demo.video import NOISE_NOTE, run_video_demo

        print(NOISE_NOTE, file=sys.stderr if args.json else sys.stdout, flush=True)
        budgets = [int(b) for b in str(args.budget if args.budget != "128,32" else "256").split(",") if b.strip()]
        rows = run_video_demo(args.pretrained, methods, budgets, args.batch_size, args.limit or None, progress=None if args.json else progress,
                              verbose=args.verbose)
        print(json.dumps(rows_as_json(rows)) if args.json else format_table(rows))
        return 0
    rows = run_demo(args.pretrained, methods, budgets, args.batch_size, args.limit or None, text_encoder=args.text_encoder,
                    progress=None if args.json else progress, verbose=args.verbose)
    if args.json:
        print(json.dumps(rows_as_json(rows)))
    else:
        print(format_table(rows))
    return 0


def _count(text: str) -> float:
    """A token count: an int when integral (means from runs may be fractional)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    return int(value) if value.is_integer() else value


def _int_list(text: Optional[str], what: str) -> Optional[List[float]]:
    if not text:
        return None
    try:
        return [_count(x) for x in text.replace(" ", "").split(",") if x]
    except argparse.ArgumentTypeError:
        raise ValueError(f"{what} must be comma-separated numbers, got {text!r}") from None


def _vision_blocks(text: str):
    """--vision-blocks: 'feature', 'all' or a block count."""
    if text in ("feature", "all"):
        return text
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be 'feature', 'all' or a block count, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be 'feature', 'all' or a block count >= 1, got {value}")
    return value


def _flops(args: argparse.Namespace) -> int:
    from .efficiency.flops import flops_report, vision_blocks_for

    source = args.pretrained or args.preset
    blocks = vision_blocks_for(args.method, args.vision_blocks)
    report = flops_report(source, args.visual_tokens, args.text_tokens,
                          layer_seq_lens=_int_list(args.layer_seq_lens, "--layer-seq-lens"),
                          vision_block_tokens=_int_list(args.vision_block_tokens, "--vision-block-tokens"), images=args.images,
                          vision_blocks=blocks, units=args.units, layout_tokens=args.layout_tokens)
    if args.json:
        print(json.dumps(report))
        return 0
    layout = f" + {args.layout_tokens} layout" if args.layout_tokens else ""
    print(f"model {report['model']}: {args.visual_tokens} visual{layout} + {args.text_tokens} text tokens = sequence {report['sequence_length']}")
    rows = [
        ("LLM prefill (paper convention)", report["prefill_tflops"]),
        (f"CLIP vision tower ({report['units']} unit(s) x {report['vision_blocks']} blocks)", report["vision_tflops"]),
        ("projector", report["projector_tflops"]),
        ("total prefill", report["total_prefill_tflops"]),
        ("decode, per generated token", report["decode_tflops_per_token"]),
    ]
    for label, value in rows:
        print(f"  {label:<46} {value:12.6g} TFLOPs")
    print(f"  ({report['convention']})")
    return 0


def _sweep(args: argparse.Namespace) -> int:
    from .sweep import outcomes_as_json, sweep_main

    code, outcomes = sweep_main(args.file, overrides=args.set or [], pretrained=args.pretrained, output_dir=args.output_dir,
                                limit=args.limit, only=args.only, dry_run=args.dry_run, leaderboard=args.leaderboard,
                                shard=args.shard, list_only=args.list)
    if args.json:
        print(json.dumps({"runs": outcomes_as_json(outcomes), "failed": code != 0}))
    return code


def _leaderboard(args: argparse.Namespace) -> int:
    """Read and check everything, then write: a bad input leaves nothing half-written."""
    from .report.leaderboard import build_rows, parse_metric_overrides, render, write_outputs
    from .report.regression import check_rows, load_baseline, write_baseline

    if args.check and args.write_baseline:
        raise ValueError("--check and --write-baseline: use one (check against the old baseline first, then write the new one)")
    if args.tolerance is not None and not args.check:
        raise ValueError("--tolerance applies to --check only")
    baseline = load_baseline(args.check) if args.check else None
    warnings: list = []
    rows, has_baseline = build_rows(args.runs, parse_metric_overrides(args.metric), args.baseline, warnings)
    report = check_rows(rows, baseline, 0.01 if args.tolerance is None else args.tolerance, str(args.check)) if baseline else None
    files = render(rows, has_baseline, warnings, report.markdown() if report else "")
    written = write_outputs(args.out, files)
    for warning in warnings:
        print(f"lmms-tokprune: warning: {warning}", file=sys.stderr)
    print(files["table"])
    print("wrote " + ", ".join(str(p) for p in written.values()))
    if args.write_baseline:
        unjudged = sum(len(r.not_judged) for r in rows)
        print(f"wrote baseline {write_baseline(rows, args.write_baseline)} ({len(rows)} runs)"
              + (f"; {unjudged} column(s) not judged, recorded as such: --check against it refuses them" if unjudged else ""))
    if report is not None:
        print("\n".join(report.lines()))
        return 1 if report.failed else 0
    return 0


def _method_params(items: List[str], methods: List[str]) -> dict:
    """--param topk_cls:budget=58 --param prumerge:ratio=0.1 -> {method: {key: value}} (values coerced later).

    A parameter for a method that is not in --methods would be ignored: it is an error instead."""
    out: dict = {}
    for item in items or []:
        method, sep, assignment = item.partition(":")
        key, eq, value = assignment.partition("=")
        if not sep or not eq:
            raise ValueError(f"--param {item!r} must look like METHOD:KEY=VALUE")
        if method not in methods:
            raise ValueError(f"--param {item!r} is for method {method!r}, which is not in --methods ({', '.join(methods)})")
        out.setdefault(method, {})[key] = value
    return out


def _at_least(minimum: int):
    """argparse type: an integer >= minimum (one clear error line, before any work)."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be an integer >= {minimum}, got {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be an integer >= {minimum}, got {value}")
        return value
    parse.__name__ = f"integer >= {minimum}"
    return parse


def _budgets(text: str) -> List[int]:
    """--budget: one visual-token count, or several separated by commas (each compressed method runs at each)."""
    values = [_at_least(1)(x) for x in text.replace(" ", "").split(",") if x]  # "must be an integer >= 1, got 0"
    if not values:
        raise argparse.ArgumentTypeError(f"must be an integer >= 1 (or several separated by commas), got {text!r}")
    return values


def _image_size(text: str):
    """--image-size WIDTHxHEIGHT."""
    width, sep, height = text.lower().partition("x")
    try:
        size = (int(width), int(height))
    except ValueError:
        size = None
    if not sep or size is None or min(size) < 1:
        raise argparse.ArgumentTypeError(f"must look like 640x480 (width x height in pixels), got {text!r}")
    return size


def _bench(args: argparse.Namespace) -> int:
    from .bench.llava_bench import format_rows, rows_as_json, run_bench

    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    params = _method_params(args.param, methods)
    if args.compress_only:
        from .bench.compress_bench import compress_rows_as_json, format_compress_rows, run_compress_bench

        if args.budget is not None:
            if len(args.budget) > 1:
                raise ValueError("--compress-only takes one --budget")
            for m in methods:
                if m != "none":
                    params.setdefault(m, {}).setdefault("budget", args.budget[0])
        rows_c = run_compress_bench(methods, args.variants.split(","), batch=args.batch, repeats=args.repeats * 5, device=args.device, method_params=params)
        print(json.dumps(compress_rows_as_json(rows_c)) if args.json else format_compress_rows(rows_c))
        return 0
    rows = run_bench(args.preset, methods, llm_layers=args.llm_layers, images=args.images, text_tokens=args.text_tokens,
                     repeats=args.repeats, device=args.device, dtype=args.dtype, method_params=params, progress=not args.json,
                     llm_width=args.llm_width, budgets=args.budget or [None], image_size=args.image_size, vision_layers=args.vision_layers)
    print(json.dumps(rows_as_json(rows)) if args.json else format_rows(rows))
    return 0


def _visualize(args: argparse.Namespace) -> int:
    from .report.token_map import visualize

    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    paths = visualize(args.pretrained, args.image, args.question, methods,
                      args.out, params=_method_params(args.param, methods), text_encoder=args.text_encoder, variant=args.variant)
    for path in paths:
        print(path)
    return 0


def _train_demo(args: argparse.Namespace) -> int:
    from .paths import import_recipe

    Sizes = import_recipe("recipes.demo_checkpoint.common").Sizes
    recipe_module = import_recipe("recipes.demo_checkpoint.recipe")
    Recipe, train_demo = recipe_module.Recipe, recipe_module.train_demo

    def given(**names: str) -> dict:  # options left at None keep the recipe's defaults (one place for them)
        return {field: getattr(args, opt) for field, opt in names.items() if getattr(args, opt) is not None}

    sizes = Sizes(**given(llm_width="llm_width", llm_layers="llm_layers", llm_heads="llm_heads", llm_intermediate="llm_intermediate"))
    recipe = Recipe(sizes=sizes, **given(clip_steps="clip_steps", clip_full_steps="clip_full_steps", clip_batch="clip_batch",
                                         llava_scenes="scenes", llava_val="val", llava_steps="llava_steps",
                                         llava_batch="batch_size", grounding_weight="grounding_weight",
                                         readout_weight="readout_weight", position_alpha="position_alpha",
                                         llava2_steps="llava2_steps", comparison_weight="comparison_weight",
                                         llava3_steps="llava3_steps", query_weight="query_weight", seed="seed"))
    meta = train_demo(args.out, recipe, threads=args.threads, export_dir=args.export)
    print(json.dumps(meta, indent=1))
    return 0


def _eval_demo(args: argparse.Namespace) -> int:
    from .demo.evaluate import evaluate_demo, markdown_table, pareto_plot

    budgets = [int(b) for b in args.budgets.split(",") if b]
    methods = [m for m in args.methods.split(",") if m] if args.methods else None
    result = evaluate_demo(args.pretrained, args.text_encoder, methods, budgets, subset=args.subset, batch_size=args.batch_size,
                           progress=lambda line: print(line, file=sys.stderr, flush=True))
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1) + "\n")
    if args.plot:
        pareto_plot(result["full_test"], Path(args.plot))
    print(markdown_table(result["full_test"]))
    print(f"\nsubset ({args.subset} per family, uncompressed): {result['subset_accuracy']:.3f}; written {out}")
    return 0


def _paths(args: argparse.Namespace) -> int:
    from .paths import model_configs_dir, tasks_dir

    if args.tasks:
        print(tasks_dir())
    else:
        print(f"tasks: {tasks_dir()}\nmodel_configs: {model_configs_dir()}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lmms-tokprune", description="Visual-token compression for LLaVA-1.5 in lmms-eval")
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="run the offline demo task with the uncompressed model and the baselines")
    demo.add_argument("--pretrained", default=None, help="checkpoint folder or hub id (default: demo = the shipped checkpoint trained on shapes_vqa)")
    demo.add_argument("--text-encoder", default=None, help="CLIP checkpoint for recover (default with the shipped checkpoint: demo)")
    demo.add_argument("--methods", default=None,
                      help="comma-separated methods (default: none,random,topk_cls,spatial and the registered paper methods)")
    demo.add_argument("--budget", default="128,32", help="visual tokens per image for the compressed methods; a comma list runs each")
    demo.add_argument("--batch-size", type=_at_least(1), default=4)
    demo.add_argument("--limit", type=_at_least(0), default=12, help="the first N questions of each shapes_vqa family (default 12; 0 = all 50)")
    demo.add_argument("--json", action="store_true", help="print JSON instead of a table")
    demo.add_argument("--verbose", action="store_true", help="show lmms-eval's and transformers' progress bars and logs")
    demo.add_argument("--video", action="store_true",
                      help="the Video-LLaVA pipeline on the offline video smoke task (8 clips + 2 images) with a tiny random "
                           "Video-LLaVA unless --pretrained names one: its answers are noise, the pipeline and the counts are shown "
                           "(--budget per video, default 256; --limit documents)")
    demo.set_defaults(func=_demo)

    paths = sub.add_parser("paths", help="where the shipped task YAMLs (for --include_path) and model_configs are")
    paths.add_argument("--tasks", action="store_true", help="print only the tasks folder: --include_path $(lmms-tokprune paths --tasks)")
    paths.set_defaults(func=_paths)

    flops = sub.add_parser("flops", help="analytic FLOPs of LLaVA-1.5 / LLaVA-NeXT prefill/decode for given token counts")
    flops.add_argument("--preset", default="llava-1.5-7b",
                       help="llava-1.5-7b (default), llava-1.5-13b, llava-next-7b (llava-v1.6-vicuna-7b), llava-next-mistral-7b, "
                            "llava-next-13b, video-llava-7b (Video-LLaVA-7B-hf: --units 8 per video), or a hub id of one of them")
    flops.add_argument("--pretrained", default=None, help="a checkpoint folder: read its config.json instead of a preset")
    flops.add_argument("--visual-tokens", type=_count, default=576, help="visual tokens entering the LLM (default 576)")
    flops.add_argument("--text-tokens", type=_count, default=60, help="text tokens of the prompt (default 60, as in the papers' Table 6)")
    flops.add_argument("--layer-seq-lens", default=None, help="comma-separated tokens entering each LLM layer (in-LLM pruning)")
    flops.add_argument("--vision-block-tokens", default=None, help="comma-separated tokens entering each CLIP block (in-CLIP pruning)")
    flops.add_argument("--images", type=_at_least(0), default=None, help="images per prompt (LLaVA-1.5: CLIP runs once per image)")
    flops.add_argument("--units", type=_at_least(0), default=None,
                       help="CLIP passes (LLaVA-NeXT: the base image + each crop, e.g. 5 for one image on a 2x2 grid; LLaVA-1.5: "
                            "= --images; default 1)")
    flops.add_argument("--layout-tokens", type=_count, default=0,
                       help="tokens the LLM gets that are not patches (LLaVA-NeXT's newline tokens: one per kept grid row)")
    flops.add_argument("--vision-blocks", type=_vision_blocks, default=None,
                       help="CLIP blocks that run: 'feature' (default: up to vision_feature_layer, 23 of 24 on LLaVA, as the engine "
                            "runs it), 'all' (a method that reads the last block's q/k or output), or a count")
    flops.add_argument("--method", default=None,
                       help="the method whose CLIP blocks to count: 'all' when it reads the last block (topk_cls, prumerge, recover, "
                            "longtail...), else up to the feature block; --vision-blocks wins")
    flops.add_argument("--json", action="store_true", help="print JSON")
    flops.set_defaults(func=_flops)

    sweep = sub.add_parser("sweep", help="run every configuration of a sweep YAML through lmms-eval (finished runs are skipped)")
    sweep.add_argument("file", help="sweep YAML (see model_configs/sweeps/)")
    sweep.add_argument("--pretrained", default=None, help="checkpoint for every run (= --set model_args.pretrained=...)")
    sweep.add_argument("--set", action="append", metavar="KEY=VALUE",
                       help="override a sweep key, e.g. limit=50, model_args.dtype=float16, runs.NAME.batch_size=4 (repeatable)")
    sweep.add_argument("--output-dir", default=None, help="write the runs here instead of the file's output_dir")
    sweep.add_argument("--limit", type=float, default=None, help="evaluate only the first N documents of each task")
    sweep.add_argument("--only", default=None, help="comma-separated run names to consider")
    sweep.add_argument("--dry-run", action="store_true", help="print the lmms-eval commands without running them")
    sweep.add_argument("--leaderboard", action="store_true", help="write <output_dir>/leaderboard/ when done")
    sweep.add_argument("--shard", default=None, metavar="I/N",
                       help="run only shard I of N (runs I, I+N, I+2N, ... of the file); each of N jobs runs one, `leaderboard` merges them")
    sweep.add_argument("--list", action="store_true", help="print the runs (of the shard) and whether each is finished; run nothing")
    sweep.add_argument("--json", action="store_true", help="also print a JSON summary of the runs")
    sweep.set_defaults(func=_sweep)

    bench = sub.add_parser("bench", help="measured prefill time vs analytic FLOPs per method on a full-width LLaVA-1.5 / LLaVA-NeXT (random weights)")
    bench.add_argument("--preset", default="llava-1.5-7b",
                       help="llava-1.5-7b, llava-1.5-13b, llava-next-7b (llava-v1.6-vicuna-7b), llava-next-mistral-7b, llava-next-13b, "
                            "video-llava-7b (Video-LLaVA-7B-hf: --images videos of 8 frames from the video smoke task)")
    bench.add_argument("--methods", default="none,topk_cls", help="comma-separated methods, the first 'none' is the baseline")
    bench.add_argument("--llm-layers", type=_at_least(1), default=None, help="decoder layers to build (default: all; 2 makes a CPU run feasible)")
    bench.add_argument("--llm-width", type=_at_least(128), default=None,
                       help="narrow the LLM to this width (multiple of 128; heads of 128) so all 32 layers run on a CPU")
    bench.add_argument("--vision-layers", type=_at_least(2), default=None,
                       help="CLIP blocks to build (default 24): fewer make a CPU run of a 5-unit NeXT image faster; the methods and "
                            "the LLM see the same shapes, only 'vision ms' shrinks")
    bench.add_argument("--budget", type=_budgets, default=None,
                       help="visual tokens per image for every compressed method (equivalent tokens for in-LLM ones); a comma list "
                            "runs each method at each budget")
    bench.add_argument("--image-size", type=_image_size, default=None,
                       help="resize the images to WIDTHxHEIGHT (LLaVA-NeXT presets default to 640x480: a 2x2 grid, 5 units)")
    bench.add_argument("--param", action="append", default=[], help="METHOD:KEY=VALUE method parameter (repeatable)")
    bench.add_argument("--images", type=_at_least(1), default=4)
    bench.add_argument("--text-tokens", type=_at_least(0), default=60)
    bench.add_argument("--repeats", type=_at_least(1), default=2, help="timed passes per image after one warm-up")
    bench.add_argument("--device", default=None)
    bench.add_argument("--dtype", default=None, choices=["float32", "float16", "bfloat16"])
    bench.add_argument("--compress-only", action="store_true", help="time only compress() per image on CLIP-L-shaped inputs")
    bench.add_argument("--batch", type=_at_least(1), default=8, help="images per compress() call (--compress-only)")
    bench.add_argument("--variants", default="fixed,reference", help="variants to time (--compress-only)")
    bench.add_argument("--json", action="store_true")
    bench.set_defaults(func=_bench)

    vis = sub.add_parser("visualize", help="a PNG per method showing which patches were kept, recovered and merged")
    vis.add_argument("--pretrained", required=True, help="LLaVA-1.5, LLaVA-NeXT or Video-LLaVA checkpoint (hub id or folder); NeXT maps show "
                     "the base image and the crop mosaic, Video-LLaVA maps of a video its frame strip")
    vis.add_argument("--image", required=True, help="an image, or a video file (Video-LLaVA checkpoints)")
    vis.add_argument("--question", default="", help="the question (text guidance for recover)")
    vis.add_argument("--methods", default="topk_cls,prumerge,prumerge_plus,recover")
    vis.add_argument("--param", action="append", default=[], help="METHOD:KEY=VALUE method parameter (repeatable)")
    vis.add_argument("--variant", default="fixed", choices=["fixed", "reference"])
    vis.add_argument("--text-encoder", default=None, help="CLIP checkpoint for recover")
    vis.add_argument("--out", required=True, help="output folder")
    vis.set_defaults(func=_visualize)

    board = sub.add_parser("leaderboard", help="leaderboard.md/.csv and pareto.png from lmms-eval result folders")
    board.add_argument("runs", nargs="+", help="sweep output folders or run folders (searched for *_results.json)")
    board.add_argument("--out", required=True, help="folder for leaderboard.md / .csv / .json and pareto.png")
    board.add_argument("--metric", action="append", metavar="TASK=METRIC",
                       help="main metric of a task, e.g. pope=pope_f1_score (repeatable)")
    board.add_argument("--baseline", default=None,
                       help="run name of the uncompressed baseline (default: the method=none run on each run's checkpoint)")
    board.add_argument("--check", default=None, metavar="BASELINE.json",
                       help="exit 1 when a run scores worse than this baseline by more than --tolerance, or its token counts changed, "
                            "or runs are missing / new")
    board.add_argument("--tolerance", type=float, default=None,
                       help="allowed score drop as a fraction of the baseline score (default 0.01 = 1%%)")
    board.add_argument("--write-baseline", default=None, metavar="FILE", help="write the runs' scores and counts as a baseline for --check")
    board.set_defaults(func=_leaderboard)

    train = sub.add_parser("train-demo", help="train the shipped demo checkpoint (CLIP pre-training, then projector + LLM) on CPU; "
                                              "runs from a source checkout (recipes/)")
    train.add_argument("--out", default="demo_train", help="work folder (checkpoints, feature cache, train.log, the fp16 exports)")
    train.add_argument("--export", default=None, metavar="DIR",
                       help="also copy the fp16 demo_llava/ and demo_clip/ into DIR (in a checkout: lmms_tokprune/assets, where pretrained=demo finds them)")
    train.add_argument("--threads", type=_at_least(1), default=2)
    # defaults: None = the recipe's value (recipes/demo_checkpoint/recipe.py, the shipped checkpoint's recipe)
    train.add_argument("--seed", type=int, default=None)
    train.add_argument("--clip-steps", type=int, default=None, help="CLIP steps with half the patches (FLIP)")
    train.add_argument("--clip-full-steps", type=int, default=None, help="CLIP steps with all 576 patches, after those")
    train.add_argument("--clip-batch", type=int, default=None)
    train.add_argument("--scenes", type=int, default=None, help="training scenes for the LLaVA stage (features cached once)")
    train.add_argument("--val", type=int, default=None, help="validation scenes (first-turn exact match is logged)")
    train.add_argument("--llava-steps", type=int, default=None, help="projector + LLM steps of --batch-size conversations")
    train.add_argument("--batch-size", type=int, default=None)
    train.add_argument("--grounding-weight", type=float, default=None, help="answer-to-object attention loss (0: answers only)")
    train.add_argument("--readout-weight", type=float, default=None, help="object tokens predict their words (0: off)")
    train.add_argument("--position-alpha", type=float, default=None, help="scale of the 2-D sin-cos grid positions added to the ViT before stage 2")
    train.add_argument("--llava2-steps", type=int, default=None, help="stage-2 steps on the positioned tower, continued from stage 1 (0: no stage 2)")
    train.add_argument("--comparison-weight", type=float, default=None, help="stage 2: relation answers' middle layers say the canonical order (0: off)")
    train.add_argument("--llava3-steps", type=int, default=None, help="stage-3 steps continued from the last stage with the query loss (0: no stage 3)")
    train.add_argument("--query-weight", type=float, default=None, help="stage 3: answer positions say the colour/shape words their question names (0: off)")
    train.add_argument("--llm-width", type=int, default=None)
    train.add_argument("--llm-layers", type=int, default=None)
    train.add_argument("--llm-heads", type=int, default=None)
    train.add_argument("--llm-intermediate", type=int, default=None)
    train.set_defaults(func=_train_demo)

    ev = sub.add_parser("eval-demo", help="accuracy of a demo checkpoint on the whole shapes_vqa test split, every method x budget")
    ev.add_argument("--pretrained", default="demo")
    ev.add_argument("--text-encoder", default="demo", help="CLIP checkpoint for recover")
    ev.add_argument("--methods", default=None, help="comma list (default: the baselines and every paper method)")
    ev.add_argument("--budgets", default="192,128,64,32")
    ev.add_argument("--subset", type=_at_least(1), default=10, help="questions per family of the subset the tests check")
    ev.add_argument("--batch-size", type=_at_least(1), default=8)
    ev.add_argument("--out", default="EVAL.json", help="where to write the JSON (the shipped one lives next to the weights)")
    ev.add_argument("--plot", default=None, help="also write the accuracy-vs-tokens Pareto plot (PNG) here")
    ev.set_defaults(func=_eval_demo)
    return parser


def main(argv: Optional[List[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except ValueError as err:
        print(f"lmms-tokprune: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
