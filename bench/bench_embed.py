"""Benchmark: embedding throughput (preprocess + haloed encoding), in process on this machine.

Two figures, each the median over ``--repeats`` runs, with ``/proc/loadavg`` printed:

- ``digits``: checkpoints/s over the default digits zoo (every model and epoch: load,
  align to the run's reference, tokenize, standardize, encode, mean and spread) with the
  main job's model config: ``--run`` (a run of the main job), else the zoo's canonical
  preprocessing with an untrained SANE (throughput does not depend on the weights' values).
- ``resnet``: tokens/s for one randomly initialized CIFAR ResNet-18 (token size 288,
  39,304 tokens without BN), haloed windows of 256 tokens (halo 64), with a SANE of
  ``--resnet-width`` (``reference``: d_model 256, 4 layers; ``resnet``: the paper's
  d_model 2048, 8 layers, a GPU job). Preprocessing is timed apart from encoding; the
  architecture is not in the run, so it is standardized with its own statistics.

    python bench/bench_embed.py [--only digits|resnet] [--repeats 3] [--run RUN_URI [--pool ACTORS]]
                                [--resnet-width reference]
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import statistics
import tempfile
import time

import ray
import torch

from sane_ray.data import prepare_data
from sane_ray.embed import (
    EmbedConfig,
    Preprocessing,
    Run,
    embed_models,
    embed_tokens,
    embed_zoo,
    load_run,
    preprocess,
)
from sane_ray.embed.preprocess import run_export_files
from sane_ray.model import SaneModel, preset
from sane_ray.model.export import export_model
from sane_ray.pretrain_config import PretrainConfig, model_for_data
from sane_ray.zoo.architectures import build_model
from sane_ray.zoo.generate import ensure_default_zoo
from sane_ray.zoo.reader import open_zoo


def loadavg() -> str:
    with open("/proc/loadavg") as f:
        return " ".join(f.read().split()[:3])


def untrained_digits_run(run_uri: str) -> None:
    """Export an untrained SANE of the main job's config with the default digits zoo's preprocessing."""
    cfg = PretrainConfig()
    data = dataclasses.replace(cfg.data, zoo_uri=ensure_default_zoo(progress=False), num_actors=1)
    ray.init(num_cpus=4, object_store_memory=256 * 1024**2, log_to_driver=False, configure_logging=False)
    prepared = prepare_data(data)
    ray.shutdown()
    model_cfg = model_for_data(cfg.train.model, prepared.token_size, prepared.window_size, prepared.pad_position)
    export_model(SaneModel(model_cfg).state_dict(), model_cfg, run_uri, run_export_files(prepared))


def bench_digits(repeats: int, run_uri: str | None) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        if run_uri is None:
            run_uri = tmp
            untrained_digits_run(run_uri)
        run = load_run(run_uri, device="cpu")
        zoo = open_zoo(run.canonical.zoo_uri)
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            table = embed_models(run, zoo.models, cfg=EmbedConfig())
            times.append(time.perf_counter() - start)
    t = statistics.median(times)
    lengths = sorted({p.layout.num_tokens for p in run.preprocessing.layouts.values()})
    print(f"digits: {table.num_rows} checkpoints of {len(zoo.models)} models ({lengths} tokens, window "
          f"{run.model.cfg.window_size}, d_model {run.model.cfg.d_model}): {t:.2f} s median -> "
          f"{table.num_rows / t:,.1f} checkpoints/s (runs {', '.join(f'{x:.2f}' for x in times)}; load {loadavg()})")


def bench_digits_pool(run_uri: str, actors: int) -> None:
    """The same through :func:`embed_zoo` (Ray Data actor pool, output written as Parquet); one timed
    run after Ray start-up, actor start-up included."""
    run = load_run(run_uri, device="cpu")
    ray.init(num_cpus=max(2, actors + 1), object_store_memory=256 * 1024**2, log_to_driver=False,
             configure_logging=False)
    with tempfile.TemporaryDirectory() as out:
        start = time.perf_counter()
        rows = embed_zoo(run_uri, run.canonical.zoo_uri, out, EmbedConfig(num_actors=actors))
        t = time.perf_counter() - start
    ray.shutdown()
    print(f"digits, Ray Data pool of {actors} actor(s): {rows} checkpoints in {t:.2f} s -> {rows / t:,.1f} "
          f"checkpoints/s (actor start-up included; load {loadavg()})")


def bench_resnet(repeats: int, width: str) -> None:
    torch.manual_seed(0)
    sd = build_model("resnet18").state_dict()
    sane = dataclasses.replace(preset(width), d_t=288, window_size=256, max_positions=(65536, 128, 1024))
    prep = Preprocessing(token_size=288, include_bn=False, pad_position=(65535, 127, 1023),
                         align=False, align_max_sweeps=1, align_seed=0, layouts={}, references={})
    run = Run("", SaneModel(sane).eval(), prep, None)
    logging.getLogger("sane_ray.embed.preprocess").setLevel(logging.ERROR)
    prep_times, enc_times = [], []
    for _ in range(repeats):
        start = time.perf_counter()
        toks = preprocess(run, sd, "resnet18")
        prep_times.append(time.perf_counter() - start)
        start = time.perf_counter()
        emb = embed_tokens(run, toks, halo=64, batch_windows=32)
        enc_times.append(time.perf_counter() - start)
    n = toks.tokens.shape[0]
    t = statistics.median(enc_times)
    print(f"resnet18: {n:,} tokens, SANE {width} (d_model {sane.d_model}, {sane.n_layers} layers), window 256, "
          f"halo 64: encode {t:.2f} s median -> {n / t:,.0f} tokens/s (content tokens; passes cover 2x), "
          f"preprocess {statistics.median(prep_times):.3f} s; spread over {emb.layer_spread.shape[1]} layers "
          f"(load {loadavg()})")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--only", choices=["digits", "resnet"])
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--run", help="an exported digits run (default: export an untrained one for the default zoo)")
    p.add_argument("--pool", type=int, default=0, help="also time embed_zoo with this many actors (needs --run)")
    p.add_argument("--resnet-width", default="reference", choices=["tiny", "reference", "resnet"])
    args = p.parse_args()
    torch.set_num_threads(2)
    if args.only in (None, "digits"):
        bench_digits(args.repeats, args.run)
        if args.pool and args.run:
            bench_digits_pool(args.run, args.pool)
    if args.only in (None, "resnet"):
        bench_resnet(args.repeats, args.resnet_width)


if __name__ == "__main__":
    main()
