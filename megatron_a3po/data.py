"""Prompt datasets for RL: parquet/jsonl rows -> tokenized prompts + ground truths, seeded resumable batching,
and DAPO's dynamic sampling.

Row schema (DAPO-Math-17k is read as is):
  prompt        str, or a list of {"role": str, "content": str} chat messages
  reward_model  {"ground_truth": str, "style": "rule"}   - or a top-level "ground_truth"
  data_source, ability, extra_info                        - optional, kept for metrics
Messages go through `tokenizer.apply_chat_template(..., add_generation_prompt=True)`; a string prompt is wrapped
as one user message, or encoded verbatim with raw_prompt=True (the synthetic arithmetic task).
"""

from __future__ import annotations

import json
import logging
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Sequence

from megatron_a3po.errors import DatasetError  # noqa: F401  (re-exported)

logger = logging.getLogger(__name__)

SKIP_HINT = "fix or remove that row (in Python, PromptDataset's skip_bad_rows=True skips and counts bad rows)"


@dataclass
class PromptItem:
    prompt_ids: list[int]
    prompt: str | list[dict]
    ground_truth: str
    data_source: str = ""
    extra_info: dict = field(default_factory=dict)
    source: str = ""  # "file:row"


def read_rows(path: str | Path) -> Iterable[tuple[int, Any]]:
    """(row number, row) pairs from .parquet, .jsonl (JSON lines) or .json (lines or one array). A file that
    cannot be read (permissions, not parquet, not UTF-8, a broken JSON array) is a DatasetError naming it."""
    path = Path(path)
    if not path.exists():
        raise DatasetError(f"dataset file {path} does not exist")
    if not path.is_file():
        raise DatasetError(f"dataset {path} is not a file; give a .parquet or .jsonl file")
    suffix = path.suffix.lower()
    if suffix not in (".parquet", ".jsonl", ".json"):
        raise DatasetError(f"unsupported dataset file {path}: use .parquet or .jsonl (one JSON object per line)")
    try:
        yield from _rows(path, suffix)
    except DatasetError:
        raise
    except (OSError, UnicodeDecodeError, ValueError) as exc:  # pyarrow's ArrowInvalid is a ValueError
        raise DatasetError(f"cannot read dataset file {path}: {' '.join(str(exc).split())[:300]}; give a readable "
                           ".parquet file or UTF-8 JSON lines in the DAPO-Math-17k schema") from None


def _rows(path: Path, suffix: str) -> Iterable[tuple[int, Any]]:
    if suffix == ".parquet":
        try:
            import pyarrow.parquet as pq
        except ImportError as exc:
            raise DatasetError(f"reading {path} needs pyarrow; install it (pip install pyarrow) or convert "
                               "the file to JSON lines") from exc
        table = pq.read_table(path)
        for i, row in enumerate(table.to_pylist()):
            yield i, row
    elif suffix == ".json" and path.read_text(encoding="utf-8").lstrip()[:1] == "[":
        for i, row in enumerate(json.loads(path.read_text(encoding="utf-8"))):  # a JSON array of rows
            yield i, row
    else:
        with path.open(encoding="utf-8") as f:
            for i, line in enumerate(f):
                if not line.strip():
                    continue
                try:
                    yield i, json.loads(line)
                except json.JSONDecodeError as exc:
                    yield i, _Malformed(f"invalid JSON ({exc.msg} at column {exc.colno})")


@dataclass
class _Malformed:
    problem: str


def _check_row(row: Any) -> tuple[str | list[dict], str, str, dict]:
    """(prompt, ground_truth, data_source, extra_info) or ValueError naming what is wrong."""
    if isinstance(row, _Malformed):
        raise ValueError(row.problem)
    if not isinstance(row, dict):
        raise ValueError(f"row is a {type(row).__name__}, expected an object with 'prompt' and a ground truth")
    if row.get("prompt") is None:
        raise ValueError("missing 'prompt'")
    prompt = row["prompt"]
    if isinstance(prompt, str):
        if not prompt.strip():
            raise ValueError("'prompt' is an empty string")
    elif isinstance(prompt, (list, tuple)):
        if not prompt:
            raise ValueError("'prompt' is an empty message list")
        for j, msg in enumerate(prompt):
            if not isinstance(msg, dict) or not isinstance(msg.get("role"), str) \
                    or not isinstance(msg.get("content"), str):
                raise ValueError(f"'prompt' message {j} must be {{'role': str, 'content': str}}, got {msg!r:.80}")
        prompt = [{"role": m["role"], "content": m["content"]} for m in prompt]
    else:
        raise ValueError(f"'prompt' must be a string or a list of {{role, content}} messages, "
                         f"got {type(prompt).__name__}")
    reward_model = row.get("reward_model")
    if reward_model is not None and not isinstance(reward_model, dict):
        raise ValueError(f"'reward_model' must be an object with 'ground_truth', got {type(reward_model).__name__}")
    gt = (reward_model or {}).get("ground_truth", row.get("ground_truth"))
    if gt is None:
        raise ValueError("missing ground truth (neither 'reward_model.ground_truth' nor 'ground_truth')")
    if isinstance(gt, bool) or not isinstance(gt, (str, int, float)):
        raise ValueError(f"ground truth must be a string (or a number), got {type(gt).__name__}")
    gt = str(gt)
    if not gt.strip():
        raise ValueError("ground truth is an empty string")
    extra = row.get("extra_info")
    return prompt, gt, str(row.get("data_source") or ""), extra if isinstance(extra, dict) else {}


