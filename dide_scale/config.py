"""Typed run configuration.

Layers, lowest first: the dataclass defaults below <- an experiment YAML that holds only
its deltas <- ``key=value`` overrides from the command line.  Everything is validated
when it is loaded, before any process group or model exists, and every error names the
dotted key to change.
"""
from __future__ import annotations

import dataclasses
import json
import os
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from .fsutil import atomic_write_text

CONFIG_DIR = Path(__file__).parent / "configs"
Task = Literal["itm", "vqa", "nlvr2", "snli_ve", "caption"]
Precision = Literal["fp32", "bf16", "fp16"]
TASKS = typing.get_args(Task)
TASK_CLASSES = {"itm": 2, "nlvr2": 2, "snli_ve": 3}


class ConfigError(ValueError):
    """A configuration problem; the message names the key to change."""


@dataclass
class ArchConfig:
    """Shape of a ViT/ViLT-style transformer (used by both towers and by the fusion teacher)."""

    width: int = 768
    """Hidden size."""
    depth: int = 12
    """Number of transformer blocks (each tower of the student has this many)."""
    heads: int = 12
    """Attention heads per block."""
    mlp_ratio: float = 4.0
    """MLP hidden size / width."""
    patch_size: int = 32
    """Square image patch side in pixels."""
    image_size: list[int] = field(default_factory=lambda: [384, 384])
    """[height, width] in pixels that the learned position table covers (a table of
    image_size / patch_size positions, ViLT-B/32's is 12 x 12); each image's own patch grid
    gets its position embeddings interpolated from it (bilinear, corners aligned), as ViLT
    does. The images themselves are sized by data.image_*."""
    max_text_len: int = 40
    """Text tokens including [CLS] and [SEP]; longer captions are truncated."""
    vocab_size: int = 30522
    """Word-piece vocabulary size (must match the tokenizer)."""
    drop_path: float = 0.0
    """Stochastic depth rate of the student towers."""

    def check(self, prefix: str) -> None:
        if self.width % self.heads:
            raise ConfigError(f"{prefix}.width={self.width} is not divisible by {prefix}.heads={self.heads}")
        if len(self.image_size) != 2:
            raise ConfigError(f"{prefix}.image_size must be [height, width], got {self.image_size}")
        for side in self.image_size:
            if side <= 0 or side % self.patch_size:
                raise ConfigError(
                    f"{prefix}.image_size={self.image_size} must be positive multiples of "
                    f"{prefix}.patch_size={self.patch_size}")
        for name in ("width", "depth", "heads", "patch_size", "max_text_len", "vocab_size"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"{prefix}.{name} must be > 0")

    @property
    def pos_grid(self) -> tuple[int, int]:
        """Rows and columns of the position table."""
        return self.image_size[0] // self.patch_size, self.image_size[1] // self.patch_size


@dataclass
class StudentConfig:
    """The dual-encoder student."""

    kind: Literal["dual", "fusion"] = "dual"
    """'dual' (the DiDE dual encoder) or 'fusion' (a fusion model trained by this loop: the
    demo's teacher, or a small fusion student)."""
    arch: ArchConfig = field(default_factory=ArchConfig)
    init: str = "random"
    """'random'; 'vilt:PATH' (both towers from a ViLT, as the paper: a transformers ViLT directory or
    dandelin/ViLT's own .ckpt file; a fusion student takes its embeddings, blocks and pooler);
    'fusion:DIR' (both towers from an exported project fusion teacher); 'timm_bert:DIR'
    (DIR/vit holds a timm ViT, DIR/bert a transformers BERT); 'export:DIR' (an exported student or
    fusion model). A path that does not exist locally may be a Hugging Face Hub id
    (vilt:dandelin/vilt-b32-mlm), read from the local Hub cache or downloaded once."""
    grad_checkpointing: bool = False
    """Activation checkpointing of the tower blocks."""

    def check(self) -> None:
        self.arch.check("student.arch")


