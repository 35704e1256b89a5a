"""Sizing a run to the cluster it meets (issue 25): what is left at 0 is planned, what is given is kept or refused."""

from __future__ import annotations

import pytest

from sane_ray.cluster import CPU_NODE, GPU_NODE, RunSettings, plan_run
from sane_ray.data.config import DataConfig
from sane_ray.pretrain import size_run
from sane_ray.pretrain_config import PretrainConfig


def _plan(nodes, threads: int = 0, data: DataConfig | None = None, **run):
    return plan_run(RunSettings(**run), data or DataConfig(), threads, nodes)


def test_defaults_fill_the_smallest_cluster():
    """`ray start --head` on a 2-core machine: one worker takes what the stream leaves, threads round it up."""
    plan = _plan([{"CPU": 2.0}])
    assert (plan.workers, plan.cpus_per_worker, plan.threads, plan.stream_cpus) == (1, 1.5, 2, 0.5)
    assert plan.line() == "2 CPUs: 1 Train worker x 2 threads (1.5 CPU), stream 0.5 CPU"
    tiny = _plan([{"CPU": 1.0}])
    assert (tiny.workers, tiny.cpus_per_worker, tiny.threads) == (1, 0.5, 1)


def test_one_worker_per_node_or_per_gpu():
    two = _plan([{"CPU": 2.0}, {"CPU": 2.0}])
    assert (two.workers, two.cpus_per_worker, two.threads) == (2, 1.5, 2)  # the stream's share comes off one node
    gpu = _plan([{"CPU": 16.0, "GPU": 4.0}, {"CPU": 16.0, "GPU": 4.0}], gpus_per_worker=1)
    assert (gpu.workers, gpu.cpus_per_worker, gpu.threads) == (8, 3.87, 4)
    assert gpu.line() == "32 CPUs, 8 GPUs: 8 Train workers x 4 threads (3.87 CPU + 1 GPU each), stream 0.5 CPU"


def test_given_values_are_kept_and_the_rest_fits_around_them():
    plan = _plan([{"CPU": 2.0}], workers=2)
    assert (plan.workers, plan.cpus_per_worker, plan.threads) == (2, 0.75, 1)
    plan = _plan([{"CPU": 8.0}], threads=3, cpus_per_worker=2)
    assert (plan.workers, plan.cpus_per_worker, plan.threads) == (1, 2.0, 3)
    # Uneven nodes: the share is the largest that every worker gets somewhere.
    plan = _plan([{"CPU": 3.0}, {"CPU": 1.0}], workers=2)
    assert plan.cpus_per_worker == 1.25


def test_typed_clusters_place_workers_on_gpu_type_nodes_only():
    nodes = [{"CPU": 1.0, CPU_NODE: 1.0}, {"CPU": 2.0, GPU_NODE: 1.0}, {"CPU": 2.0, GPU_NODE: 1.0}]
    plan = _plan(nodes, node_types=True)
    assert (plan.workers, plan.cpus_per_worker) == (2, 2.0)  # windows are drawn on the CPU-type node


@pytest.mark.parametrize("nodes,run,expect", [
    ([{"CPU": 6.0}], {"workers": 64}, "64 workers x at least 0.25 CPU plus 0.5 CPU for the data stream need 16.5 CPU, "
                                      "but the cluster has 6;"),
    ([{"CPU": 2.0}], {"workers": 2, "cpus_per_worker": 1}, "need 2.5 CPU, but the cluster has 2;"),
    ([{"CPU": 4.0}, {"CPU": 3.0}], {"workers": 3, "cpus_per_worker": 2},
     "need 6.5 CPU, but the cluster has 7 on nodes that cannot hold them all"),
    ([{"CPU": 6.0}], {"gpus_per_worker": 1}, "1 worker x 1 GPU need 1 GPU, but the cluster has 0"),
    ([{"CPU": 0.5}], {}, "need 0.75 CPU, but the cluster has 0.5"),
])
def test_what_cannot_fit_is_refused_in_one_line(nodes, run, expect):
    with pytest.raises(ValueError, match="autoscaling") as e:
        _plan(nodes, **run)
    assert expect in str(e.value) and "\n" not in str(e.value)


def test_an_autoscaling_cluster_is_planned_not_refused():
    plan = _plan([{"CPU": 0.0}], workers=4, gpus_per_worker=1, cpus_per_worker=8, autoscaling=True)
    assert (plan.workers, plan.cpus_per_worker, plan.threads) == (4, 8.0, 8)
    assert plan.line().startswith("autoscaling cluster (now 0 CPUs): 4 Train workers x 8 threads")


def test_trials_plan_on_their_share_of_every_node():
    run = RunSettings(workers=1)
    plan = plan_run(run, DataConfig(), 0, [{"CPU": 6.0}], trials=3, trial_cpus=0.25)
    assert (plan.cpus_per_worker, plan.threads) == (1.25, 2)
    assert plan.line() == ("6 CPUs / 3 trials at once: 1 Train worker x 2 threads (1.25 CPU), stream 0.5 CPU, "
                           "trial 0.25 CPU")
    with pytest.raises(ValueError, match=r"^8 concurrent trials x \(1 worker x at least 0.25 CPU .*need 8 CPU"):
        plan_run(run, DataConfig(), 0, [{"CPU": 6.0}], trials=8, trial_cpus=0.25)


def test_size_run_writes_the_plan_into_the_config():
    cfg, plan = size_run(PretrainConfig(), nodes=[{"CPU": 2.0}])
    assert (cfg.run.workers, cfg.run.cpus_per_worker, cfg.train.num_threads) == (1, 1.5, 2)
    assert PretrainConfig().run.workers == 0  # the default asks for sizing
    again, same = size_run(cfg, nodes=[{"CPU": 2.0}])  # a sized config plans to itself
    assert again == cfg and same == plan