def _ids(encoded: Any) -> list[int]:
    """apply_chat_template returns a list in transformers 4 and a BatchEncoding in 5."""
    if hasattr(encoded, "keys"):
        encoded = encoded["input_ids"]
    return [int(t) for t in encoded]


def tokenize_prompt(tokenizer, prompt: str | list[dict], raw_prompt: bool = False) -> list[int]:
    if isinstance(prompt, str) and raw_prompt:
        return _ids(tokenizer(prompt, add_special_tokens=False)["input_ids"])
    if getattr(tokenizer, "chat_template", None) is None:
        hint = " or set raw_prompt=True to encode string prompts verbatim" if isinstance(prompt, str) else ""
        raise DatasetError(f"tokenizer {type(tokenizer).__name__} has no chat template; use a chat/instruct "
                           f"tokenizer{hint}")
    messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else prompt
    return _ids(tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True))


class PromptDataset:
    """Tokenized prompts with ground truths. `stats`: rows, bad_rows, too_long (filtered out), kept; `longest`:
    the longest prompt in tokens, filtered ones included."""

    def __init__(self, items: list[PromptItem], stats: dict[str, int], name: str, longest: int = 0):
        self.items, self.stats, self.name, self.longest = items, stats, name, longest

    @classmethod
    def from_rows(cls, rows: Iterable[tuple[str, Any]], tokenizer, *, max_prompt_length: int,
                  raw_prompt: bool = False, skip_bad_rows: bool = False, name: str = "<rows>") -> "PromptDataset":
        """`rows` are (location, row) pairs; the location ("file.parquet row 7") is used in errors."""
        if max_prompt_length <= 0:
            raise ValueError(f"max_prompt_length must be > 0, got {max_prompt_length}")
        items, stats, longest = [], {"rows": 0, "bad_rows": 0, "too_long": 0, "kept": 0}, 0
        for where, row in rows:
            stats["rows"] += 1
            try:
                prompt, gt, data_source, extra = _check_row(row)
            except ValueError as exc:
                if not skip_bad_rows:
                    raise DatasetError(f"{where}: {exc}; {SKIP_HINT}") from None
                stats["bad_rows"] += 1
                continue
            ids = tokenize_prompt(tokenizer, prompt, raw_prompt)
            longest = max(longest, len(ids))
            if len(ids) > max_prompt_length:
                stats["too_long"] += 1
                continue
            items.append(PromptItem(ids, prompt, gt, data_source, extra, where))
        stats["kept"] = len(items)
        if stats["bad_rows"]:
            logger.warning("%s: skipped %d bad rows of %d", name, stats["bad_rows"], stats["rows"])
        if stats["too_long"]:
            logger.warning("%s: filtered %d prompts longer than max_prompt_length=%d tokens", name,
                           stats["too_long"], max_prompt_length)
        if not items:
            raise DatasetError(f"{name}: no usable prompts ({stats['rows']} rows, {stats['bad_rows']} bad, "
                               f"{stats['too_long']} longer than --max-prompt-length {max_prompt_length}, the "
                               f"longest {longest} tokens); check the path and the schema, or raise max_prompt_length "
                               "(--max-prompt-length)")
        return cls(items, stats, name, longest)

    @classmethod
    def from_files(cls, paths: str | Path | Sequence[str | Path], tokenizer, *, max_prompt_length: int,
                   raw_prompt: bool = False, skip_bad_rows: bool = False) -> "PromptDataset":
        paths = [paths] if isinstance(paths, (str, Path)) else list(paths)
        if not paths:
            raise DatasetError("no dataset files given")

        def located():
            for p in paths:
                unit = "row" if str(p).endswith(".parquet") else "line"
                for i, row in read_rows(p):
                    yield f"{p} {unit} {i if unit == 'row' else i + 1}", row

        return cls.from_rows(located(), tokenizer, max_prompt_length=max_prompt_length, raw_prompt=raw_prompt,
                             skip_bad_rows=skip_bad_rows, name=", ".join(map(str, paths)))

    @classmethod
    def from_dicts(cls, rows: Sequence[dict], tokenizer, **kwargs) -> "PromptDataset":
        """In-memory rows, e.g. `make_arithmetic_dataset(...)`."""
        return cls.from_rows(((f"row {i}", r) for i, r in enumerate(rows)), tokenizer, **kwargs)

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> PromptItem:
        return self.items[i]


