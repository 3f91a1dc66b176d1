"""Typed run configuration: a YAML file, overridden by flags named exactly as in Megatron-LM.

Each field's flag is `--` + the field name with `_` -> `-` (so `tensor_model_parallel_size` is
`--tensor-model-parallel-size`, as in Megatron-LM's arguments.py). YAML groups fields by section
(`parallel:`, `model:`, `training:`, `rl:`); flags are flat because Megatron's are.
`validate()` runs before any process group exists and raises ConfigError naming the flag and the fix.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import os
import typing
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from megatron_a3po.errors import ConfigError, flag_name  # noqa: F401  (re-exported: C.ConfigError, C.flag_name)
from megatron_a3po.flag_parser import FlagParser
from megatron_a3po.rl_config import RLConfig


@dataclass
class ParallelConfig:
    tensor_model_parallel_size: int = 1
    pipeline_model_parallel_size: int = 1
    num_layers_per_virtual_pipeline_stage: int | None = None
    context_parallel_size: int = 1
    sequence_parallel: bool = False


@dataclass
class ModelConfig:
    hf_path: str | None = None  # HF checkpoint dir (config.json, tokenizer, safetensors)
    tiny_model: str | None = None  # "llama" | "qwen2" | "qwen3": build a tiny random model (tests, demo)
    make_vocab_size_divisible_by: int = 128
    bf16: bool = False
    fp16: bool = False
    fp8_format: str | None = None  # e4m3 | hybrid (Transformer Engine + CUDA only)
    fp8_recipe: str = "delayed"  # delayed | tensorwise | blockwise
    recompute_granularity: str | None = None  # full | selective
    transformer_impl: str = "auto"  # auto (TE with CUDA, local otherwise) | transformer_engine | local


@dataclass
class TrainingConfig:
    micro_batch_size: int = 1  # padded rows per micro-batch (unused with max_tokens_per_gpu)
    # Packed (THD) micro-batches of at most this many tokens per GPU, DP ranks balanced by compute (slime's names)
    max_tokens_per_gpu: int = 0  # 0: padded micro-batches of micro_batch_size rows
    log_probs_max_tokens_per_gpu: int = 0  # the forward-only old-log-prob pass; 0: max_tokens_per_gpu
    global_batch_size: int = 8
    lr: float = 1e-6
    min_lr: float = 0.0
    lr_warmup_iters: int = 0
    weight_decay: float = 0.0
    clip_grad: float = 1.0
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    use_distributed_optimizer: bool = False
    seed: int = 1234
    train_iters: int = 3
    load: str | None = None
    ref_load: str | None = None  # KL reference (--kl-coef > 0): HF dir or converted checkpoint; default: the start
    save: str | None = None
    save_interval: int = 0
    keep_last_checkpoints: int = 0  # retention: keep the newest K step checkpoints (0: keep all)
    keep_checkpoint_interval: int = 0  # ... and every N-th step's as well (0: none extra)
    allow_config_change: bool = False  # resume although the algorithm or model settings changed
    # grad buffers and optimizer state off the GPU while vLLM generates (its KV cache gets that memory)
    offload_train_during_rollout: bool = False


@dataclass
class Config:
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    training: TrainingConfig = field(default_factory=TrainingConfig)
    rl: RLConfig = field(default_factory=RLConfig)

    def sections(self) -> dict[str, object]:
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def _field_types(section_cls) -> dict[str, type]:
    hints = typing.get_type_hints(section_cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(section_cls)}


def _base_type(tp) -> type:
    args = [a for a in typing.get_args(tp) if a is not type(None)]
    return args[0] if args else tp


def _coerce(value, tp, where: str):
    base = _base_type(tp)
    if value is None:
        if type(None) in typing.get_args(tp):
            return None
        raise ConfigError(f"{where} must not be null")
    if isinstance(value, dict):  # a component with its settings, e.g. rl.shaper: {name: a3po, ratio: 0.2}
        if dict not in typing.get_args(tp):
            raise ConfigError(f"{where}: expected a single {base.__name__}, got a mapping {value!r}")
        return dict(value)
    try:
        if base is bool:  # strict: true/false (or 1/0, yes/no, on/off); a 2 or 0.5 is a mistake, not a truth value
            if isinstance(value, bool):
                return value
            if isinstance(value, str) and value.lower() in ("1", "true", "yes", "on"):
                return True
            if isinstance(value, str) and value.lower() in ("0", "false", "no", "off"):
                return False
            if type(value) is int and value in (0, 1):
                return bool(value)
            raise ValueError(value)
        if base is int and isinstance(value, float) and not value.is_integer():
            raise ValueError(value)
        return base(value)
    except (TypeError, ValueError):
        raise ConfigError(f"{where}: {value!r} is not a valid {base.__name__}") from None


def load_yaml(path: str | Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"--config {path}: file not found")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except (OSError, UnicodeDecodeError) as err:
        raise ConfigError(f"--config {path}: cannot read it ({err}); give a readable UTF-8 YAML file") from None
    except yaml.YAMLError as err:  # one line: where (1-based, as editors count) and what, not a traceback
        mark = getattr(err, "problem_mark", None)
        where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark is not None else ""
        problem = " ".join(str(getattr(err, "problem", None) or err).split())
        context = getattr(err, "context", None)
        raise ConfigError(f"--config {path}: invalid YAML at {where}{problem}"
                          f"{f' ({context})' if context else ''}; fix the file's syntax there") from None
    if not isinstance(data, dict):
        raise ConfigError(f"--config {path}: expected a mapping of sections (parallel:, model:, training:)")
    return data


def from_dict(data: dict, source: str = "config", cfg: Config | None = None) -> Config:
    """Apply a YAML mapping on top of `cfg` (a fresh Config by default)."""
    cfg = cfg or Config()
    sections = cfg.sections()
    for section_name, values in data.items():
        if section_name not in sections:
            raise ConfigError(f"{source}: unknown section {section_name!r}; known: {', '.join(sections)}")
        section = sections[section_name]
        types = _field_types(type(section))
        aliases = getattr(type(section), "YAML_ALIASES", {})
        if not isinstance(values or {}, dict):
            raise ConfigError(f"{source}: section {section_name}: must be a mapping of key: value lines, got "
                              f"{type(values).__name__} {values!r:.60}")
        for key, value in (values or {}).items():
            if not isinstance(key, str):
                raise ConfigError(f"{source}: {section_name}: key {key!r} is not a name; known: {', '.join(types)}")
            key = aliases.get(key.replace("-", "_"), key.replace("-", "_"))
            if key not in types:
                raise ConfigError(f"{source}: unknown key {section_name}.{key}; known: {', '.join(types)}")
            setattr(section, key, _coerce(value, types[key], f"{source}: {section_name}.{key} ({flag_name(key)})"))
    return cfg


def add_flags(parser: argparse.ArgumentParser, cfg_cls=Config) -> None:
    """One flag per field, Megatron-LM spelling; defaults None so only given flags override the YAML."""
    for section_name, section_cls in typing.get_type_hints(cfg_cls).items():
        group = parser.add_argument_group(section_name)
        for name, tp in _field_types(section_cls).items():
            if _base_type(tp) is bool:
                group.add_argument(flag_name(name), dest=name, action=argparse.BooleanOptionalAction, default=None)
            else:
                group.add_argument(flag_name(name), dest=name, default=None, metavar=name.upper())


def apply_flags(cfg: Config, args: argparse.Namespace) -> Config:
    for section in cfg.sections().values():
        for name, tp in _field_types(type(section)).items():
            value = getattr(args, name, None)
            if value is not None:
                setattr(section, name, _coerce(value, tp, flag_name(name)))
    return cfg


def parse_args(argv: list[str] | None = None, description: str = "") -> tuple[Config, argparse.Namespace]:
    parser = FlagParser(description=description)
    parser.add_argument("--config", action="append", default=[],
                        help="YAML config; repeat to overlay (later files win, e.g. a paper setup then a baseline); "
                             "flags override all")
    parser.add_argument("--dry-run", action="store_true", help="print the resolved config and exit")
    add_flags(parser)
    args = parser.parse_args(argv)
    cfg = Config()
    for path in args.config:
        cfg = from_dict(load_yaml(path), source=path, cfg=cfg)
    return expand_run_names(apply_flags(cfg, args)), args


RUN_NAMED = (("training", "save"), ("rl", "output_dir"), ("rl", "wandb_run_name"), ("rl", "export_hf"))


def expand_run_names(cfg: Config) -> Config:
    """`{algorithm}` in --save / --output-dir / --wandb-run-name / --export-hf becomes the run's algorithm, so a
    baseline overlay on a paper config writes to its own directories and wandb run."""
    sections = cfg.sections()
    for section, field_name in RUN_NAMED:
        value = getattr(sections[section], field_name)
        if isinstance(value, str) and "{algorithm}" in value:
            setattr(sections[section], field_name, value.replace("{algorithm}", cfg.rl.algorithm))
    return cfg


MODEL_SOURCE_HINT = ("give a model, exactly one model source: --load MEGATRON_CKPT (from a3po-convert, or a training "
                     "checkpoint), --hf-path HF_DIR, or --tiny-model llama|qwen2|qwen3 (a resumed --load may come with "
                     "the --hf-path or --tiny-model it started from: the checkpoint's model must match)")


def check_model_flags(cfg: Config) -> None:
    """Exactly one model source is named, and the paths given exist (job.model_source reads them)."""
    m, t = cfg.model, cfg.training
    if (m.hf_path is not None and m.tiny_model is not None) or not (m.hf_path or m.tiny_model or t.load):
        raise ConfigError(MODEL_SOURCE_HINT)
    if m.hf_path is not None and not Path(m.hf_path, "config.json").is_file():
        raise ConfigError(f"--hf-path {m.hf_path}: no config.json there; point it at a Hugging Face model dir")
    if t.load is not None and not Path(t.load).exists():
        raise ConfigError(f"--load {t.load}: path does not exist; convert an HF model with `a3po-convert "
                          "hf-to-megatron`, or drop --load to start fresh")


def validate(cfg: Config, world_size: int | None = None, arch=None) -> None:
    """Check everything that can be checked before process groups exist. `arch` is a models.ModelArch."""
    if world_size is None:
        world_size = int(os.environ.get("WORLD_SIZE", "1"))
    p, m, t = cfg.parallel, cfg.model, cfg.training
    tp, pp, cp = p.tensor_model_parallel_size, p.pipeline_model_parallel_size, p.context_parallel_size
    for flag, value in (("--tensor-model-parallel-size", tp), ("--pipeline-model-parallel-size", pp),
                        ("--context-parallel-size", cp), ("--micro-batch-size", t.micro_batch_size),
                        ("--global-batch-size", t.global_batch_size)):
        if value < 1:
            raise ConfigError(f"{flag} must be >= 1 (got {value})")
    if world_size % (tp * pp * cp):
        raise ConfigError(
            f"world size {world_size} is not divisible by --tensor-model-parallel-size ({tp}) x "
            f"--pipeline-model-parallel-size ({pp}) x --context-parallel-size ({cp}) = {tp * pp * cp}; "
            f"launch a multiple of {tp * pp * cp} ranks (torchrun --nproc-per-node) or shrink the parallel sizes"
        )
    dp = world_size // (tp * pp * cp)
    if cp > 1:  # megatron's attention expects each CP rank's slice of every sequence; nothing here cuts them
        raise ConfigError("--context-parallel-size > 1 is not supported yet: the trainer does not split sequences "
                          "over context-parallel ranks (padded or packed). For long sequences use "
                          "--tensor-model-parallel-size with --sequence-parallel and --max-tokens-per-gpu")
    if p.sequence_parallel and tp == 1:
        raise ConfigError("--sequence-parallel needs --tensor-model-parallel-size > 1; drop the flag or raise TP")
    if not t.max_tokens_per_gpu and t.global_batch_size % (t.micro_batch_size * dp):
        raise ConfigError(
            f"--global-batch-size {t.global_batch_size} must be divisible by --micro-batch-size "
            f"{t.micro_batch_size} x data-parallel size {dp}; choose a multiple of {t.micro_batch_size * dp}"
        )
    validate_numbers(cfg)
    if t.lr < 0 or t.min_lr < 0 or t.min_lr > t.lr:
        raise ConfigError(f"--lr {t.lr} / --min-lr {t.min_lr}: need 0 <= --min-lr <= --lr")
    if t.clip_grad < 0:
        raise ConfigError(f"--clip-grad must be >= 0 (0 disables clipping), got {t.clip_grad}")
    if m.bf16 and m.fp16:
        raise ConfigError("--bf16 and --fp16 are mutually exclusive; pass one")
    if t.offload_train_during_rollout and not (m.bf16 or m.fp16):
        # megatron-core's MegatronOptimizer.offload_to_cpu moves the inner optimizer's parameters: separate fp32
        # main params under bf16/fp16, but the model's own weights (or views of them) in fp32 training
        raise ConfigError("--offload-train-during-rollout needs --bf16 or --fp16 (in fp32 the optimizer's "
                          "parameters are the model's weights); add --bf16 or pass --no-offload-train-during-rollout")
    check_model_flags(cfg)
    if t.ref_load is not None:
        if cfg.rl.kl_coef <= 0:
            raise ConfigError("--ref-load is the reference policy of the KL penalty; it needs --kl-coef > 0")
        if not (Path(t.ref_load, "config.json").is_file() or Path(t.ref_load, "a3po_metadata.json").is_file()):
            raise ConfigError(f"--ref-load {t.ref_load}: neither an HF model dir (config.json) nor a converted "
                              "Megatron checkpoint (a3po_metadata.json, from a3po-convert hf-to-megatron)")
    if t.save_interval and not t.save:
        raise ConfigError("--save-interval needs --save DIR")
    if m.recompute_granularity not in (None, "full", "selective"):
        raise ConfigError(f"--recompute-granularity must be full or selective, got {m.recompute_granularity!r}")
    if m.transformer_impl not in ("auto", "transformer_engine", "local"):
        raise ConfigError(f"--transformer-impl must be auto, transformer_engine or local, got {m.transformer_impl!r}")
    _validate_fp8(m)
    _validate_packing(cfg)
    _check_fp8_usable(m)
    if arch is not None:
        validate_against_arch(cfg, arch)


# (section, field) -> (low, high, low inclusive, high inclusive): the ranges of numeric flags not checked elsewhere
_RANGES = {
    ("training", "weight_decay"): (0, math.inf, True, False), ("training", "adam_beta1"): (0, 1, True, False),
    ("training", "adam_beta2"): (0, 1, True, False), ("training", "lr_warmup_iters"): (0, math.inf, True, False),
    ("training", "seed"): (0, 2**63, True, False), ("training", "save_interval"): (0, math.inf, True, False),
    ("training", "keep_last_checkpoints"): (0, math.inf, True, False),
    ("training", "keep_checkpoint_interval"): (0, math.inf, True, False),
    ("parallel", "num_layers_per_virtual_pipeline_stage"): (1, math.inf, True, False),
    ("model", "make_vocab_size_divisible_by"): (1, math.inf, True, False),
    ("rl", "clip_ratio_low"): (0, 1, True, False), ("rl", "clip_ratio_high"): (0, math.inf, True, False),
    ("rl", "dual_clip_c"): (1, math.inf, False, False), ("rl", "eval_temperature"): (0, math.inf, True, False),
    ("rl", "gpu_memory_utilization"): (0, 1, False, True), ("rl", "rollout_kv_cache_gb"): (1, math.inf, True, False),
    ("rl", "a3po_rho_pos"): (0, math.inf, False, False),
    ("rl", "a3po_rho_neg"): (0, math.inf, False, False), ("rl", "a3po_alpha_pos"): (0, math.inf, True, False),
    ("rl", "a3po_alpha_neg"): (0, math.inf, True, False), ("rl", "rollout_top_k"): (-1, math.inf, True, False),
}


def validate_numbers(cfg: Config) -> None:
    """Every float flag is finite (nan / inf pass most comparisons unnoticed); the listed ones are in range."""
    for section_name, section in cfg.sections().items():
        for f in dataclasses.fields(section):
            value = getattr(section, f.name)
            if isinstance(value, float) and not math.isfinite(value):
                raise ConfigError(f"{flag_name(f.name)} must be a finite number, got {value}")
            bounds = _RANGES.get((section_name, f.name))
            if bounds is None or value is None:
                continue
            low, high, low_in, high_in = bounds
            if not ((low <= value if low_in else low < value) and (value <= high if high_in else value < high)):
                upper = "inf" if high == math.inf else high
                interval = f"{'[' if low_in else '('}{low}, {upper}{']' if high_in else ')'}"
                raise ConfigError(f"{flag_name(f.name)} must be in {interval}, got {value}")
    if cfg.rl.rollout_top_k == 0:
        raise ConfigError("--rollout-top-k must be -1 (off) or >= 1, got 0")


def _validate_fp8(m: ModelConfig) -> None:
    from megatron_a3po.packing import FP8_RECIPES

    if m.fp8_format is None:
        return
    if m.fp8_format not in ("e4m3", "hybrid"):
        raise ConfigError(f"--fp8-format must be e4m3 or hybrid, got {m.fp8_format!r}")
    if m.fp8_recipe not in FP8_RECIPES:
        raise ConfigError(f"--fp8-recipe must be {', '.join(FP8_RECIPES[:-1])} or {FP8_RECIPES[-1]}, "
                          f"got {m.fp8_recipe!r}")


def _check_fp8_usable(m: ModelConfig) -> None:
    """After the packing checks, so a CPU box still reports FP8's token-budget rules."""
    from megatron_a3po.models.builder import transformer_engine_usable

    if m.fp8_format is None:
        return
    if not transformer_engine_usable():
        raise ConfigError(
            "--fp8-format needs Transformer Engine and a CUDA GPU, and this machine has neither usable; "
            "drop --fp8-format (train in --bf16 or fp32) or run in the Docker image on GPUs"
        )
    if m.transformer_impl == "local":
        raise ConfigError("--fp8-format needs --transformer-impl transformer_engine (or auto)")
    if not (m.bf16 or m.fp16):
        raise ConfigError("--fp8-format needs --bf16 (FP8 GEMMs with bf16 params and activations)")