@dataclass
class TeacherConfig:
    """The frozen fusion-encoder teacher."""

    kind: Literal["fusion", "hf_vilt", "vilt_ckpt"] = "fusion"
    """'fusion' (the project's own ViLT-style model, an exported folder), 'hf_vilt' (a transformers
    ViLT directory) or 'vilt_ckpt' (a checkpoint file of dandelin/ViLT's own release, e.g.
    vilt_200k_mlm_itm.ckpt: the only form with ViLT's pre-trained ITM head)."""
    path: str = ""
    """The teacher's weights, of teacher.kind: an exported fusion folder, a transformers ViLT
    directory or a ViLT .ckpt file; a folder that does not exist locally may be a Hugging Face Hub
    id (dandelin/vilt-b32-finetuned-vqa). Empty only when no distillation loss is used."""
    arch: ArchConfig = field(default_factory=ArchConfig)
    """Not read for loading: every teacher's shape comes from its files (an export's or a transformers
    config.json, a ViLT checkpoint's weights), except the head count of a 'vilt_ckpt' whose
    hyper_parameters do not name num_heads, which is teacher.arch.heads."""
    itm_head: Literal["auto", "itm", "rank"] = "auto"
    """ITM head of a 'vilt_ckpt' teacher: 'itm' (itm_score, ViLT's pre-training head: 2-way,
    per-pair soft labels), 'rank' (rank_output of a retrieval checkpoint: one score per pair, soft
    labels over each anchor's candidates), 'auto' (rank_output when the file has one)."""
    label_file: str = ""
    """A JSON file naming the teacher's outputs in its order, for a teacher whose files name none
    (a 'vilt_ckpt' VQA teacher): ViLT's own vqa_dict.json ({"0": "net", ...}) or a list of names."""
    zero_stage: Literal[0, 3] | None = None
    """0: a full copy of the frozen teacher on every rank (in the student's dtype); 3: its
    parameters partitioned over the ranks with a ZeRO-3 inference engine (about 1/N each,
    gathered block by block in the forward). None: 3 when train.zero_stage is 3, else 0."""
    param_persistence_threshold: int = 100_000
    """A ZeRO-3 teacher keeps parameters with fewer elements than this whole on every rank
    (LayerNorms, biases), instead of all-gathering them on every forward."""
    label_names: list[str] = field(default_factory=list)
    """The teacher's output names in its output order, for a checkpoint whose config.json has
    none (id2label missing or LABEL_0, LABEL_1, ...); normally read from id2label. Soft labels
    are matched to the student's labels by these names, never by index."""
    min_label_overlap: float = 0.9
    """VQA: the least fraction of the student's answers the teacher must know (the rest are
    left out of the soft-label loss); below it the run is refused before it starts."""

    def check(self) -> None:
        if self.kind == "fusion":
            self.arch.check("teacher.arch")
        if self.label_names and self.label_file:
            raise ConfigError("teacher.label_names and teacher.label_file both name the teacher's outputs: set one")


