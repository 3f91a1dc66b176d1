"""One resolved job: a parsed Config + the world size -> everything a run needs to know, checked once.

`resolve_job(cfg, world_size)` runs every check that can run before a process group exists, in one ordered pass,
and returns a read-only `Job`; training (train.py / rl_job.py), SFT and pre-flight consume it, the planner and
the converter use its `model_source`. The pass:
  1. numbers are finite and in range (nan / inf pass most later comparisons unnoticed);
  2. RL batch sizes, named by the RL flags, then Megatron's --global-batch-size / --train-iters derived from them
     (in RL the optimizer-step batch is a PPO mini-batch and the LR schedule runs over every update of every step);
  3. --load: a converted checkpoint (start weights), a training checkpoint or a --save dir (resume);
  4. the model (ModelSource: architecture, HF config, tokenizer files) from exactly one source;
  5. resuming: the checkpoint's run is this run (or --allow-config-change);
  6. in RL, the rollout context (--max-prompt-length + --max-response-length) against the model's;
  7. everything else against the layout and the architecture (config.validate).
The Config given is not modified: `job.cfg` is the resolved copy. `check_inputs(job)` (--dry-run, pre-flight)
then reads what the job reads later on its ranks: the tokenizer, every dataset row, the reward function.
"""

from __future__ import annotations

import copy
import os
import sys
from dataclasses import dataclass
from pathlib import Path

from megatron_a3po import config as C
from megatron_a3po.errors import ConfigError


@dataclass(frozen=True)
class ModelSource:
    arch: object  # models.families.ModelArch
    hf_config: dict
    tokenizer_dir: Path | None  # None: the tiny model's built-in tokenizer
    origin: str  # where the architecture came from, for reports


@dataclass(frozen=True)
class Layout:
    world_size: int
    tp: int
    pp: int
    cp: int
    vpp: int | None  # virtual pipeline chunks per stage

    @property
    def dp(self) -> int:
        return self.world_size // (self.tp * self.pp * self.cp)

    def sizes(self):
        from megatron_a3po.parallel import ParallelSizes

        return ParallelSizes(self.tp, self.pp, self.vpp, self.cp)


@dataclass(frozen=True)
class Job:
    cfg: C.Config  # resolved copy: derived batch sizes, --load pointing at the checkpoint dir itself
    layout: Layout
    model: ModelSource
    resume_dir: Path | None  # a training checkpoint to resume from (None: a fresh run)
    resume_state: dict | None  # its train state (step, config, ...)
    resume_warnings: tuple[str, ...] = ()

    @property
    def arch(self):
        return self.model.arch

    @property
    def resuming(self) -> bool:
        return self.resume_dir is not None

    @property
    def rollout_max_model_len(self) -> int:
        """vLLM's max_model_len for the rollout engine (rollout_max_model_len)."""
        return rollout_max_model_len(self.cfg)

    @property
    def start_checkpoint(self) -> Path | None:
        """A converted Megatron checkpoint to start a fresh run from (not a resume)."""
        load = self.cfg.training.load
        return Path(load) if load and not self.resuming else None

    def describe(self) -> str:
        from megatron_a3po.rl_config import resolve_algorithm

        lay = self.layout
        return (f"layout: world={lay.world_size} TP={lay.tp} PP={lay.pp} CP={lay.cp} DP={lay.dp} rollout "
                f"TP={self.cfg.rl.rollout_tensor_parallel_size}; algorithm {self.cfg.rl.algorithm} -> "
                f"{resolve_algorithm(self.cfg.rl).describe()}; model {self.model.origin}"
                + (f"; resuming from {self.resume_dir}" if self.resuming else ""))


