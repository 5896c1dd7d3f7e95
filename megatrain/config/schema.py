"""Typed configuration schema.

These dataclasses are registered in Hydra's ConfigStore as ``base_config``; ``configs/config.yaml``
composes on top of it, so a misspelt key or a wrong type fails before anything runs.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional

from hydra.core.config_store import ConfigStore


@dataclass
class ModelConfig:
    family: str = "gpt"  # gpt | llama | bert | t5 (see megatrain.models.registry)
    size: Optional[str] = "gpt2-tiny"  # a named size of the family; explicit dims below override it
    n_layers: Optional[int] = None
    d_model: Optional[int] = None
    n_heads: Optional[int] = None
    n_kv_heads: Optional[int] = None  # llama: grouped-query attention
    d_ff: Optional[int] = None
    vocab_size: Optional[int] = None  # None: the tokenizer's vocabulary size
    max_seq_len: Optional[int] = None  # None: the size's default
    rope_theta: Optional[float] = None  # llama
    tie_embeddings: Optional[bool] = None  # llama (GPT-2 is always tied)
    head_dim: Optional[int] = None  # t5 (d_kv): None = the size's, or d_model / n_heads
    n_decoder_layers: Optional[int] = None  # t5: None = the size's, or n_layers
    norm_position: Optional[str] = None  # bert: post (as in BERT) | pre
    dropout: float = 0.0
    attn_impl: str = "auto"  # auto | flash_attn | sdpa | flex | eager
    # None: random init. A megatrain checkpoint (its weights only) or hf:DIR (a Hugging Face
    # model directory of the same family); its dims replace size and the explicit dims.
    init_from: Optional[str] = None


@dataclass
class DataConfig:
    # A folder written by megatrain-prepare, or "stdlib": the embedded default corpus, prepared
    # on first use into cache_dir.
    train: str = "stdlib"
    eval: Optional[str] = None  # None: the eval shards of the train folder
    seq_len: int = 256
    objective: Optional[str] = None  # clm | mlm | span; None: the model family's
    doc_masking: bool = False  # attend within packed documents only, positions restart (clm, mlm)
    mask_prob: float = 0.15  # mlm: share of tokens to predict (80% [MASK], 10% random, 10% kept)
    whole_word_masking: bool = False  # mlm: choose whole words (BERT's wwm), not single tokens
    noise_density: float = 0.15  # span: share of tokens hidden in spans
    mean_span: float = 3.0  # span: mean hidden span length
    num_workers: int = 1
    shuffle: bool = True
    cache_dir: Optional[str] = None  # None: $MEGATRAIN_CACHE or ~/.cache/megatrain
    vocab_size: int = 4096  # vocabulary for a corpus that is prepared on first use
    # Weighted sources instead of data.train: [{path: DIR|stdlib, name: label, weight: 0.7,
    # epochs: null}, ...]; all prepared with one tokenizer; data.eval defaults to the first's.
    mixture: Optional[list[Any]] = None
    pack_whole_docs: bool = False  # never split a document that fits in a row: pad instead
    max_skip_fraction: float = 0.01  # unreadable samples a rank may skip per epoch (share)
    trace: bool = False  # <run.dir>/data_trace/rank<R>.jsonl: the document keys of each step


@dataclass
class OptimConfig:
    name: str = "adamw"
    lr: float = 3e-4
    weight_decay: float = 0.1
    betas: list[float] = field(default_factory=lambda: [0.9, 0.95])
    eps: float = 1e-8


@dataclass
class ScheduleConfig:
    warmup_steps: int = 100
    decay: str = "cosine"  # cosine | linear | wsd | constant
    min_lr_ratio: float = 0.1
    total_steps: Optional[int] = None  # None: trainer.max_steps
    wsd_decay_fraction: float = 0.2  # wsd: the share of total_steps spent decaying at the end


@dataclass
class TrainerConfig:
    max_steps: int = 1000
    micro_batch_size: int = 8
    grad_accum_steps: int = 1
    precision: str = "auto"  # auto (bf16 on a GPU that has it, else fp32) | bf16 | fp16 | fp32
    grad_clip: float = 1.0
    seed: int = 1234
    log_every: int = 10
    eval_every: int = 200
    eval_steps: int = 20
    save_every: int = 500
    keep_last: int = 2
    activation_checkpointing: bool = False
    compile: bool = False
    peak_tflops: Optional[float] = None  # per device, for MFU; None: known GPUs only
    sample_prompt: Optional[str] = None  # print a generated sample at the end of training
    sample_tokens: int = 200
    # Numerical faults (megatrain/training/numerics.py): a non-finite loss or gradient norm on
    # any rank skips the update on all (one host sync per step; false removes it and the spike check); a loss
    # spike_zscore standard deviations above the last spike_window steps is logged (log) or
    # rolled back to the last checkpoint, skipping the data in between (rollback); more than
    # max_bad_steps bad steps in a row stop the run.
    # A collective that has not completed after this long (a peer died or stalls) ends the run
    # with an error instead of hanging it. Long enough for the slowest save or eval.
    collective_timeout_s: float = 600.0
    skip_nonfinite: bool = True
    spike_policy: str = "log"  # off | log | rollback
    spike_window: int = 100
    spike_zscore: float = 6.0
    max_bad_steps: int = 5


@dataclass
class DeepSpeedConfig:
    zero_stage: int = 0  # 0 (plain data parallel) | 1 | 2 | 3
    offload_optimizer: bool = False  # optimizer states and step on the CPU (ZeRO 1-3)
    offload_param: bool = False  # parameters on the CPU between uses (ZeRO 3)
    overlap_comm: bool = True  # overlap gradient reduction with the backward (ZeRO 1-3)
    reduce_bucket_size: int = 500_000_000  # elements per gradient reduction
    allgather_bucket_size: int = 500_000_000  # elements per parameter all-gather (ZeRO 1-2)
    stage3_prefetch_bucket_size: int = 50_000_000  # elements prefetched ahead (ZeRO 3)
    # fp16 dynamic loss scaling: start at 2**initial_scale_power, halve on overflow (the step is
    # skipped), double after loss_scale_window clean steps.
    initial_scale_power: int = 16
    loss_scale_window: int = 1000
    min_loss_scale: float = 1.0


@dataclass
class WandbConfig:
    mode: str = "auto"  # auto (online with an API key, else offline) | online | offline | disabled
    project: str = "megatrain"
    entity: Optional[str] = None
    group: Optional[str] = None


@dataclass
class LoggerConfig:
    wandb: WandbConfig = field(default_factory=WandbConfig)
    progress: bool = True  # a progress bar on an interactive terminal


@dataclass
class RunConfig:
    name: str = "run"
    dir: str = "outputs/${run.name}"
    resume: str = "auto"  # auto | never | a checkpoint path


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    deepspeed: DeepSpeedConfig = field(default_factory=DeepSpeedConfig)
    logger: LoggerConfig = field(default_factory=LoggerConfig)
    run: RunConfig = field(default_factory=RunConfig)
    # Hydra adds this key when an experiment is chosen; it carries no settings of its own.
    experiment: Optional[Any] = None


def register_configs() -> None:
    """Register the schema so ``configs/config.yaml`` can list ``base_config`` first."""
    ConfigStore.instance().store(name="base_config", node=Config)
