"""``imagen eval clip`` (CLIP score over a prompt suite), ``imagen eval compare`` (two sampling
settings, paired) and ``imagen eval prompts`` (a suite's prompts, one a line): the parsers and
the command functions; the work is in imagen.evaluation (suites, clip, prompt_following,
compare). Parsing imports neither torch nor transformers."""

from __future__ import annotations

import argparse
import shlex
import shutil
import sys
from contextlib import nullcontext
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn

from imagen.cli.common import (
    Parser,
    UsageError,
    add_model_options,
    add_sampling_options,
    check_seeds,
    load_pipeline,
    positive_int,
    sampling_overrides,
    seed,
)
from imagen.utils.outputs import StagedOutput

if TYPE_CHECKING:
    from imagen.evaluation.prompt_following import ClipScores
    from imagen.evaluation.suites import SuitePrompt
    from imagen.pipeline import ImagenPipeline, SamplingOverrides

DEFAULT_CLIP = "openai/clip-vit-large-patch14"  # imagen.evaluation.clip.DEFAULT_CLIP, torch-free
CLIP_FILES = r"\d{4,}\.png|manifest\.jsonl|report\.json|scores\.jsonl|sheet-.+\.png"
READ_FILES = r"report\.json|scores\.jsonl|sheet-.+\.png"  # --images: the report's files
COMPARE_FILES = r"report\.json|pairs\.jsonl|sheet\.png"
ARMS = ("a", "b")
LIMIT_HELP = "at most N prompts: each category's share, spread evenly through it"
SUITE_HELP = (
    "prompt suite: parti (PartiPrompts, 1632), geneval (553), shapes (the bundled model's "
    "captions), or a file (.txt one prompt a line; .tsv, .csv or .jsonl with prompt and "
    "category columns)"
)


class _SettingsParser(Parser):
    """The sampling options of one arm: errors are the outer option's errors."""

    def error(self, message: str) -> NoReturn:
        raise argparse.ArgumentTypeError(message)


def arm_settings(text: str) -> argparse.Namespace:
    """``--a``/``--b``: sampling options in ``imagen sample``'s own syntax (the same argparse
    definitions), e.g. ``"--sampler dpmpp --steps-per-stage 20,10"``; empty: the defaults."""
    p = _SettingsParser(prog="settings", add_help=False)
    add_sampling_options(p, per_stage=True)
    try:
        words = shlex.split(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(f"{text!r}: {e}") from None
    settings = p.parse_args(words)
    settings.text = text
    return settings


def add_parsers(vsub: argparse._SubParsersAction) -> None:
    """``eval clip``, ``eval compare`` and ``eval prompts``."""
    vc = vsub.add_parser("clip", help="CLIP score of a model's images over a prompt suite")
    _suite_options(vc, required=False)
    vc.add_argument(
        "--images", help="score this folder's images (its manifest.jsonl, as imagen sample writes)"
    )
    vc.add_argument("--out", help="write images, report.json, scores.jsonl and contact sheets")
    add_sampling_options(vc, per_stage=True)
    vm = vsub.add_parser("compare", help="two sampling settings on the same prompts and seeds")
    _suite_options(vm, required=True)
    for arm in ARMS:
        vm.add_argument(
            f"--{arm}",
            type=arm_settings,
            default=arm_settings(""),
            metavar="SETTINGS",
            help=f"arm {arm}'s sampling options as for imagen sample, quoted (e.g. --{arm}="
            '"--sampler dpmpp --steps-per-stage 20,10"); default: the model\'s own',
        )
    vm.add_argument(
        "--feature-network",
        default="fid-helper-inception",
        help="KID/FID network: name, TorchScript path, or none (default: fid-helper-inception; "
        "skipped, saying why, when it is not installed)",
    )
    vm.add_argument("--out", help="write both arms' images, report.json, pairs.jsonl, sheet.png")
    for q in (vc, vm):
        q.add_argument(
            "--clip",
            default=DEFAULT_CLIP,
            help=f"CLIP model: directory or Hub id (default: {DEFAULT_CLIP})",
        )
        q.add_argument("--clip-batch-size", type=positive_int, default=32)
        q.add_argument("--num-images", type=positive_int, default=1, help="images per prompt")
        q.add_argument("--seed", type=seed, default=0, help="seed of image 0 (image j: seed + j)")
        q.add_argument("--batch-size", type=positive_int, default=16, help="images per pass")
        q.add_argument("--overwrite", action="store_true", help="replace an earlier run in --out")
        add_model_options(q)
    vp = vsub.add_parser("prompts", help="print a suite's prompts, one a line (or list suites)")
    vp.add_argument("suite", nargs="?", metavar="SUITE", help=SUITE_HELP)
    vp.add_argument("--category", action="append", help="only this category (repeatable)")
    vp.add_argument("--limit", type=positive_int, help=LIMIT_HELP)
    vp.add_argument("--categories", action="store_true", help="print categories and counts")


def _suite_options(p: argparse.ArgumentParser, required: bool) -> None:
    p.add_argument("--prompts", required=required, metavar="SUITE", help=SUITE_HELP)
    p.add_argument("--category", action="append", help="only this category (repeatable)")
    p.add_argument("--limit", type=positive_int, help=LIMIT_HELP)


def suite_prompts(args: argparse.Namespace) -> list[SuitePrompt]:
    """The prompts --prompts, --category and --limit choose (a UsageError for unknown ones)."""
    from imagen.evaluation.suites import load_suite, select

    try:
        return select(load_suite(args.prompts), args.category, args.limit, args.prompts)
    except (ValueError, OSError) as e:
        raise UsageError(str(e)) from None


def list_prompts(args: argparse.Namespace) -> int:
    """``imagen eval prompts``: the suites, or a suite's prompts (or categories)."""
    from imagen.evaluation.suites import categories, describe_suites

    if not args.suite:
        print("\n".join(describe_suites()))
        return 0
    args.prompts = args.suite
    prompts = suite_prompts(args)
    if args.categories:
        print("\n".join(f"{c}\t{n}" for c, n in categories(prompts).items()))
    else:
        print("\n".join(p.text for p in prompts))
    return 0


def shapes_checker(suite: str | None) -> Any:
    """The Shapes checker's verdict function for the shapes suite (else None)."""
    if suite != "shapes":
        return None
    from imagen.data.checker import check_image

    return lambda image, prompt: check_image(image, prompt).ok


def _load_clip(args: argparse.Namespace) -> Any:
    from imagen.evaluation.clip import load_clip

    return load_clip(args.clip, args.device or "cpu", args.clip_batch_size)


def _bar(total: int, desc: str) -> Any:
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit="img", leave=True)


