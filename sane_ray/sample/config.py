"""Settings of the sampling job (``sane-ray sample`` / ``jobs/sample.py``)."""

from __future__ import annotations

from dataclasses import dataclass

from sane_ray.zoo.tasks import NORMALIZE_MODES

MODES = ("kde", "gauss")
BANDWIDTH_RULES = ("scott", "silverman")
ANCHORS = ("token", "model")  # KDE anchor per token (the paper) or one per candidate (sane_ray.sample.kde)
FINETUNE_LAYERS = ("all", "head")


@dataclass
class SampleConfig:
    """Which run samples which architecture for which task, how, and where the results go.

    The target architecture is the prompts' (a prompt zoo of another architecture samples that
    one: the run's position tables must cover its tokens).
    """

    run: str = ""
    """An exported pretraining run (its directory)."""
    prompts: str = ""
    """Zoo URI of the prompt models; "": the run's own zoo."""
    task: str = ""
    """Target task for BN-conditioning, scoring, fine-tuning: a registered name (digits, ...), FILE.npz, an
    image folder, a datasets save_to_disk or Parquet directory, or module:function (docs/sampling.md); "": the
    task the prompt zoo records."""
    task_normalize: str = "auto"
    """auto: uint8 images scaled to [0, 1], float arrays as given; train: then per-channel mean/std of the
    training split (files only; registered tasks bring their own)."""
    task_mean: list[float] | None = None
    """Per-channel mean subtracted after scaling (one value: every channel); null: none."""
    task_std: list[float] | None = None
    """Per-channel std divided by after scaling (one value: every channel); null: none."""
    task_image_column: str = ""
    """Image column of a datasets/Parquet task; "": image or img."""
    task_label_column: str = ""
    """Label column of a datasets/Parquet task; "": label or labels."""
    new_head: bool = True
    """A task with another class count than the prompts' architecture: every model gets a new, seeded head
    (fitted in closed form before ranking); false: refuse such a task."""
    out: str = ""
    """Where the candidates, kept models and report go; "": <run>/sample."""
    # ---- prompts: each model's last epoch unless prompt_epoch; optionally only some models / the best k
    prompt_models: list[str] | None = None
    """Model ids to prompt with; null: every model of the prompt zoo."""
    prompt_architecture: str = ""
    """Only prompt models of this architecture (registry name), the target of a zoo mixing architectures;
    "": any (with prompt_best_k, the best model's)."""
    prompt_epoch: int | None = None
    """The prompts' checkpoint epoch; null: each model's last."""
    prompt_best_k: int = 5
    """The k prompts with the best validation accuracy (0: all selected models)."""
    # ---- distribution
    mode: str = "kde"
    """kde: per-token KDE over the prompts' token latents; gauss: N(0, gauss_std^2), no prompts."""
    bandwidth: float = 0.05
    """KDE bandwidth in latent units; 0: per token and dimension by bandwidth_rule. 0.05 was picked on
    validation accuracy on the digits zoo (docs/sampling.md); the rules give ~0.2 there, too wide."""
    bandwidth_rule: str = "silverman"
    """scott or silverman (on the prompts' spread per token and dimension), used where bandwidth is 0."""
    kde_anchor: str = "model"
    """model: one prompt per candidate, noise drawn per token and entry; token: every token also picks
    its own prompt (mixes prompts row by row: near-chance networks on the digits zoo, docs/sampling.md)."""
    gauss_std: float = 1.0
    """Standard deviation of every latent entry in gauss mode."""
    candidates: int = 50
    """Candidates drawn per round (K)."""
    keep: int = 10
    """Candidates kept by validation accuracy (m); keep == candidates: no subsampling."""
    bootstrap: int = 0
    """Extra rounds, each refitting the KDE on the kept candidates' latents."""
    # ---- decoding and BatchNorm
    halo: int | None = None
    """Halo tokens on each side of a decoding pass; null: a quarter window, 0: plain windows (the paper's naive sampling)."""
    window_size: int = 0
    """Decoding pass length; 0: the run's training window."""
    bn_condition: bool = True
    """Set BN running statistics by forward passes on the task's training data."""
    bn_batches: int = 50
    """Training-data batches of the BN-conditioning passes."""
    bn_batch_size: int = 32
    """Images per BN-conditioning batch."""
    bn_momentum: float = 0.0
    """0: reset the running statistics, then their exact average over bn_batches batches; > 0: the
    reference's running averages with this momentum, nothing reset (it runs 200 batches, momentum 0.1)."""
    # ---- fine-tuning and comparisons (kept models, prompts, and as many models trained from scratch)
    finetune_epochs: int = 0
    """Fine-tuning epochs on the task's training split (0: no fine-tuning)."""
    finetune_lr: float = 1e-3
    """Adam learning rate of the fine-tuning."""
    finetune_batch_size: int = 32
    """Fine-tuning batch size."""
    finetune_layers: str = "all"
    """all: fine-tune every parameter; head: only the classification head (the rest fixed)."""
    novelty: bool = True
    """Compare the kept models with the zoo: nearest zoo model, misclassification overlap, prompt-plus-noise baseline."""
    # ---- execution
    seed: int = 0
    """Every random draw of the job derives from it."""
    candidates_per_task: int = 10
    """Candidates decoded and scored per Ray task."""
    cpus_per_task: float = 1.0
    """Logical CPUs per Ray task."""
    gpus_per_task: float = -1.0
    """GPUs per Ray task; -1: a quarter GPU when the cluster has GPUs, else 0."""
    node_types: bool = False
    """Place tasks on sane_cpu_node / sane_gpu_node nodes (sane_ray.cluster)."""
    local_cpus: int = 0
    """Logical CPUs of a local cluster started by this job (0: Ray's default)."""

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"SampleConfig.mode must be one of {', '.join(MODES)}, got {self.mode!r}")
        if self.bandwidth_rule not in BANDWIDTH_RULES:
            raise ValueError(f"SampleConfig.bandwidth_rule must be one of {', '.join(BANDWIDTH_RULES)}, "
                             f"got {self.bandwidth_rule!r}")
        if self.finetune_layers not in FINETUNE_LAYERS:
            raise ValueError(f"SampleConfig.finetune_layers must be one of {', '.join(FINETUNE_LAYERS)}, "
                             f"got {self.finetune_layers!r}")
        if self.task_normalize not in NORMALIZE_MODES:
            raise ValueError(f"SampleConfig.task_normalize must be one of {', '.join(NORMALIZE_MODES)}, "
                             f"got {self.task_normalize!r}")
        if self.kde_anchor not in ANCHORS:
            raise ValueError(f"SampleConfig.kde_anchor must be one of {', '.join(ANCHORS)}, got {self.kde_anchor!r}")
        for name in ("candidates", "keep", "candidates_per_task", "bn_batches", "bn_batch_size",
                     "finetune_batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"SampleConfig.{name} must be >= 1, got {getattr(self, name)}")
        for name in ("bootstrap", "finetune_epochs", "prompt_best_k", "window_size", "local_cpus"):
            if getattr(self, name) < 0:
                raise ValueError(f"SampleConfig.{name} must be >= 0, got {getattr(self, name)}")
        if self.halo is not None and self.halo < 0:
            raise ValueError(f"SampleConfig.halo must be >= 0 or None (a quarter window), got {self.halo}")
        if self.keep > self.candidates:
            raise ValueError(f"SampleConfig.keep={self.keep} exceeds candidates={self.candidates}")
        if self.bootstrap and self.keep < 2 and self.bandwidth <= 0:
            raise ValueError("SampleConfig.bootstrap refits a KDE on the kept candidates: with keep < 2 set "
                             "SampleConfig.bandwidth > 0 (no spread to estimate it from)")
        if not 0 <= self.bn_momentum <= 1:
            raise ValueError(f"SampleConfig.bn_momentum must be in [0, 1], got {self.bn_momentum}")
        if self.bandwidth < 0 or self.gauss_std <= 0 or self.finetune_lr <= 0 or self.cpus_per_task <= 0:
            raise ValueError("SampleConfig.bandwidth must be >= 0 and gauss_std, finetune_lr, cpus_per_task > 0")
        if self.gpus_per_task < 0 and self.gpus_per_task != -1:
            raise ValueError(f"SampleConfig.gpus_per_task must be >= 0 or -1 (auto), got {self.gpus_per_task}")
        if self.prompt_epoch is not None and self.prompt_epoch < 0:
            raise ValueError(f"SampleConfig.prompt_epoch must be >= 0, got {self.prompt_epoch}")
        if self.prompt_models is not None and not self.prompt_models:
            raise ValueError("SampleConfig.prompt_models must be None or a non-empty list of model ids")
