"""Generate model zoos on the digits tasks: one Ray task trains one planned model, the driver publishes.

Like the public model zoos, models differ in seed, learning rate, weight decay,
initialization, and activation and dropout where the architecture takes them (a
ResNet does not); every choice is drawn from ``(cfg.seed, model index)`` alone, and
training is single-threaded with a seeded batch order, so a config always yields
bit-identical weights and metrics wherever the zoo is written (local disk or S3).
Local output on a multi-node cluster must be a shared filesystem; prefer S3.

Each task writes its own checkpoints (epoch 0 is the initialization) and returns its
manifest rows; the driver publishes the manifest only after every task succeeded, so a
failed generation leaves no zoo. The generation config is stored in the manifest metadata:
:func:`ensure_zoo` reuses a published zoo with the same config instead of retraining.

While a zoo is written its root is leased (:mod:`sane_ray.lease`): a second writer is
refused. ``overwrite`` writes the new zoo beside the published one (under
``next/`` when the old one is in ``models/``, and back), and publishing its manifest is
the single step that replaces the old zoo; an interrupted overwrite leaves the old zoo
as it was. Only once a manifest is published does its writer remove every file under
the root that the manifest does not name: the old zoo's, and whatever interrupted
writers left, under either prefix.

``format: public`` writes the same models (same ids, weights and metrics) in the public
model-zoo layout (:mod:`sane_ray.zoo.public`), which has no manifest to publish last.
The whole zoo is written into a sibling directory ``.<name>.sane-ray-staging`` and
renamed into place once complete: the root holds the old zoo (or nothing) until then.
Replacing an old zoo takes two renames (old away, new in); in the microseconds between
them the root does not exist, and an interruption exactly there leaves both zoos beside
it, never a partial one at the root. Leftovers of a crashed writer are removed by the
next one. S3 has no rename, so ``format: public`` is refused there.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import shutil
import sys
import time
from typing import Any

import ray
from tqdm.auto import tqdm

from sane_ray import lease, storage
from sane_ray.cluster import ensure_ray, remote_args, task_plan
from sane_ray.zoo import flat, hub, public
from sane_ray.zoo.native import MANIFEST, manifest_paths, publish_manifest, read_manifest, unlisted_files
from sane_ray.zoo.plan import ZooGenConfig, default_zoo_config, plan_models, zoo_uri
from sane_ray.zoo.tasks import get_task
from sane_ray.zoo.trainer import train_model

log = logging.getLogger(__name__)

# Where a zoo's checkpoints live under its root: a fresh zoo in the first, an overwrite in the other one.
_PREFIXES = ("models", "next")


class ZooExistsError(FileExistsError):
    """A zoo is already published at the output URI and overwriting was not allowed."""


class ZooGenerationError(RuntimeError):
    """Training a model failed; no manifest was published."""


def _published(root: str, s3: storage.S3Options) -> tuple[str, dict[str, Any]] | None:
    """``(layout, metadata)`` of a zoo published at ``root``, else None.

    Every layout the reader knows counts: a native writer removes what its manifest does not
    name, so an hf or flat zoo it took for no zoo would be deleted.
    """
    if storage.exists(storage.join(root, MANIFEST), s3):
        return "native", read_manifest(root, s3).metadata
    if not storage.exists(root, s3):
        return None
    if flat.is_flat(storage.listdir(root, s3)):
        return "flat", {}
    listing = storage.find(root, s3, dirs=True)
    if any(public.PARAMS in d.files for d in public.list_model_dirs(root, s3, listing).values()):
        return "public", public.read_metadata(root, s3)
    if hub.is_hub(hub.list_model_dirs(listing)):
        return "hf", {}
    return None


MODEL_TASK_CPUS = 1  # training is single-threaded (bit-identical weights wherever it runs)


def _collect(refs: dict, root: str, progress: bool, unpublished: str) -> list[dict[str, Any]]:
    """Wait for every task, showing progress; on the first failure cancel the rest, wait for them, and raise."""
    n = len(refs)
    bar = tqdm(total=n, unit="model", desc="zoo", disable=not (progress and sys.stderr.isatty()))
    log_every = max(1, n // 10)
    pending, rows, best, t0 = list(refs), [], -1.0, time.perf_counter()
    try:
        while pending:
            done, pending = ray.wait(pending, num_returns=1)
            for ref in done:
                try:
                    model_rows = ray.get(ref)
                except ray.exceptions.RayError as e:
                    for other in pending:
                        ray.cancel(other)
                    if pending:  # so that no task still writes once the caller cleans up
                        ray.wait(pending, num_returns=len(pending), timeout=60)
                    cause = getattr(e, "cause", None) or e
                    first = (str(cause).strip().splitlines() or [""])[0]
                    raise ZooGenerationError(
                        f"training {refs[ref].model_id} failed ({type(cause).__name__}: {first}); {unpublished}"
                    ) from e
                rows.extend(model_rows)
                best = max(best, model_rows[-1]["test_acc"])
                bar.update(1)
                bar.set_postfix(best_test_acc=f"{best:.3f}")
                finished = n - len(pending)
                if progress and bar.disable and (finished % log_every == 0 or finished == n):
                    log.info("zoo %s: %d/%d models trained in %.1fs, best test acc %.3f",
                             root, finished, n, time.perf_counter() - t0, best)
    finally:
        bar.close()
    return rows


def _train_all(cfg: ZooGenConfig, target: str, root: str, progress: bool, s3: storage.S3Options,
               unpublished: str) -> list[dict[str, Any]]:
    """Train every planned model as a Ray task writing under ``target``; their rows."""
    ensure_ray()
    if storage.parse_uri(root).scheme == "file" and len([n for n in ray.nodes() if n["Alive"]]) > 1:
        log.warning("writing zoo to local path %s from a multi-node cluster: it must be a shared filesystem", root)
    # The task's tensors are built once here and shared through the object store, so
    # workers need not import scikit-learn.
    task = ray.put(get_task(cfg.task, cfg.split_seed))
    plans = plan_models(cfg)
    log.info("%s", task_plan("model-training", len(plans), MODEL_TASK_CPUS))
    train = ray.remote(train_model).options(**remote_args("cpu", MODEL_TASK_CPUS, node_types=cfg.node_types))
    refs = {train.remote(p, task, target, s3, cfg.format): p for p in plans}
    return _collect(refs, root, progress, unpublished)


def generate_zoo(cfg: ZooGenConfig, progress: bool = True, s3: storage.S3Options | None = None) -> str:
    """Train ``cfg.models`` models as Ray tasks, publish the zoo, return its URI.

    Refuses (``ZooExistsError``) if a zoo of any layout the reader knows is already published there,
    unless ``cfg.overwrite``, and (``LeaseHeldError``) while another writer holds it. S3 settings are resolved here (``s3`` or the AWS variables) and
    handed to the tasks, so they reach workers on any cluster.
    """
    cfg.validate()
    if cfg.format == "public":  # refuse here, before any task starts, what the layout cannot carry
        for p in plan_models(cfg):
            public.params_json(p.arch, p.arch_kwargs, p.hparams)
    s3 = (s3 or storage.S3Options()).resolved()
    root = zoo_uri(cfg)
    with lease.acquire(root, "make-zoo", s3) as held:
        published = _published(root, s3)
        if published is not None and not cfg.overwrite:
            raise ZooExistsError(
                f"a zoo is already published at {root} ({published[0]} layout); set overwrite=true to replace it")
        if cfg.format == "public":
            _generate_public(cfg, root, published is not None, held, progress, s3)
        else:
            _generate_native(cfg, root, published and published[0], progress, s3)
    return root


def _generate_native(cfg: ZooGenConfig, root: str, replaces: str | None, progress: bool,
                     s3: storage.S3Options) -> None:
    """Write beside the zoo being replaced (layout ``replaces``), publish the manifest, then remove every
    file it does not name (the old zoo's, and leftovers of interrupted writers under either prefix)."""
    in_use: set[str] = set()
    if replaces == "native":
        in_use = {p.split("/", 1)[0] for p in manifest_paths(root, s3)}
    elif replaces == "public":
        in_use = set(public.list_model_dirs(root, s3)) | {public.ZOO_MARKER}
    prefix = next(p for p in _PREFIXES if p not in in_use)
    # Checkpoints are written as root/models/... or root/next/models/...; a leftover of the
    # same name is replaced atomically, the others go with the sweep after publishing.
    target = root if prefix == "models" else storage.join(root, prefix)
    rows = _train_all(cfg, target, root, progress, s3, f"no manifest published at {root}")
    if target != root:
        rows = [{**r, "path": f"{prefix}/{r['path']}"} for r in rows]
    publish_manifest(root, rows, metadata={"generation": cfg.identity()}, s3=s3)
    storage.remove_files(root, unlisted_files(root, s3), s3)


def _beside(path: str, what: str) -> str:
    """A hidden sibling of the directory ``path`` (same filesystem, so a rename moves it)."""
    parent, name = os.path.split(path.rstrip(os.sep))
    return os.path.join(parent, f".{name}.sane-ray-{what}")


def _generate_public(cfg: ZooGenConfig, root: str, replaces: bool, held: lease.Lease, progress: bool,
                     s3: storage.S3Options) -> None:
    """Write the whole zoo into a staging sibling, then rename it into place."""
    path = storage.parse_uri(root).path
    staging, replaced = _beside(path, "staging"), _beside(path, "replaced")
    others = sorted(set(os.listdir(path)) - {lease.LEASE_FILE})
    if others and not replaces:
        shown = ", ".join(others[:5]) + (", ..." if len(others) > 5 else "")
        raise FileExistsError(f"{root} holds files that are not a published zoo ({shown}); format public replaces "
                              "the whole directory, so give an empty or new one")
    for leftover in (staging, replaced):  # of a writer that crashed; we hold the lease, so they are no one's
        shutil.rmtree(leftover, ignore_errors=True)
    try:
        _train_all(cfg, staging, root, progress, s3, f"nothing published at {root}")
        storage.write_bytes_atomic(os.path.join(staging, public.ZOO_MARKER),
                                   json.dumps({"generation": cfg.identity()}, sort_keys=True).encode())
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    held.release()  # its file is in the root: it must neither go with the old zoo nor stay in the new one
    try:
        os.rename(path, replaced)
        try:
            os.rename(staging, path)
        except OSError:
            os.rename(replaced, path)
            raise
    except OSError as e:
        raise storage.StorageError(f"cannot publish the zoo at {root}: {e}; the complete zoo is in {staging}") from e
    shutil.rmtree(replaced)


def ensure_zoo(cfg: ZooGenConfig, progress: bool = True, s3: storage.S3Options | None = None) -> str:
    """The zoo for ``cfg``: reused if one with the same generation config is published, else generated.

    A published zoo with a *different* config or layout is replaced only with ``cfg.overwrite``.
    """
    cfg.validate()
    s3 = (s3 or storage.S3Options()).resolved()
    root = zoo_uri(cfg)
    published = _published(root, s3)
    if published is not None:
        layout, theirs = published[0], published[1].get("generation") or {}
        if layout == cfg.format and theirs == cfg.identity():
            return root
    if published is not None and not cfg.overwrite:
        diff = sorted(k for k in set(theirs) | set(cfg.identity()) if theirs.get(k) != cfg.identity().get(k))
        diff = (["format"] if layout != cfg.format else []) + diff
        raise ZooExistsError(
            f"a zoo with a different generation config is published at {root} (differs in: {', '.join(diff)}); "
            "set overwrite=true to replace it"
        )
    return generate_zoo(cfg, progress, s3)


def ensure_default_zoo(progress: bool = True, node_types: bool = False) -> str:
    """The built-in zoo's URI, generated on first use (its tasks placed by ``node_types``)."""
    return ensure_zoo(dataclasses.replace(default_zoo_config(), node_types=node_types), progress)


def zoo_or_default(uri: str, node_types: bool = False) -> str:
    """``uri``, or when it is empty the built-in digits zoo: what a run that names no zoo trains on."""
    if uri:
        return uri
    log.info("no zoo given: using the built-in digits zoo (generated on first use)")
    return ensure_default_zoo(progress=True, node_types=node_types)