def world_size_from_env() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def model_source(cfg: C.Config, *, use_load: bool = True, known_archs: bool = False) -> ModelSource:
    """The run's model, from exactly one place, in this order: --load (the metadata every converted or training
    checkpoint carries), --hf-path (its config.json; with `known_archs`, for planning a cluster job on a machine
    without the model, the table of paper architectures), --tiny-model."""
    from megatron_a3po.models import families, tiny

    load, hf = cfg.training.load if use_load else None, cfg.model.hf_path
    if load:
        from megatron_a3po.models.megatron_ckpt import HF_FILES_DIR, MegatronCheckpointError, read_meta

        try:
            meta = read_meta(load)
            return ModelSource(meta.arch, meta.hf_config, Path(load) / HF_FILES_DIR, f"{load} (checkpoint metadata)")
        except (OSError, MegatronCheckpointError):
            if not known_archs:
                raise
    if hf and Path(hf, "config.json").is_file():
        arch, hf_cfg = families.load_hf_arch(hf)
        return ModelSource(arch, hf_cfg, Path(hf), f"{hf}/config.json")
    if hf and known_archs:
        from megatron_a3po.models.known_archs import PAPER_MODELS

        if Path(hf).name in PAPER_MODELS:
            hf_cfg = dict(PAPER_MODELS[Path(hf).name])
            return ModelSource(families.arch_from_hf_config(hf_cfg), hf_cfg, None,
                               f"known architecture of {Path(hf).name}")
    if hf and known_archs:
        raise ConfigError(f"no architecture for --hf-path {hf}: no config.json there and not one of the known models "
                          "(megatron_a3po/models/known_archs.py); point --hf-path at a dir with the model's config.json")
    if hf:
        raise ConfigError(f"--hf-path {hf}: no config.json there; point it at a Hugging Face model dir")
    if cfg.model.tiny_model:
        hf_cfg = tiny.hf_config(cfg.model.tiny_model).to_dict()
        return ModelSource(families.arch_from_hf_config(hf_cfg), hf_cfg, None, f"tiny {cfg.model.tiny_model}")
    raise ConfigError(C.MODEL_SOURCE_HINT)


def layout_of(cfg: C.Config, world_size: int, num_layers: int | None = None) -> Layout:
    p = cfg.parallel
    vpp = C.virtual_pipeline_size(cfg, num_layers) if num_layers is not None else None
    return Layout(world_size, p.tensor_model_parallel_size, p.pipeline_model_parallel_size,
                  p.context_parallel_size, vpp)


def resolve_job(cfg: C.Config, world_size: int, *, rl: bool = True) -> Job:
    """The module docstring's pass. `rl=False` (SFT): no RL settings, --train-iters and batch sizes as given."""
    from megatron_a3po import checkpointing

    cfg = copy.deepcopy(cfg)
    C.check_model_flags(cfg)
    C.validate_numbers(cfg)
    if rl:
        _derive_rl_batches(cfg, world_size)
    resume_dir = resume_state = None
    if cfg.training.load:
        ckpt, resuming = checkpointing.resolve_load_dir(cfg.training.load)
        cfg.training.load = str(ckpt)
        if resuming:
            resume_dir, resume_state = ckpt, checkpointing.read_train_state(ckpt)
    model = model_source(cfg)
    warnings: list[str] = []
    if resume_state is not None:
        warnings = _check_resume(cfg, resume_dir, resume_state)
        if os.environ.get("RANK", "0") == "0":
            for warning in warnings:
                print(f"warning: resuming with a changed setting ({warning}); the resumed run is not an exact "
                      "continuation", file=sys.stderr)
    if rl:  # before validate: its token-budget advice would follow from lengths the model cannot take anyway
        check_context_length(cfg, model)
    C.validate(cfg, world_size=world_size, arch=model.arch)
    return Job(cfg, layout_of(cfg, world_size, model.arch.num_layers), model, resume_dir, resume_state,
               tuple(warnings))


def rollout_max_model_len(cfg: C.Config) -> int:
    """The rollout engine's max_model_len: the longest prompt plus the longest response, no slack. vLLM accepts
    a prompt shorter than max_model_len (vllm/v1/engine/input_processor.py, InputProcessor._validate_prompt_len)
    and ends a request when prompt + output tokens reach it (vllm/v1/core/sched/utils.py, check_stop), so a
    prompt of <= --max-prompt-length tokens always gets its --max-response-length tokens."""
    return cfg.rl.max_prompt_length + cfg.rl.max_response_length