@dataclass
class LossConfig:
    """Weights of every loss part (docs/METHOD.md); 0 switches a part off."""

    attn_t2i: float = 1.0
    """Text-to-image attention KL(teacher || student)."""
    attn_i2t: float = 1.0
    """Image-to-text attention KL(teacher || student)."""
    soft_label: float = 1.0
    """Prediction distillation from the teacher's logits."""
    ground_truth: float = 0.0
    """Supervised loss on dataset labels (the paper's fine-tuning preset uses 0)."""
    itc: float = 0.0
    """In-batch image-text contrastive loss on the student's pooled embeddings (pre-training)."""
    temperature: float = 1.0
    """Soft-label temperature T."""
    teacher_layer: int = -1
    """Teacher block whose cross-modal attention is distilled (negative counts from the end)."""
    student_layer: int = -1
    """Student block (in both towers) that is matched to teacher_layer."""
    head_map: Literal["per_head", "mean"] = "per_head"
    """'per_head' (teacher and student head counts must match) or 'mean' (average heads)."""
    itc_temperature: float = 0.07
    """Initial temperature of the contrastive logits."""
    itm_negatives: Literal["global", "local"] = "global"
    """ITM hard negatives of the dual encoder: 'global' mines over every rank's micro-batch
    (the chosen rows are fetched with gradient by all_to_all), 'local' over this rank's only."""
    itm_exchange_capacity: float = 2.0
    """'global' mining: each rank may ask each other rank for this many times an even share of
    rows (micro batch / world size), so the exchange has static sizes and no host sync; a
    choice beyond it is replaced by a negative from the rank's own micro-batch (the fraction
    replaced is logged as itm/local_fallback)."""
    attn_mse: float = 0.0
    """DistillVLM: MSE between teacher and student self-attention probabilities of the
    mapped blocks (valid tokens only; heads per loss.head_map). Needs student.kind=fusion."""
    token_nce: float = 0.0
    """DistillVLM: token-wise noise-contrastive loss of the mapped blocks' outputs against a
    queue of teacher token states. Needs student.kind=fusion."""
    layer_map: list[list[int]] = field(default_factory=list)
    """[[teacher_block, student_block], ...] for attn_mse and token_nce (negative counts from
    the end); empty: one pair per student block, student j <- teacher (j+1)*T/S - 1."""
    nce_queue_size: int = 4096
    """Teacher token states kept as negatives (per mapped pair; filled across ranks)."""
    nce_temperature: float = 0.07
    """Temperature of the token-wise contrastive logits (cosine similarity / T)."""
    def check(self) -> None:
        for name in ("attn_t2i", "attn_i2t", "soft_label", "ground_truth", "itc", "attn_mse", "token_nce"):
            if getattr(self, name) < 0:
                raise ConfigError(f"loss.{name} must be >= 0")
        for name in ("temperature", "nce_queue_size", "nce_temperature", "itm_exchange_capacity"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"loss.{name}={getattr(self, name)} must be > 0")
        for i, pair in enumerate(self.layer_map):
            if len(pair) != 2:
                raise ConfigError(f"loss.layer_map[{i}]={pair}: expected [teacher_block, student_block]")
        if not self.distills() and self.ground_truth == 0 and self.itc == 0:
            raise ConfigError("every loss weight is 0: set loss.ground_truth or a distillation weight")


    def distills(self) -> bool:
        return (self.attn_t2i > 0 or self.attn_i2t > 0 or self.soft_label > 0 or self.attn_mse > 0
                or self.token_nce > 0)

    def layerwise(self) -> bool:
        """DistillVLM's layer-to-layer losses are on (fusion student only)."""
        return self.attn_mse > 0 or self.token_nce > 0