def _validate_packing(cfg: Config) -> None:
    from megatron_a3po.packing import round_up, token_multiple_of

    t, p, rl = cfg.training, cfg.parallel, cfg.rl
    if t.max_tokens_per_gpu < 0 or t.log_probs_max_tokens_per_gpu < 0:
        raise ConfigError("--max-tokens-per-gpu and --log-probs-max-tokens-per-gpu must be >= 0 (0: off)")
    if not t.max_tokens_per_gpu:
        if t.log_probs_max_tokens_per_gpu:
            raise ConfigError("--log-probs-max-tokens-per-gpu needs --max-tokens-per-gpu (packed micro-batches)")
        return
    multiple = token_multiple_of(cfg)  # the one rule packs and padded micro-batches follow (packing.py)
    fp8 = cfg.model.fp8_format is not None
    why = (f"a multiple of {multiple}, FP8's token rule at TP={p.tensor_model_parallel_size}"
           f"{' with --sequence-parallel' if p.sequence_parallel else ''}" if fp8 else "a multiple of TP")
    longest = round_up(rl.max_prompt_length + rl.max_response_length - 1, multiple)
    for flag, value in (("--max-tokens-per-gpu", t.max_tokens_per_gpu),
                        ("--log-probs-max-tokens-per-gpu", t.log_probs_max_tokens_per_gpu)):
        if value and value < longest:
            raise ConfigError(f"{flag} {value} cannot hold the longest sequence ({longest} tokens: --max-prompt-length "
                              f"+ --max-response-length - 1{f', rounded up to {why}' if multiple > 1 else ''}"
                              f"); raise it to at least {longest}")
        if value and fp8 and value % multiple:  # a pack is rounded up to the multiple: the budget must be one
            raise ConfigError(f"{flag} {value} is not {why} (packing.token_multiple: Transformer Engine's FP8 GEMMs "
                              f"need it); set it to {value // multiple * multiple} or {round_up(value, multiple)}")