# The HF config keys vLLM reads a context length from, the smallest present winning, and the RoPE types whose
# `factor` it does NOT apply on top (vllm/transformers_utils/model_arch_config_convertor.py
# derive_max_model_len_and_key; vllm/config/model.py _get_and_verify_max_len).
_LENGTH_KEYS = ("max_position_embeddings", "n_positions", "max_seq_len", "seq_length", "model_max_length",
                "max_target_positions", "max_sequence_length", "max_seq_length", "seq_len")
_UNSCALED_ROPE = ("su", "longrope", "llama3", "yarn", "deepseek_yarn", "deepseek_llama_scaling")


def model_context_length(hf_config: dict) -> tuple[int, str] | None:
    """(the largest max_model_len vLLM starts this model with, where it comes from), or None when the config names
    none (vLLM then takes any). vLLM's rule (vllm/config/model.py _get_and_verify_max_len raises a ValueError
    above it): the smallest of the length keys (model_max_length, when set, overrides), times the RoPE scaling
    factor of a linear / dynamic RoPE."""
    lengths = {k: hf_config[k] for k in _LENGTH_KEYS if isinstance(hf_config.get(k), (int, float))}
    if not lengths:
        return None
    key = "model_max_length" if hf_config.get("model_max_length") else min(lengths, key=lengths.get)
    length, source = lengths[key], key
    rope = hf_config.get("rope_parameters") or hf_config.get("rope_scaling") or {}
    rope_type = rope.get("rope_type") or rope.get("type") or "default"
    if rope_type not in _UNSCALED_ROPE and rope.get("factor"):
        length, source = length * rope["factor"], f"{key} {lengths[key]} x {rope_type} RoPE factor {rope['factor']}"
    return int(length), source


def check_context_length(cfg: C.Config, model: ModelSource) -> None:
    """A rollout that cannot fit the model's context is refused here, not in every rank's vLLM start-up."""
    context, wanted = model_context_length(model.hf_config), rollout_max_model_len(cfg)
    if context is not None and wanted > context[0]:
        rl, (limit, source) = cfg.rl, context
        raise ConfigError(f"--max-prompt-length {rl.max_prompt_length} + --max-response-length "
                          f"{rl.max_response_length} = {wanted} tokens exceeds the model's context of {limit} tokens "
                          f"({source}, {model.origin}), which vLLM refuses; lower --max-prompt-length or "
                          f"--max-response-length so that they sum to at most {limit}")