@dataclass
class DataConfig:
    """Webdataset input."""

    train_shards: str = ""
    """Shard list: brace patterns, several sources joined with '::'."""
    train_weights: list[float] = field(default_factory=list)
    """Sampling weight per '::' source (empty: uniform)."""
    val_shards: str = ""
    """Held-out shards for evaluation (empty: no evaluation)."""
    resampled: bool = True
    """Infinite weighted resampling of shards (pre-training); False reads epochs in order."""
    num_workers: int = 2
    """Data-loader worker processes per rank."""
    open_shards: int = 4
    """Shards each worker reads interleaved (the mixing that replaces a shuffle buffer)."""
    read_retries: int = 5
    """Retries of a shard read that failed with a passing error (connection, timeout, HTTP 5xx),
    each resuming where the read stopped; then the shard is skipped and counted."""
    retry_backoff_s: float = 1.0
    """Wait before the first retry; it doubles with each retry (at most 30 s)."""
    read_timeout_s: float = 60.0
    """A remote read that returns nothing for this long fails (and is retried)."""
    stall_timeout_s: float = 300.0
    """No batch for this long ends the run with an error naming the shards the workers are
    reading (0 disables; needs data.num_workers > 0)."""
    tokenizer: str = "bert-base-uncased"
    """A transformers tokenizer directory, or a Hugging Face Hub id (its tokenizer files only are
    fetched, once); 'builtin:demo' for the demo vocabulary."""
    max_image_pixels: int = 40_000_000
    """Images larger than this (read from the header, before decode) are skipped."""
    image_resize: Literal["vilt", "stretch"] = "vilt"
    """'vilt': keep the aspect ratio, the shorter side to image_shorter and the longer side at
    most image_longer, both floored to multiples of student.arch.patch_size (ViLT's rule;
    portrait images keep their long side vertical), padding masked; 'stretch': every image
    resized to exactly image_shorter x image_longer (height x width), aspect ratio lost."""
    image_shorter: int = 384
    """Target of the shorter image side in pixels (ViLT: 384)."""
    image_longer: int = 639
    """Cap of the longer image side in pixels. ViLT computes it as int(1333 / 800 * 384) = 639
    (transformers' ViltImageProcessor too; the paper rounds it to 640)."""
    jpeg_draft: bool = False
    """Decode large JPEGs at a reduced DCT scale before the resize: several times faster for
    photos much larger than the target, but the pixels differ slightly from the teacher's own
    preprocessing (off by default)."""
    randaugment_ops: int = 0
    """RandAugment ops per image (torchvision's RandAugment, as DiDE's *_randaug fine-tuning
    configs: 2); 0 disables it. Training split only."""
    randaugment_magnitude: int = 9
    """RandAugment magnitude (0-30; DiDE: 9)."""
    num_answers: int = 3129
    """VQA answer vocabulary size."""
    answer_vocab: str = ""
    """VQA answers: a JSON list of answer strings, or a model directory whose config.json
    id2label lists them (an export, a transformers checkpoint).  Required for VQA, except with
    ``data.tokenizer=builtin:demo``, where empty means the demo's answers."""

    def check(self) -> None:
        if self.read_retries < 0 or self.retry_backoff_s < 0 or self.read_timeout_s <= 0 or self.stall_timeout_s < 0:
            raise ConfigError("data.read_retries / retry_backoff_s must be >= 0, data.read_timeout_s > 0, "
                              "data.stall_timeout_s >= 0")
        if self.randaugment_ops < 0 or not 0 <= self.randaugment_magnitude <= 30:
            raise ConfigError("data.randaugment_ops must be >= 0 and data.randaugment_magnitude in 0..30")
        if self.image_longer < self.image_shorter:
            raise ConfigError(f"data.image_longer={self.image_longer} must be >= "
                              f"data.image_shorter={self.image_shorter}")
        if self.train_weights and self.train_shards and len(self.train_weights) != len(self.train_shards.split("::")):
            raise ConfigError(f"data.train_weights has {len(self.train_weights)} entries but "
                              f"data.train_shards has {len(self.train_shards.split('::'))} sources")


@dataclass
class OptimConfig:
    """AdamW with linear warm-up and linear decay, counted in optimizer steps."""

    lr: float = 1e-4
    """Peak learning rate (reached at the end of the warm-up)."""
    betas: list[float] = field(default_factory=lambda: [0.9, 0.98])
    """AdamW's [beta1, beta2]."""
    weight_decay: float = 0.01
    """AdamW's decoupled weight decay."""
    warmup_fraction: float = 0.1
    """Warm-up length as a fraction of train.max_steps (optimizer steps)."""
    head_lr_mult: float = 1.0
    """LR multiplier of the task heads and fusion module (the paper's VQA recipe uses 10)."""
    min_lr_ratio: float = 0.0
    """Final LR as a fraction of lr."""

    def check(self) -> None:
        if not 0 <= self.warmup_fraction < 1:
            raise ConfigError("optim.warmup_fraction must be in [0, 1)")
        if self.lr <= 0:
            raise ConfigError("optim.lr must be > 0")