def eval_clip_command(args: argparse.Namespace) -> dict:
    """``imagen eval clip``: sample the suite (or read --images) and CLIP-score every image."""
    _check_clip_args(args)
    prompts = suite_prompts(args) if args.prompts else []
    if args.images:
        from imagen.evaluation.prompt_following import read_manifest

        rows = read_manifest(args.images)  # a bad manifest fails before CLIP loads
    else:
        check_seeds(args.seed, len(prompts) * args.num_images)
    files = READ_FILES if args.images else CLIP_FILES  # never the folder's own images
    staged = StagedOutput(args.out, run_files=files, overwrite=args.overwrite) if args.out else None
    with staged or nullcontext():
        from imagen.evaluation.prompt_following import ClipScores, summary, write_report

        scores = ClipScores(_load_clip(args), shapes_checker(args.prompts))  # before the model
        report: dict[str, Any] = {"suite": args.prompts, "clip_model": args.clip}
        if args.images:
            report.update(_score_folder(args, rows, scores, prompts))
        else:
            report.update(_sample_and_score(args, scores, prompts, staged))
        report.update(summary(scores.records))
        if staged:
            root = staged.staging if not args.images else Path(".")
            write_report(staged.staging, report, scores.records, root)
            staged.commit(last=("report.json",))
            print(
                f"wrote report.json, scores.jsonl and contact sheets to {staged.target}",
                file=sys.stderr,
            )
    return report


SAMPLING_DESTS = ("steps", "steps_per_stage", "guidance", "guidance_per_stage", "sampler")
SAMPLING_DESTS += ("threshold", "aug_level", "spacing")


def _check_clip_args(args: argparse.Namespace) -> None:
    """--images scores what is there: options that choose or sample prompts do not apply."""
    if not args.images:
        if not args.prompts:
            raise UsageError(
                "give --prompts SUITE to sample (parti, geneval, shapes, a file) or --images DIR"
            )
        return
    given = [f"--{d.replace('_', '-')}" for d in SAMPLING_DESTS if getattr(args, d) is not None]
    given += [f for f, on in (("--category", args.category), ("--limit", args.limit)) if on]
    if args.num_images != 1:
        given.append("--num-images")
    if given:
        raise UsageError(
            f"--images scores every image its manifest lists, as it was made; drop {given[0]}"
        )


def _score_folder(args: argparse.Namespace, rows: list, scores: ClipScores, prompts: list) -> dict:
    from imagen.evaluation.prompt_following import score_folder

    bar = _bar(len(rows), "CLIP")
    try:
        score_folder(args.images, rows, scores, prompts, args.clip_batch_size, bar.update)
    finally:
        bar.close()
    return {"images_from": str(args.images)}