def _derive_rl_batches(cfg: C.Config, world_size: int) -> None:
    from megatron_a3po.rl_config import validate_rl

    p, rl = cfg.parallel, cfg.rl
    model_parallel = p.tensor_model_parallel_size * p.pipeline_model_parallel_size * p.context_parallel_size
    if model_parallel > 0 and world_size % model_parallel == 0:  # else config.validate names the layout problem
        validate_rl(rl, world_size=world_size, dp=world_size // model_parallel,
                    micro_batch_size=1 if cfg.training.max_tokens_per_gpu else cfg.training.micro_batch_size)
    cfg.training.global_batch_size = rl.ppo_mini_batch_size * rl.rollout_n
    cfg.training.train_iters = rl.train_steps * max(rl.rollout_batch_size // rl.ppo_mini_batch_size, 1) * rl.ppo_epochs


def _check_resume(cfg: C.Config, resume_dir: Path, state: dict) -> list[str]:
    from megatron_a3po import checkpointing

    if cfg.rl.kl_coef > 0 and not (cfg.training.ref_load or cfg.model.hf_path):
        raise ConfigError("resuming with --kl-coef > 0 needs the reference policy's weights: pass --ref-load DIR "
                          "(the HF model or converted checkpoint the run started from) or --hf-path")
    requested = None
    if cfg.model.hf_path or cfg.model.tiny_model:  # the model the flags name must be the checkpoint's
        requested = model_source(cfg, use_load=False).arch
    return checkpointing.check_resume(cfg, resume_dir, state, requested)


def check_inputs(job: Job) -> tuple[list[str], list[str]]:
    """(one line per dataset, problems): what the job reads on its ranks only after building its model and
    starting vLLM, read now (--dry-run, pre-flight): the --reward function imports; the model's tokenizer loads
    and fits its vocabulary; every row of --dataset and --eval-dataset parses and tokenizes through the job's
    own loader (rl_job.build_data), so a bad row fails here as it would there, and prompts longer than
    --max-prompt-length, which the loader filters out, are counted."""
    from megatron_a3po.errors import UserError
    from megatron_a3po.rewards.registry import load_reward_fn

    notes, problems = [], []
    try:
        load_reward_fn(job.cfg.rl.reward)
    except UserError as err:
        problems.append(str(err))
    try:
        notes = _dataset_notes(job.cfg, _job_tokenizer(job))
    except UserError as err:
        problems.append(str(err))
    return notes, problems


def _job_tokenizer(job: Job):
    """The tokenizer rl_job.run loads (vllm_model_dir: the ModelSource's tokenizer files, or the tiny one)."""
    from megatron_a3po.data import check_tokenizer_fits

    where = job.model.tokenizer_dir
    if where is None:
        from megatron_a3po.models.tiny import build_tokenizer

        tokenizer = build_tokenizer()
    else:
        from transformers import AutoTokenizer

        if not any(Path(where, name).is_file() for name in ("tokenizer.json", "tokenizer_config.json")):
            # transformers would build an empty tokenizer from config.json alone, and every prompt would be junk
            raise ConfigError(f"{where} has no tokenizer (tokenizer.json or tokenizer_config.json), and the job "
                              "tokenizes its prompts with the model's own; copy the model's tokenizer files there")
        try:
            tokenizer = AutoTokenizer.from_pretrained(where)
        except (OSError, ValueError) as err:
            raise ConfigError(f"cannot load the model's tokenizer from {where} "
                              f"({' '.join(str(err).split())[:200]}); copy the model's tokenizer files there") from None
    try:
        check_tokenizer_fits(tokenizer, job.arch.vocab_size)
    except ValueError as err:
        raise ConfigError(str(err)) from None
    return tokenizer


def _dataset_notes(cfg: C.Config, tokenizer) -> list[str]:
    from megatron_a3po.errors import DatasetError, UserError
    from megatron_a3po.rewards.synthetic import LEVELS
    from megatron_a3po.rl_job import build_data

    rl = cfg.rl
    synthetic = rl.dataset.startswith("synthetic:arithmetic")
    try:
        train, evaluation, _ = build_data(cfg, tokenizer)
    except UserError:
        raise
    except ValueError as err:  # synthetic:arithmetic:LEVEL with a LEVEL the generator does not have
        if not synthetic:
            raise
        raise DatasetError(f"--dataset {rl.dataset}: {err}; use synthetic:arithmetic:LEVEL with LEVEL one of "
                           f"{', '.join(map(str, sorted(LEVELS)))}") from None
    eval_name = (f"validation ({rl.eval_prompts} held-out prompts of {rl.dataset})" if synthetic
                 else f"--eval-dataset {rl.eval_dataset or rl.dataset}")
    return [_dataset_note(f"--dataset {rl.dataset}", train, rl.max_prompt_length),
            _dataset_note(eval_name, evaluation, rl.max_prompt_length)]


def _dataset_note(name: str, data, max_prompt_length: int) -> str:
    s = data.stats
    if not s["too_long"]:
        return (f"{name}: {s['rows']} rows, all used (longest prompt {data.longest} tokens, --max-prompt-length "
                f"{max_prompt_length})")
    prompts = "1 prompt" if s["too_long"] == 1 else f"{s['too_long']} prompts"
    return (f"{name}: {s['rows']} rows, {prompts} longer than --max-prompt-length {max_prompt_length} "
            f"(longest {data.longest} tokens) left out as the job's loader does, {s['kept']} used")