@dataclass
class TrainConfig:
    """Loop, batch arithmetic, precision and checkpointing."""

    output_dir: str = "runs/debug"
    """Run directory; re-running with the same directory resumes."""
    task: Task = "itm"
    """'itm' (pre-training distillation), 'vqa', 'nlvr2', 'snli_ve' or 'caption' (a fusion model
    generating captions, section ``caption``)."""
    max_steps: int = 100
    """Optimizer steps."""
    global_batch_size: int = 32
    """Samples per optimizer step over all ranks = micro x accumulation x world size."""
    micro_batch_size: int = 8
    """Samples per forward on one rank."""
    precision: Precision = "fp32"
    """'fp32', 'bf16' or 'fp16' (fp16 uses dynamic loss scaling)."""
    zero_stage: Literal[0, 1, 2, 3] = 1
    """DeepSpeed ZeRO stage 0-3 for the student (the teacher's: teacher.zero_stage)."""
    comm_dtype: Precision = "fp32"
    """Dtype of the gradient reductions across ranks under bf16/fp16 ('fp32', 'bf16', 'fp16'):
    DeepSpeed defaults to the model's dtype, which loses precision when summing over many ranks."""
    grad_accum_dtype: Precision = "fp32"
    """Dtype gradients accumulate in over micro-batches under bf16/fp16, at ZeRO stages 1-3
    (bf16 at stage 1 runs DeepSpeed's BF16 optimizer; its checkpoints are exported through the
    universal conversion). Stage 0 can only accumulate in the model's dtype: with more than
    one micro-batch per step it is refused unless this is set to that dtype."""
    offload: bool = False
    """Offload optimizer state and parameters to CPU (ZeRO-3 only)."""
    ds_config: str = ""
    """A DeepSpeed JSON to start from (e.g. ds_configs/zero2.json); the run config wins."""
    grad_clip: float = 1.0
    """Gradient-norm clipping (0 disables)."""
    seed: int = 0
    """Seed of the initial weights, the data streams and every random draw of a step."""
    log_every: int = 10
    """Steps between metric logs (the loop's only host-device syncs; cross-rank ITM negatives and the
    token queue read their all_to_all / all_gather sizes on the host, one small sync each)."""
    eval_every: int = 0
    """Steps between evaluations on data.val_shards (0: only at the end)."""
    save_every: int = 0
    """Steps between checkpoints (0: only at the end)."""
    keep_last: int = 3
    """Checkpoints kept; older ones are purged."""
    max_bad_steps: int = 5
    """Consecutive non-finite steps that stop the run."""
    collective_timeout_s: int = 600
    """Timeout of every collective; a dead rank stops the others after this long."""
    lease_ttl_s: float = 300.0
    """The run directory's lease expires this long after its holder stopped renewing it (a
    job SIGKILLed or lost with its node); until then a second job on the directory is refused."""
    probe_every: int = 0
    """Steps between attention-map images in TensorBoard (0: never)."""
    eval_batches: int = 0
    """Cap on evaluation batches (0: the whole split; per rank)."""
    eval_retrieval: Literal["rerank", "itc", "itm"] = "rerank"
    """How ITM runs of the dual encoder rank data.val_shards for retrieval recall (the model
    selection score is the mean of text-to-image and image-to-text R@1): 'rerank' (contrastive
    top train.eval_retrieval_k of each query re-scored by the ITM head, as ALBEF/BLIP), 'itc'
    (contrastive cosine only) or 'itm' (the ITM head over every pair)."""
    eval_retrieval_k: int = 128
    """Candidates per query that 'rerank' re-scores (ALBEF/BLIP: 128 on Flickr30K, 256 on COCO);
    at least 10, for recall@10."""
    peak_tflops: float = 0.0
    """Per-device peak FLOP/s (in TFLOP/s) for MFU; 0 looks the GPU model up (none on CPU)."""

    def check(self) -> None:
        if self.offload and self.zero_stage != 3:
            raise ConfigError(f"train.offload=true needs train.zero_stage=3 (got {self.zero_stage}); "
                              "this project offloads parameters and optimizer state together")
        for name in ("max_steps", "global_batch_size", "micro_batch_size", "log_every", "keep_last",
                     "max_bad_steps", "collective_timeout_s", "lease_ttl_s"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"train.{name} must be > 0, got {getattr(self, name)}")
        if self.eval_retrieval_k < 10:
            raise ConfigError(f"train.eval_retrieval_k={self.eval_retrieval_k} must be >= 10: recall@10 needs ten "
                              "candidates per query")
        if self.global_batch_size % self.micro_batch_size:
            raise ConfigError(f"train.global_batch_size={self.global_batch_size} is not a multiple of "
                              f"train.micro_batch_size={self.micro_batch_size}")