def _sample_and_score(
    args: argparse.Namespace, scores: ClipScores, prompts: list, staged: StagedOutput | None
) -> dict:
    from imagen.cli.sample import progress_bars
    from imagen.evaluation.prompt_following import batch_writer, sample_and_score
    from imagen.pipeline import resolve_model, sampling_summary
    from imagen.pipeline.outputs import RunWriter

    model = resolve_model(args.model)
    pipe = load_pipeline(args, model)
    overrides = sampling_overrides(args)
    configs = _arm_configs(pipe, overrides)  # checked before any sampling
    total = len(prompts) * args.num_images
    bars, done = progress_bars(pipe, total), _bar(total, "CLIP")
    writer = RunWriter(staged, str(model)) if staged else None
    try:
        sample_and_score(
            pipe,
            prompts,
            overrides,
            scores,
            args.num_images,
            args.seed,
            args.batch_size,
            batch_writer(writer) if writer else None,
            bars,
            done.update,
        )
    finally:
        bars.close()
        done.close()
        if writer:
            writer.close()
    return {"num_images": args.num_images, "seed": args.seed, "sampling": sampling_summary(configs)}


def _compare_output(args: argparse.Namespace) -> StagedOutput | None:
    if not args.out:
        return None
    staged = StagedOutput(args.out, run_files=COMPARE_FILES, overwrite=args.overwrite)
    earlier = [a for a in ARMS if (staged.target / a).exists()]
    if earlier and not args.overwrite:
        staged.discard()
        raise UsageError(
            f"--out {args.out} already holds an earlier comparison ({', '.join(earlier)}/); "
            "choose another --out, or pass --overwrite to replace it"
        )
    return staged


def _arm_configs(pipe: ImagenPipeline, overrides: SamplingOverrides, what: str = "") -> list:
    """Each stage's settings with ``overrides`` applied, or a UsageError naming ``what``."""
    try:
        return pipe.sampling_configs(overrides)
    except ValueError as e:
        raise UsageError(f"{what}{e}") from None


def _feature_network(name: str) -> tuple[Any, str | None]:
    """The KID/FID network, or None and why: ``none``, or the default one not installed (a
    path given that does not load is an error)."""
    from imagen.evaluation.fid import DEFAULT_NETWORK, FeatureNetwork

    if name == "none":
        return None, "skipped: --feature-network none"
    try:
        return FeatureNetwork(name), None
    except FileNotFoundError as e:
        if name != DEFAULT_NETWORK:
            raise
        return None, f"skipped: {e}"


def eval_compare_command(args: argparse.Namespace) -> dict:
    """``imagen eval compare``: arms a and b on the same prompts and seeds, paired."""
    prompts = suite_prompts(args)
    total = len(prompts) * args.num_images
    check_seeds(args.seed, total)
    staged = _compare_output(args)
    with staged or nullcontext():
        from imagen.evaluation.compare import Arm, compare_report, run_arms, write_compare
        from imagen.evaluation.prompt_following import ClipScores, batch_writer
        from imagen.pipeline import resolve_model

        scorer = _load_clip(args)
        network, missing = _feature_network(args.feature_network)
        model = resolve_model(args.model)
        pipe = load_pipeline(args, model)
        if network is not None and args.device:
            network.to(args.device)
        arms = []
        for name in ARMS:
            settings = getattr(args, name)
            overrides = sampling_overrides(settings)
            configs = _arm_configs(pipe, overrides, f"--{name} {settings.text!r}: ")
            checker = shapes_checker(args.prompts)
            arms.append(Arm(name, settings.text, overrides, configs, ClipScores(scorer, checker)))
        writers = _arm_writers(staged, str(model))
        write = {a: batch_writer(w, f"{a}/") for a, w in writers.items()}
        steps = sum(sum(c.steps for c in arm.configs) for arm in arms)
        bar, done = _bar(total * steps, "sampling"), _bar(2 * total, "CLIP")
        bar.unit = "img-step"
        try:
            run_arms(
                pipe,
                prompts,
                arms,
                args.num_images,
                args.seed,
                args.batch_size,
                network,
                (lambda name, out: write[name](out)) if writers else None,
                lambda p: bar.update(p.batch_size),
                done.update,
            )
        finally:
            bar.close()
            done.close()
            for w in writers.values():
                w.close()
        report = {"suite": args.prompts, "clip_model": args.clip, "num_images": args.num_images}
        report.update({"seed": args.seed, **compare_report(arms, network, missing)})
        if staged:
            for a in ARMS:
                if (staged.target / a).exists():  # --overwrite: the earlier comparison's arms
                    shutil.rmtree(staged.target / a)
            write_compare(staged.staging, report, arms)
            staged.commit(last=("report.json",))
            print(
                f"wrote both arms, report.json, pairs.jsonl and sheet.png to {staged.target}",
                file=sys.stderr,
            )
    return report


def _arm_writers(staged: StagedOutput | None, model: str) -> dict[str, Any]:
    """Per arm, imagen sample's RunWriter of its images and manifest into OUT/a and OUT/b."""
    if staged is None:
        return {}
    from imagen.evaluation.prompt_following import Subdirectory
    from imagen.pipeline.outputs import RunWriter

    return {a: RunWriter(Subdirectory(staged, a), model) for a in ARMS}  # type: ignore[arg-type]


RUNNERS = {"clip": eval_clip_command, "compare": eval_compare_command}
