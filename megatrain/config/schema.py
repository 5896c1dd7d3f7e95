"""Typed configuration schema.

These dataclasses are registered in Hydra's ConfigStore as ``base_config``; ``configs/config.yaml``
composes on top of it, so a misspelt key or a wrong type fails before anything runs. A numeric
key with a valid range declares it (``ranged``); ``megatrain.config.validate`` checks it then too.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional

from hydra.core.config_store import ConfigStore

from megatrain.config.validate import ranged


@dataclass
class ModelConfig:
    family: str = "gpt"  # gpt | llama | bert | t5 (see megatrain.models.registry)
    size: Optional[str] = "gpt2-tiny"  # a named size of the family; explicit dims below override it
    n_layers: Optional[int] = ranged(None, ge=1)
    d_model: Optional[int] = ranged(None, ge=1)
    n_heads: Optional[int] = ranged(None, ge=1)
    n_kv_heads: Optional[int] = ranged(None, ge=1)  # llama: grouped-query attention
    d_ff: Optional[int] = ranged(None, ge=1)
    vocab_size: Optional[int] = ranged(None, ge=1)  # None: the tokenizer's vocabulary size
    max_seq_len: Optional[int] = ranged(None, ge=1)  # None: the size's default
    rope_theta: Optional[float] = ranged(None, gt=0)  # llama
    tie_embeddings: Optional[bool] = None  # llama (GPT-2 is always tied)
    head_dim: Optional[int] = ranged(None, ge=1)  # t5 (d_kv): None = the size's, or d_model / n_heads
    n_decoder_layers: Optional[int] = ranged(None, ge=1)  # t5: None = the size's, or n_layers
    norm_position: Optional[str] = None  # bert: post (as in BERT) | pre
    dropout: float = ranged(0.0, ge=0, lt=1)
    attn_impl: str = "auto"  # auto | flash_attn | sdpa | cudnn | flex | eager
    # None: random init. A megatrain checkpoint (its weights only), hf:DIR (a Hugging Face model
    # directory of the same family) or hf:ORG/NAME[@REVISION] (a hub id, through huggingface_hub's
    # cache: HF_HOME, HF_HUB_OFFLINE); its dims replace size and the explicit dims.
    init_from: Optional[str] = None


@dataclass
class SftConfig:
    loss_on: str = "completion"  # completion (every assistant turn) | last_turn | all (prompt too)
    packing: bool = True  # several samples per row, attending within each (else one per padded row)


@dataclass
class DataConfig:
    # A folder written by megatrain-prepare — a path or a URL (s3://, gs://, http(s)://; credentials
    # from the store's standard environment) — or "stdlib": the embedded default corpus, prepared
    # on first use into cache_dir.
    train: str = "stdlib"
    eval: Optional[str] = None  # None: the eval shards of the train folder
    seq_len: int = ranged(256, ge=1)
    # clm | mlm | span | sft | cls | seq2seq; None: the task corpus's format (megatrain-prepare
    # --format), else the model family's pretraining objective
    objective: Optional[str] = None
    doc_masking: bool = False  # attend within packed documents only, positions restart (clm, mlm)
    mask_prob: float = ranged(0.15, gt=0, le=1)  # mlm: share of tokens to predict (80% [MASK], 10% random, 10% kept)
    whole_word_masking: bool = False  # mlm: choose whole words (BERT's wwm), not single tokens
    noise_density: float = ranged(0.15, gt=0, lt=1)  # span: share of tokens hidden in spans
    mean_span: float = ranged(3.0, ge=1)  # span: mean hidden span length
    nsp: Optional[str] = None  # mlm: sentence-pair prediction: next (BERT's NSP) | order (sentence order); None: off
    sft: SftConfig = field(default_factory=SftConfig)
    target_len: Optional[int] = ranged(None, ge=2)  # seq2seq: longest target (EOS included); None: data.seq_len
    num_workers: int = ranged(1, ge=0)
    shuffle: bool = True
    cache_dir: Optional[str] = None  # None: $MEGATRAIN_CACHE or ~/.cache/megatrain
    vocab_size: int = ranged(4096, ge=1)  # vocabulary for a corpus that is prepared on first use
    # Weighted sources instead of data.train: [{path: DIR|stdlib, name: label, weight: 0.7,
    # epochs: null}, ...]; all prepared with one tokenizer; data.eval defaults to the first's.
    mixture: Optional[list[Any]] = None
    pack_whole_docs: bool = False  # never split a document that fits in a row: pad instead
    # The rows of this many consecutive micro-batches (per reader) are shuffled among them, so one
    # micro-batch's rows come from far-apart places; 1 = off (rows adjacent). Exact resume on the
    # same layout; on another world size or worker count a reader saved inside a block reads it
    # again from its start (up to shuffle_rows - 1 micro-batches' rows repeated, none lost).
    shuffle_rows: int = ranged(1, ge=1)
    max_skip_fraction: float = ranged(0.01, ge=0, le=1)  # unreadable samples a rank may skip per epoch (share)
    trace: bool = False  # <run.dir>/data_trace/rank<R>.jsonl: the document keys of each step
    retries: int = ranged(5, ge=0)  # a URL read that fails is retried this often (after 1, 2, 4 … s)
    shard_cache_gb: float = ranged(0.0, ge=0)  # keep shards read from URLs in <cache_dir>/shards (LRU, this many GB); 0: off


@dataclass
class OptimConfig:
    name: str = "adamw"
    lr: float = ranged(3e-4, gt=0)
    weight_decay: float = ranged(0.1, ge=0)
    betas: list[float] = ranged([0.9, 0.95], ge=0, lt=1)  # noqa: RUF009 (a field, default_factory)
    eps: float = ranged(1e-8, gt=0)


@dataclass
class ScheduleConfig:
    warmup_steps: int = ranged(100, ge=0)
    decay: str = "cosine"  # cosine | linear | wsd | constant
    min_lr_ratio: float = ranged(0.1, ge=0, le=1)
    total_steps: Optional[int] = ranged(None, ge=1)  # None: trainer.max_steps
    wsd_decay_fraction: float = ranged(0.2, ge=0, le=1)  # wsd: the share of total_steps spent decaying at the end


@dataclass
class FinetuneConfig:
    # Which parameters train (megatrain/training/finetune.py): all | head (above the last block:
    # final norm, LM / task heads; a tied LM head is the token embedding and stays frozen) |
    # top:N (the top N blocks and the head; T5: of the encoder and of the decoder) | fnmatch
    # name patterns; terms comma-separated, e.g. "top:2,tok_emb.*". Frozen weights stay
    # bit-identical, under every ZeRO stage.
    trainable: str = "all"
    # Stages instead of trainable: [{steps: 300, trainable: "top:2"}, {trainable: all}]; each
    # stage but the last lasts its steps (boundaries at cumulative steps), the last to the end.
    stages: Optional[list[Any]] = None
    # Layer-wise LR decay (ELECTRA / BEiT): block i of L (from 0) trains at lr·decay^(L-i), the
    # head at lr, the embeddings at lr·decay^(L+1). 1: off.
    layer_decay: float = ranged(1.0, gt=0, le=1)


@dataclass
class EvalGenerateConfig:
    # Each eval (trainer.eval_every, and the final one) also has the model answer the first
    # max_examples rows of a JSONL of {"input", "target"} or {"prompt", "completion"} rows,
    # greedily, scored as megatrain-eval scores them: eval_bleu | eval_rouge1, eval_rouge2,
    # eval_rougeL, eval_rougeLsum in the eval row (trainer.keep_best may pick one).
    task: Optional[str] = None  # bleu | rouge; None: off
    data: Optional[str] = None  # the rows' file
    max_examples: int = ranged(16, ge=1)
    max_new_tokens: int = ranged(64, ge=1)
    batch_size: int = ranged(8, ge=1)
    table_rows: int = ranged(4, ge=0)  # W&B table eval_samples: the first N (prompt, reference, generation)
    bleu_tokenize: str = "auto"  # sacrebleu's tokenizer (megatrain-eval --bleu-tokenize)


@dataclass
class TrainerConfig:
    max_steps: int = ranged(1000, ge=0)
    # Passes over the training data instead of max_steps: the stream ends after the last one, and
    # the schedule's length is derived from the manifest's counts. None: train for max_steps.
    epochs: Optional[int] = ranged(None, ge=1)
    micro_batch_size: int = ranged(8, ge=1)
    grad_accum_steps: int = ranged(1, ge=1)
    # auto (bf16 on a GPU that has it, else fp32) | bf16_if_native (also bf16 on a CPU with
    # AVX512-BF16 or AMX-BF16) | bf16 | fp16 | fp32
    precision: str = "auto"
    grad_clip: float = ranged(1.0, ge=0)  # 0: no clipping
    seed: int = ranged(1234, ge=0)
    log_every: int = ranged(10, ge=1)
    eval_every: int = ranged(200, ge=1)
    eval_steps: int = ranged(20, ge=1)
    eval_generate: EvalGenerateConfig = field(default_factory=EvalGenerateConfig)
    save_every: int = ranged(500, ge=1)
    keep_last: int = ranged(2, ge=1)
    eval_each_epoch: bool = False  # epochs: also evaluate at the end of every epoch
    save_each_epoch: bool = False  # epochs: also save at the end of every epoch
    # Also keep the checkpoint with the best value of this eval metric (eval_loss, eval_accuracy,
    # ...); loss/ppl are minimised, anything else maximised. None: keep_last only.
    keep_best: Optional[str] = None
    # A Hugging Face folder written at the end of the run: the best checkpoint's model when
    # keep_best is set, else the final one. None: no export.
    export_to: Optional[str] = None
    activation_checkpointing: bool = False
    # torch.compile each transformer block (megatrain/training/transforms.py): auto (on for CUDA
    # under ZeRO 0-2, off on a CPU and under ZeRO-3) | on | off.
    compile: str = "auto"
    # FP8 matmuls in the blocks' linear layers through torchao (megatrain/training/fp8.py):
    # CUDA with compute capability >= 8.9 only, pip install megatrain[fp8].
    fp8: bool = False
    # The token loss without the whole (tokens, vocab) logits: the head and cross-entropy run a
    # chunk of rows at a time, the backward recomputes each chunk (same loss and gradients).
    # auto: where a micro-batch has 2^27 logits or more (megatrain.training.losses.loss_chunk).
    chunked_loss: str = "auto"  # auto | on | off
    peak_tflops: Optional[float] = ranged(None, gt=0)  # per device, for MFU; None: known GPUs only
    sample_prompt: Optional[str] = None  # print a generated sample at the end of training
    sample_tokens: int = ranged(200, ge=1)
    # Numerical faults (megatrain/training/numerics.py): a non-finite loss or gradient norm on
    # any rank skips the update on all (one host sync per step; false removes it and the spike check); a loss
    # spike_zscore standard deviations above the last spike_window steps is logged (log) or
    # rolled back to the last checkpoint, skipping the data in between (rollback); more than
    # max_bad_steps bad steps in a row stop the run.
    # A collective that has not completed after this long (a peer died or stalls) ends the run
    # with an error instead of hanging it. Long enough for the slowest save or eval.
    collective_timeout_s: float = ranged(600.0, gt=0)
    skip_nonfinite: bool = True
    spike_policy: str = "log"  # off | log | rollback
    spike_window: int = ranged(100, ge=2)
    spike_zscore: float = ranged(6.0, gt=0)
    max_bad_steps: int = ranged(5, ge=0)


@dataclass
class DeepSpeedConfig:
    zero_stage: int = ranged(0, ge=0, le=3)  # 0 (plain data parallel) | 1 | 2 | 3
    offload_optimizer: bool = False  # optimizer states and step on the CPU (ZeRO 1-3)
    offload_param: bool = False  # parameters on the CPU between uses (ZeRO 3)
    overlap_comm: bool = True  # overlap gradient reduction with the backward (ZeRO 1-3)
    reduce_bucket_size: int = ranged(500_000_000, ge=1)  # elements per gradient reduction
    allgather_bucket_size: int = ranged(500_000_000, ge=1)  # elements per parameter all-gather (ZeRO 1-2)
    stage3_prefetch_bucket_size: int = ranged(50_000_000, ge=0)  # elements prefetched ahead (ZeRO 3)
    # fp16 dynamic loss scaling: start at 2**initial_scale_power, halve on overflow (the step is
    # skipped), double after loss_scale_window clean steps.
    initial_scale_power: int = ranged(16, ge=0)
    loss_scale_window: int = ranged(1000, ge=1)
    min_loss_scale: float = ranged(1.0, gt=0)


@dataclass
class WandbConfig:
    mode: str = "auto"  # auto (online with an API key, else offline) | online | offline | disabled
    project: str = "megatrain"
    entity: Optional[str] = None
    group: Optional[str] = None
    # At the end of the run, log the Hugging Face export of the final or best (trainer.keep_best)
    # checkpoint as a W&B model artifact: false | final | best.
    log_model: str = "false"
    # Log the end-of-run sample (trainer.sample_prompt) as a W&B table too.
    sample_table: bool = False


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
    finetune: FinetuneConfig = field(default_factory=FinetuneConfig)
    logger: LoggerConfig = field(default_factory=LoggerConfig)
    run: RunConfig = field(default_factory=RunConfig)


def register_configs() -> None:
    """Register the schema so ``configs/config.yaml`` can list ``base_config`` first."""
    ConfigStore.instance().store(name="base_config", node=Config)