CAPTION_METRICS = ("bleu4", "meteor", "rouge_l", "cider")


@dataclass
class CaptionConfig:
    """Captioning (``train.task=caption``, fusion models): Oscar's masked caption-token
    training, and the decoding that evaluation and exports use (docs/METHOD.md)."""

    mask_prob: float = 0.15
    """Fraction of a caption's tokens ([CLS] and [SEP] counted) predicted per sample, rounded,
    at least 1 (Oscar: 0.15)."""
    max_masked: int = 3
    """At most this many tokens of a caption are predicted per sample (Oscar: 3)."""
    beam_size: int = 5
    """Beam width of evaluation and of the exported model's default decoding; 1 is greedy
    (Oscar's COCO evaluation: 5)."""
    max_length: int = 20
    """Most tokens generated after [CLS], [SEP] included (Oscar: 20); below
    student.arch.max_text_len."""
    length_penalty: float = 1.0
    """A finished caption's score is its log-probability / (its length ** length_penalty)."""
    metrics: list[str] = field(default_factory=lambda: list(CAPTION_METRICS))
    """Metrics computed at evaluation, from pycocoevalcap: bleu4, meteor, rouge_l, cider (CIDEr-D,
    the selection score, always computed). The PTB tokenizer and METEOR run on Java."""

    def check(self) -> None:
        if not 0 < self.mask_prob <= 1:
            raise ConfigError(f"caption.mask_prob={self.mask_prob} must be in (0, 1]")
        for name in ("max_masked", "beam_size", "max_length"):
            if getattr(self, name) < 1:
                raise ConfigError(f"caption.{name} must be >= 1, got {getattr(self, name)}")
        unknown = [m for m in self.metrics if m not in CAPTION_METRICS]
        if unknown or "cider" not in self.metrics:
            raise ConfigError(f"caption.metrics={self.metrics}: each one of {list(CAPTION_METRICS)}, and 'cider' "
                              "(the selection score) among them")