class PromptSampler:
    """Seeded shuffled stream of dataset indices, epoch after epoch, resumable exactly.

    Epoch e uses a permutation seeded by (seed, e); batches run across epoch boundaries, so no prompt is dropped.
    state_dict() = {"epoch", "index", "seed", "dataset_len"}: load it into a fresh sampler and the next batches
    are exactly those the original would have produced.
    """

    def __init__(self, dataset_len: int, seed: int = 0, shuffle: bool = True):
        if dataset_len <= 0:
            raise DatasetError("cannot sample from an empty dataset")
        self.dataset_len, self.seed, self.shuffle = dataset_len, seed, shuffle
        self.epoch, self.index = 0, 0
        self._order = self._permutation(0)

    def _permutation(self, epoch: int) -> list[int]:
        order = list(range(self.dataset_len))
        if self.shuffle:
            random.Random(self.seed * 1_000_003 + epoch).shuffle(order)
        return order

    def next_indices(self, n: int) -> list[int]:
        if n <= 0:
            raise ValueError(f"batch size must be > 0, got {n}")
        out = []
        while len(out) < n:
            if self.index >= self.dataset_len:
                self.epoch, self.index = self.epoch + 1, 0
                self._order = self._permutation(self.epoch)
            take = min(n - len(out), self.dataset_len - self.index)
            out.extend(self._order[self.index:self.index + take])
            self.index += take
        return out

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "index": self.index, "seed": self.seed, "dataset_len": self.dataset_len}

    def load_state_dict(self, state: dict[str, int]) -> None:
        if state["dataset_len"] != self.dataset_len or state["seed"] != self.seed:
            raise DatasetError(f"data position in the checkpoint was made with {state['dataset_len']} prompts and "
                               f"seed {state['seed']}, but this run has {self.dataset_len} prompts and seed "
                               f"{self.seed}; resume with the same dataset, max_prompt_length and seed")
        self.epoch, self.index = int(state["epoch"]), int(state["index"])
        self._order = self._permutation(self.epoch)


class DynamicSampler:
    """DAPO dynamic sampling: keep only prompt groups whose rewards vary, until `target_prompts` are kept.

    The trainer generates a round, calls `add(rewards, groups)`, and repeats while `not done`; then `take()`.
    `max_num_gen_batches` caps the rounds per step (<= 0: no cap). A constant group counts as all-correct
    when its reward is > 0 and all-wrong otherwise. `stats`: kept, dropped_all_correct, dropped_all_wrong,
    rounds, surplus (kept beyond the target, discarded by take()).
    """

    def __init__(self, target_prompts: int, max_num_gen_batches: int = 0, eps: float = 1e-6):
        if target_prompts <= 0:
            raise ValueError(f"target_prompts must be > 0, got {target_prompts}")
        self.target_prompts, self.max_num_gen_batches, self.eps = target_prompts, max_num_gen_batches, eps
        self._reset()

    def _reset(self) -> None:
        self._kept: list[Any] = []
        self._stats = {"kept": 0, "dropped_all_correct": 0, "dropped_all_wrong": 0, "rounds": 0, "surplus": 0}

    def add(self, rewards: Sequence[Sequence[float]], groups: Sequence[Any] | None = None) -> int:
        """One generation round: per-prompt reward lists (and optional payloads). Returns groups kept."""
        if groups is not None and len(groups) != len(rewards):
            raise ValueError(f"{len(rewards)} reward groups but {len(groups)} payloads")
        self._stats["rounds"] += 1
        kept = 0
        for i, group_rewards in enumerate(rewards):
            values = [float(r) for r in group_rewards]
            if not values:
                raise ValueError(f"reward group {i} is empty")
            if max(values) - min(values) <= self.eps:
                self._stats["dropped_all_correct" if values[0] > 0 else "dropped_all_wrong"] += 1
                continue
            self._kept.append(groups[i] if groups is not None else i)
            kept += 1
        self._stats["kept"] = len(self._kept)
        return kept

    @property
    def full(self) -> bool:
        return len(self._kept) >= self.target_prompts

    @property
    def exhausted(self) -> bool:
        return self.max_num_gen_batches > 0 and self._stats["rounds"] >= self.max_num_gen_batches

    @property
    def done(self) -> bool:
        return self.full or self.exhausted

    @property
    def stats(self) -> dict[str, int]:
        return dict(self._stats)

    def take(self) -> tuple[list[Any], dict[str, int]]:
        """(kept groups, at most target_prompts of them; stats of this step) and reset for the next step.

        Fewer than target_prompts only when exhausted: the trainer decides to train on a partial batch or stop.
        """
        kept, stats = self._kept[:self.target_prompts], self.stats
        stats["surplus"] = max(0, len(self._kept) - self.target_prompts)
        stats["kept"] = len(kept)
        self._reset()
        return kept, stats


def check_tokenizer_fits(tokenizer, model_vocab_size: int) -> None:
    """Raise before any rollout if the tokenizer can emit ids the model's embedding does not have."""
    n = len(tokenizer)
    if n > model_vocab_size:
        raise ValueError(f"tokenizer has {n} tokens (including added special tokens) but the model's vocab_size "
                         f"is {model_vocab_size}: ids >= {model_vocab_size} would index past the embedding; "
                         "use the tokenizer that belongs to the model, or a model with a larger (padded) vocab")
