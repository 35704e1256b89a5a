"""bench/gpu_check.py on CPU: its selection logic, its FLOP count, and that it needs no Ray."""

from __future__ import annotations

import dataclasses
import importlib.util
import os
import subprocess
import sys
import textwrap

import pytest
import torch

from sane_ray.model import SaneModel, attention, tiny
from sane_ray.model.linear import Linear
from sane_ray.train.runtime import cpu_has_bf16

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "bench", "gpu_check.py")


@pytest.fixture(scope="module")
def gpu_check():
    spec = importlib.util.spec_from_file_location("gpu_check", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules["gpu_check"] = module  # its dataclass looks its module up
    spec.loader.exec_module(module)
    yield module
    del sys.modules["gpu_check"]


@pytest.mark.parametrize("name, peak", [
    ("NVIDIA H200", 989.4), ("NVIDIA H100 80GB HBM3", 989.4), ("NVIDIA H100 PCIe", 756.0),
    ("NVIDIA A100-SXM4-80GB", 312.0), ("NVIDIA A100 80GB PCIe", 312.0), ("NVIDIA L40S", 362.0), ("NVIDIA L4", 121.0),
    ("NVIDIA GeForce GTX 1080", None),
])
def test_bf16_peak_by_device_name(gpu_check, name, peak):
    assert gpu_check.peak_bf16_tflops(name) == peak


def test_selection_follows_the_training_jobs_choices(gpu_check, monkeypatch):
    cpu = gpu_check.make_plan(None, sdpa_flash=False)
    cpu_dtype = torch.bfloat16 if cpu_has_bf16() else torch.float32  # as the training job picks on this CPU
    assert (cpu.runtime.device_type, cpu.runtime.backend, cpu.runtime.param_dtype, cpu.attention) == (
        "cpu", "gloo", cpu_dtype, "sdpa")
    monkeypatch.setattr(attention, "flash_attn_available", lambda: False)
    h200 = gpu_check.make_plan("NVIDIA H200", sdpa_flash=True)
    assert (h200.runtime.backend, h200.runtime.param_dtype, h200.runtime.reduce_dtype) == (
        "nccl", torch.bfloat16, torch.float32)
    assert (h200.attention, h200.peak_tflops) == ("sdpa-flash", 989.4)
    assert gpu_check.make_plan("NVIDIA H200", sdpa_flash=False).attention == "sdpa"
    monkeypatch.setattr(attention, "flash_attn_available", lambda: True)  # the package, when installed, wins
    assert gpu_check.make_plan("NVIDIA H200", sdpa_flash=True).attention == "flash-attn"
    assert gpu_check.make_plan(None, sdpa_flash=True).attention == "sdpa-flash"  # CPU never takes flash-attn


def test_matmul_parameters_are_the_models_per_token_linear_weights(gpu_check):
    cfg = dataclasses.replace(tiny(), d_t=40, d_model=48, d_z=12, n_layers=3, n_heads=4)
    model = SaneModel(cfg)
    per_token = sum(m.weight.numel() for name, m in model.named_modules()
                    if isinstance(m, Linear) and not name.startswith("head."))
    assert gpu_check.matmul_params(cfg) == per_token
    window = 16
    attention_flops = 12 * 2 * cfg.n_layers * window * cfg.d_model
    head = sum(m.weight.numel() for name, m in model.named_modules() if name.startswith("head.") and isinstance(m, Linear))
    assert gpu_check.flops_per_token(cfg, window) == pytest.approx(6 * (per_token + head / window) + attention_flops)


def _run_without_ray(code: str) -> subprocess.CompletedProcess:
    """``code`` in a fresh interpreter in which importing Ray fails."""
    prelude = "import sys; sys.modules['ray'] = None\n"
    env = {**os.environ, "PYTHONPATH": ROOT}
    return subprocess.run([sys.executable, "-c", prelude + textwrap.dedent(code)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=120)


def test_on_cpu_it_says_what_it_would_select_without_ray():
    done = _run_without_ray("""
        import runpy
        runpy.run_path("bench/gpu_check.py", run_name="__main__")
    """)
    assert done.returncode == 0, done.stderr
    assert "would select" in done.stdout and "bfloat16 compute" in done.stdout and "nccl" in done.stdout


def test_the_timed_step_runs_fsdp2_on_one_rank_without_ray():
    """The GPU path's own code on CPU (gloo, fp32, a tiny model): a real FSDP2 step, finite figures."""
    done = _run_without_ray("""
        import dataclasses, importlib.util, math
        spec = importlib.util.spec_from_file_location("gpu_check", "bench/gpu_check.py")
        g = sys.modules["gpu_check"] = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(g)
        from sane_ray.model import tiny
        cfg = dataclasses.replace(tiny(), window_size=8, d_model=32, d_z=8)
        out = g.run(g.make_plan(None, sdpa_flash=False), cfg, batch_size=4, warmup=1, steps=3)
        assert out["tokens_per_s"] > 0 and math.isfinite(out["last_loss"]), out
        assert out["last_loss"] < out["first_loss"], out
        assert "ray" not in [m.split(".")[0] for m, v in sys.modules.items() if v is not None]
    """)
    assert done.returncode == 0, done.stderr
    assert "tokens/s" in done.stdout and "MFU         n/a" in done.stdout