@dataclass
class RunConfig:
    student: StudentConfig = field(default_factory=StudentConfig)
    teacher: TeacherConfig = field(default_factory=TeacherConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    caption: CaptionConfig = field(default_factory=CaptionConfig)

    # -- derived values -------------------------------------------------------------------
    def grad_accum_steps(self, world_size: int) -> int:
        """Micro-batches per optimizer step on each rank; checked, never assumed.  The error
        names the keys that make the batch fit this world size."""
        t = self.train
        per_step = t.micro_batch_size * world_size
        if t.global_batch_size % per_step:
            raise ConfigError(
                f"train.global_batch_size={t.global_batch_size} is not a multiple of "
                f"train.micro_batch_size={t.micro_batch_size} x world size {world_size}: set "
                + " or ".join(batch_fixes(t.global_batch_size, t.micro_batch_size, world_size)))
        return t.global_batch_size // per_step

    def teacher_partitioned(self) -> bool:
        """Whether the teacher runs as a ZeRO-3 engine (teacher.zero_stage, resolved)."""
        stage = self.teacher.zero_stage
        return (self.train.zero_stage == 3) if stage is None else stage == 3

    def num_classes(self) -> int:
        if self.train.task == "caption":  # the MLM head's outputs
            return self.student.arch.vocab_size
        return self.data.num_answers if self.train.task == "vqa" else TASK_CLASSES[self.train.task]

    def validate(self, world_size: int | None = None) -> "RunConfig":
        """Each section's own checks, then the ones across sections."""
        for section in (self.student, self.teacher, self.loss, self.data, self.optim, self.train, self.caption):
            section.check()
        if world_size is not None:
            self.grad_accum_steps(world_size)
        self._check_models()
        self._check_images()
        self._check_caption()
        return self

    def _check_models(self) -> None:
        """The losses against the student's kind and the teacher."""
        lo, s, t = self.loss, self.student, self.teacher
        if lo.layerwise() and s.kind != "fusion":
            raise ConfigError("loss.attn_mse/token_nce distil a fusion student block by block; the dual encoder has "
                              "no joint attention: set student.kind=fusion or set those weights to 0")
        if s.kind == "fusion" and lo.itc > 0:
            raise ConfigError("loss.itc needs separate text/image embeddings: set it to 0 for student.kind=fusion")
        if lo.distills() and not t.path:
            raise ConfigError("loss.attn_t2i/attn_i2t/soft_label/attn_mse/token_nce are > 0 but teacher.path is empty: "
                              "set teacher.path or set those weights to 0")
        if self.train.task == "vqa" and self.data.num_answers <= 1:
            raise ConfigError("data.num_answers must be > 1 for train.task=vqa")

    def _check_images(self) -> None:
        """The image sizes against the student's patch size."""
        d, p = self.data, self.student.arch.patch_size
        if d.image_shorter < p:
            raise ConfigError(f"data.image_shorter={d.image_shorter} is smaller than one patch "
                              f"(student.arch.patch_size={p})")
        if d.image_resize == "stretch" and (d.image_shorter % p or d.image_longer % p):
            raise ConfigError(f"data.image_resize=stretch needs data.image_shorter={d.image_shorter} and "
                              f"data.image_longer={d.image_longer} to be multiples of student.arch.patch_size={p}")

    def _check_caption(self) -> None:
        """What captioning needs of the models and the losses."""
        if self.train.task != "caption":
            return
        s, lo = self.student, self.loss
        if s.kind != "fusion":
            raise ConfigError("train.task=caption needs student.kind=fusion: the dual encoder's towers never read "
                              "the image and the caption together, so it cannot generate")
        if lo.attn_t2i > 0 or lo.attn_i2t > 0:
            raise ConfigError("loss.attn_t2i/attn_i2t are DiDE's cross-modal attention, which the captioning seq2seq "
                              "mask does not have (image tokens never see the caption): set them to 0 and distil "
                              "with loss.attn_mse / loss.token_nce")
        if lo.distills() and self.teacher.kind != "fusion":
            raise ConfigError("teacher.kind=hf_vilt cannot teach captioning (transformers' ViLT has no seq2seq "
                              "mask): train a caption teacher with student.kind=fusion train.task=caption, "
                              "optionally from its weights (student.init=vilt:DIR), and use teacher.kind=fusion")
        if self.caption.max_length >= s.arch.max_text_len:
            raise ConfigError(f"caption.max_length={self.caption.max_length} must be below "
                              f"student.arch.max_text_len={s.arch.max_text_len} (the [CLS] and the [MASK] being "
                              "predicted take text positions too)")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)