def validate_against_arch(cfg: Config, arch) -> None:
    p = cfg.parallel
    tp, pp = p.tensor_model_parallel_size, p.pipeline_model_parallel_size
    if arch.num_attention_heads % tp:
        raise ConfigError(
            f"--tensor-model-parallel-size {tp} must divide the model's {arch.num_attention_heads} attention "
            f"heads; use one of {_divisors(arch.num_attention_heads)}"
        )
    if arch.num_query_groups % tp:
        raise ConfigError(
            f"--tensor-model-parallel-size {tp} must divide the model's {arch.num_query_groups} query groups "
            f"(num_key_value_heads); use one of {_divisors(arch.num_query_groups)}"
        )
    if arch.num_layers % pp:
        raise ConfigError(
            f"--pipeline-model-parallel-size {pp} must divide the model's {arch.num_layers} layers; "
            f"use one of {_divisors(arch.num_layers)}"
        )
    vpp_layers = p.num_layers_per_virtual_pipeline_stage
    if vpp_layers is not None:
        if pp == 1:
            raise ConfigError("--num-layers-per-virtual-pipeline-stage needs --pipeline-model-parallel-size > 1")
        if (arch.num_layers // pp) % vpp_layers:
            raise ConfigError(
                f"--num-layers-per-virtual-pipeline-stage {vpp_layers} must divide the {arch.num_layers // pp} "
                f"layers per pipeline stage; use one of {_divisors(arch.num_layers // pp)}"
            )


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def virtual_pipeline_size(cfg: Config, num_layers: int) -> int | None:
    vpp_layers = cfg.parallel.num_layers_per_virtual_pipeline_stage
    if vpp_layers is None:
        return None
    return num_layers // cfg.parallel.pipeline_model_parallel_size // vpp_layers
