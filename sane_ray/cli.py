"""The ``sane-ray`` command line: one parser for every job.

``jobs/*.py`` are thin entry points for ``ray job submit`` that call :func:`main` with
their subcommand, so a flag means the same thing everywhere.

Expected faults reach the user as one line naming the file, URI or setting: exit code
2 for bad input (including a location another writer holds), 1 for a run that failed
(a zoo task, or training that spent its restarts). ``-v`` re-raises with the traceback.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from typing import Callable, Sequence

from sane_ray.config import ConfigError, add_config_arguments, load_config, overrides_from_args
from sane_ray.storage import StorageError

log = logging.getLogger("sane_ray")


def _zoo_info(args: argparse.Namespace) -> int:
    from sane_ray.zoo.info import format_info, zoo_info
    from sane_ray.zoo.native import unlisted_files
    from sane_ray.zoo.reader import open_zoo

    zoo = open_zoo(args.uri, verify=not args.no_verify, progress=not args.json)
    info = zoo_info(zoo)
    if args.check:
        if zoo.format != "native":
            raise ValueError(f"--check needs a native zoo (a manifest to compare with); {zoo.uri} is {zoo.format}")
        info["unlisted"] = unlisted_files(zoo.uri)
    print(json.dumps(info, indent=2, default=str) if args.json else format_info(info))
    return 1 if info.get("unlisted") else 0


def _make_zoo(args: argparse.Namespace) -> int:
    from sane_ray.zoo.generate import generate_zoo
    from sane_ray.zoo.plan import ZooGenConfig

    cfg = load_config(ZooGenConfig, args.config, overrides_from_args(args))
    uri = generate_zoo(cfg, progress=True)
    print(f"zoo written to {uri}")
    return 0


def _pretrain(args: argparse.Namespace) -> int:
    from sane_ray.pretrain import run_pretrain
    from sane_ray.pretrain_config import PretrainConfig, preset_config

    base = preset_config(args.preset) if args.preset else None
    cfg = load_config(PretrainConfig, args.config, overrides_from_args(args), base=base)
    run_pretrain(cfg)
    return 0


def _probe(args: argparse.Namespace) -> int:
    from sane_ray.probe.config import ProbeConfig
    from sane_ray.probe.job import run_probe

    cfg = load_config(ProbeConfig, args.config, overrides_from_args(args))
    out, _ = run_probe(cfg)
    print(f"probe results written to {out}/results.md")
    return 0


def _tune(args: argparse.Namespace) -> int:
    from sane_ray.tune.config import SweepConfig
    from sane_ray.tune.sweep import run_sweep

    cfg = load_config(SweepConfig, args.config, overrides_from_args(args))
    run_sweep(cfg)
    return 0


def _sample(args: argparse.Namespace) -> int:
    from sane_ray.sample.config import SampleConfig
    from sane_ray.sample.job import run_sample

    overrides = overrides_from_args(args)
    overrides += ["bn_condition=false"] if args.no_bn_cond else []
    overrides += ["halo=0"] if args.no_halo else []
    run_sample(load_config(SampleConfig, args.config, overrides))
    return 0


# Short flags of the sampling job (every key also has its --key flag).
SAMPLE_ALIASES = {
    "finetune-epochs": "finetune_epochs",
    "prompt-models": "prompt_models",
    "prompt-epoch": "prompt_epoch",
    "prompt-best-k": "prompt_best_k",
    "prompt-architecture": "prompt_architecture",
}


def config_jobs() -> dict[str, tuple[type, dict[str, str]]]:
    """Subcommand -> (its config dataclass, its short flags) for every job configured by one.

    The one list that :func:`build_parser` and ``tools/config_doc.py`` (docs/config.md) read.
    """
    from sane_ray.pretrain_config import PRETRAIN_ALIASES, PretrainConfig
    from sane_ray.probe.config import ProbeConfig
    from sane_ray.sample.config import SampleConfig
    from sane_ray.tune.config import SWEEP_ALIASES, SweepConfig
    from sane_ray.zoo.plan import ZooGenConfig

    return {
        "make-zoo": (ZooGenConfig, {}),
        "pretrain": (PretrainConfig, PRETRAIN_ALIASES),
        "tune": (SweepConfig, SWEEP_ALIASES),
        "probe": (ProbeConfig, {}),
        "sample": (SampleConfig, SAMPLE_ALIASES),
    }


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="sane-ray", description="SANE weight-space learning on Ray")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True)

    zoo = sub.add_parser("zoo", help="inspect model zoos").add_subparsers(dest="zoo_command", required=True)
    info = zoo.add_parser("info", help="summarize a zoo: format, models, checkpoints, skipped inputs")
    info.add_argument("uri", help="zoo location: a path or s3://bucket/prefix")
    info.add_argument("--json", action="store_true", help="print one JSON object")
    info.add_argument("--no-verify", action="store_true", help="list only; do not open every checkpoint")
    info.add_argument("--check", action="store_true",
                      help="also list files under the zoo that its manifest does not name (exit 1 if any)")
    info.set_defaults(func=_zoo_info)

    jobs = config_jobs()
    make = sub.add_parser("make-zoo", help="train a model zoo on scikit-learn's digits (Ray tasks)")
    add_config_arguments(make, *jobs["make-zoo"])
    make.set_defaults(func=_make_zoo)

    from sane_ray.pretrain_config import PRESETS

    pre = sub.add_parser("pretrain", help="pretrain SANE on a zoo with Ray Train + FSDP2")
    pre.add_argument("--preset", choices=sorted(PRESETS), help="start from a named configuration")
    add_config_arguments(pre, *jobs["pretrain"])
    pre.set_defaults(func=_pretrain)

    tune = sub.add_parser("tune", help="sweep pretraining hyperparameters with Ray Tune (ASHA, random or optuna)")
    add_config_arguments(tune, *jobs["tune"])
    tune.set_defaults(func=_tune)

    probe = sub.add_parser("probe", help="embed a zoo with a pretrained run and probe model properties")
    add_config_arguments(probe, *jobs["probe"])
    probe.set_defaults(func=_probe)

    sample = sub.add_parser("sample", help="sample new models from a pretrained run (KDE / Gaussian prior), rank them")
    add_config_arguments(sample, *jobs["sample"])
    sample.add_argument("--no-bn-cond", action="store_true", help="same as --bn_condition false")
    sample.add_argument("--no-halo", action="store_true", help="same as --halo 0 (plain decoding windows)")
    sample.set_defaults(func=_sample)
    return parser


def _expected_faults() -> tuple[tuple[type[BaseException], ...], tuple[type[BaseException], ...]]:
    """(bad input: exit 2, failed runs: exit 1); imported lazily, like the commands."""
    from ray.train import TrainingFailedError

    from sane_ray.lease import LeaseHeldError
    from sane_ray.sample.job import SamplingFailedError
    from sane_ray.tune.sweep import SweepInterruptedError
    from sane_ray.zoo.generate import ZooGenerationError

    # ZooExistsError is a FileExistsError; IntegrityError and ResumeError are ValueErrors.
    bad_input = (ConfigError, StorageError, ValueError, KeyError, FileNotFoundError, FileExistsError,
                 PermissionError, LeaseHeldError)
    return bad_input, (ZooGenerationError, TrainingFailedError, SweepInterruptedError, SamplingFailedError)


def one_line(e: BaseException) -> str:
    """The first line of an error's message (Ray's carry tracebacks after it)."""
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    func: Callable[[argparse.Namespace], int] = args.func
    bad_input, failed = _expected_faults()
    try:
        return func(args)
    except (*bad_input, *failed) as e:
        # One clear line, not a traceback from deep inside a library.
        if args.verbose:
            raise
        code = 1 if isinstance(e, failed) else 2
        print(f"sane-ray: error: {one_line(e)}", file=sys.stderr)
        return code


if __name__ == "__main__":
    sys.exit(main())