def batch_fixes(global_batch: int, micro: int, world: int) -> list[str]:
    """Overrides that make the batch arithmetic fit ``world`` ranks: the largest micro-batch
    (at most ``micro``) that keeps the global batch, else the smallest global batch above it
    that ``world`` ranks can share, with such a micro-batch."""
    def largest_micro(g: int) -> int:
        return next(m for m in range(min(micro, g // world), 0, -1) if g % (m * world) == 0)
    if global_batch % world == 0:
        m = largest_micro(global_batch)
        k = global_batch // (m * world)
        return [f"train.micro_batch_size={m} (the same global batch, {k} micro-batch{'es' if k > 1 else ''} "
                "per step)"]
    g = -(-global_batch // world) * world
    return [f"train.global_batch_size={g} train.micro_batch_size={largest_micro(g)} (a larger global batch: "
            "retune optim.lr)"]


# -- building from dicts ----------------------------------------------------------------------

def _is_dataclass_type(tp: Any) -> bool:
    return isinstance(tp, type) and dataclasses.is_dataclass(tp)


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Check ``value`` against the annotation ``tp`` (int, float, str, bool, Literal[...] choices,
    list[...], optional)."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        errors = []
        for arg in typing.get_args(tp):
            if arg is type(None) and value is None:
                return None
            try:
                return _coerce(value, arg, key)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(errors[0])
    if origin is list:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: expected a list, got {type(value).__name__} {value!r}")
        (arg,) = typing.get_args(tp) or (Any,)
        return [_coerce(v, arg, f"{key}[{i}]") for i, v in enumerate(value)]
    if origin is Literal:
        choices = typing.get_args(tp)
        if value in choices and type(value) in {type(c) for c in choices}:
            return value
        raise ConfigError(f"{key}={value!r} must be one of {', '.join(repr(c) for c in choices)}")
    if tp is Any:
        return value
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{key}: expected true/false, got {type(value).__name__} {value!r}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise ConfigError(f"{key}: expected an integer, got {type(value).__name__} {value!r}")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML 1.1 reads '1e-3' (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
        raise ConfigError(f"{key}: expected a number, got {type(value).__name__} {value!r}")
    if tp is str:
        if isinstance(value, str):
            return value
        raise ConfigError(f"{key}: expected a string, got {type(value).__name__} {value!r}")
    raise ConfigError(f"{key}: unsupported annotation {tp}")


def _build(cls: type, data: dict, prefix: str = "") -> Any:
    if not isinstance(data, dict):
        raise ConfigError(f"{prefix or 'config'}: expected a mapping, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, value in data.items():
        dotted = f"{prefix}{key}"
        if key not in names:
            import difflib
            close = difflib.get_close_matches(key, names, n=1)
            hint = f"did you mean {prefix + close[0]!r}? " if close else ""
            raise ConfigError(f"unknown config key {dotted!r} ({hint}valid keys here: {sorted(names)})")
        tp = hints[key]
        kwargs[key] = _build(tp, value, dotted + ".") if _is_dataclass_type(tp) else _coerce(value, tp, dotted)
    return cls(**kwargs)


def _merge(base: dict, delta: dict) -> dict:
    out = dict(base)
    for k, v in delta.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def parse_override(text: str) -> dict:
    """``a.b.c=value`` -> {'a': {'b': {'c': value}}}; the value is parsed as YAML."""
    if "=" not in text:
        raise ConfigError(f"override {text!r} is not of the form key=value")
    key, raw = text.split("=", 1)
    value = yaml.safe_load(raw) if raw != "" else ""
    out: dict = value
    for part in reversed(key.strip().split(".")):
        out = {part: out}
    return out


def resolve_path(name: str | os.PathLike) -> Path:
    """A config file path, or the name of a shipped config (``debug`` -> configs/debug.yaml)."""
    p = Path(name)
    if p.exists():
        return p
    shipped = CONFIG_DIR / f"{name}.yaml"
    if shipped.exists():
        return shipped
    raise ConfigError(f"config file {str(name)!r} not found (shipped configs: {shipped_configs()})")


def shipped_configs() -> list[str]:
    return sorted(p.stem for p in CONFIG_DIR.glob("*.yaml"))


def load_yaml_chain(path: Path) -> dict:
    """Read a YAML delta; ``base: NAME`` inherits another (shipped or relative) file."""
    data = yaml.safe_load(path.read_text()) or {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: top level must be a mapping")
    base = data.pop("base", None)
    if base:
        rel = path.parent / f"{base}.yaml"
        data = _merge(load_yaml_chain(rel if rel.exists() else resolve_path(base)), data)
    return data


def load_config(path: str | os.PathLike | None = None, overrides: list[str] | tuple = (),
                world_size: int | None = None, base: dict | None = None) -> RunConfig:
    """Defaults <- ``base`` (e.g. what an exported model says of itself) <- YAML file <-
    overrides, validated. Raises ConfigError naming the key."""
    data: dict = _merge(base or {}, load_yaml_chain(resolve_path(path)) if path else {})
    for text in overrides:
        data = _merge(data, parse_override(text))
    cfg = _build(RunConfig, data)
    return cfg.validate(world_size)


def config_from_dict(data: dict) -> RunConfig:
    return _build(RunConfig, data).validate()


def save_resolved(cfg: RunConfig, run_dir: str | os.PathLike, ds_config: dict | None = None) -> None:
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_text(run_dir / "config.yaml", cfg.to_yaml())
    if ds_config is not None:
        atomic_write_text(run_dir / "ds_config.json", json.dumps(ds_config, indent=2))
