"""THE one HF <-> Megatron mapping: names, layouts and TP sharding, used by conversion and by vLLM refit.

Layouts handled here and nowhere else:
- QKV: HF keeps q/k/v separate; Megatron fuses them per query group: [q heads of group g, k_g, v_g] for each g
  (so a TP shard is a contiguous run of whole groups). Biases (qwen2) follow the same layout.
- SwiGLU: HF gate_proj/up_proj -> Megatron linear_fc1 = [gate; up]; a TP shard is [gate_r; up_r].
- Vocab: embedding/output rows are zero-padded to a multiple of make_vocab_size_divisible_by x TP on import
  and cut back on export.
- Norms: the local spec has input_layernorm / pre_mlp_layernorm; the Transformer Engine spec fuses them into
  linear_qkv.layer_norm_weight / linear_fc1.layer_norm_weight. Both spellings map to the same HF names.
- Tied embeddings: no lm_head in HF; Megatron's last PP stage still holds output_layer.weight (a copy).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterator

import torch

from megatron_a3po.models.families import ModelArch

COLUMN, ROW = 0, 1  # TP split dim of column-parallel / row-parallel weights


@dataclass(frozen=True)
class Entry:
    """One Megatron parameter (global name) and the HF tensor(s) it is made of."""

    megatron_name: str
    hf_names: tuple[str, ...]
    kind: str  # "plain" | "qkv" | "glu" | "vocab"
    tp_dim: int | None  # None = replicated across TP


def _layer_entries(arch: ModelArch, i: int, te: bool) -> list[Entry]:
    m, h = f"decoder.layers.{i}.", f"model.layers.{i}."
    attn, mlp = m + "self_attention.", m + "mlp."
    qkv = tuple(f"{h}self_attn.{p}_proj.weight" for p in "qkv")
    entries = [
        Entry(attn + "linear_qkv.layer_norm_weight" if te else m + "input_layernorm.weight",
              (h + "input_layernorm.weight",), "plain", None),
        Entry(attn + "linear_qkv.weight", qkv, "qkv", COLUMN),
        Entry(attn + "linear_proj.weight", (h + "self_attn.o_proj.weight",), "plain", ROW),
        Entry(mlp + "linear_fc1.layer_norm_weight" if te else m + "pre_mlp_layernorm.weight",
              (h + "post_attention_layernorm.weight",), "plain", None),
        Entry(mlp + "linear_fc1.weight", (h + "mlp.gate_proj.weight", h + "mlp.up_proj.weight"), "glu", COLUMN),
        Entry(mlp + "linear_fc2.weight", (h + "mlp.down_proj.weight",), "plain", ROW),
    ]
    if arch.qkv_bias:
        entries.append(Entry(attn + "linear_qkv.bias", tuple(n.replace(".weight", ".bias") for n in qkv), "qkv", COLUMN))
    if arch.qk_norm:
        entries.append(Entry(attn + "q_layernorm.weight", (h + "self_attn.q_norm.weight",), "plain", None))
        entries.append(Entry(attn + "k_layernorm.weight", (h + "self_attn.k_norm.weight",), "plain", None))
    return entries


def _embedding_entry() -> Entry:
    return Entry("embedding.word_embeddings.weight", ("model.embed_tokens.weight",), "vocab", COLUMN)


def _final_entries(arch: ModelArch) -> list[Entry]:
    lm_head = "model.embed_tokens.weight" if arch.tie_word_embeddings else "lm_head.weight"
    return [
        Entry("decoder.final_layernorm.weight", ("model.norm.weight",), "plain", None),
        Entry("output_layer.weight", (lm_head,), "vocab", COLUMN),
    ]


def all_entries(arch: ModelArch, te: bool = False) -> list[Entry]:
    """Every Megatron parameter of the whole model in HF order (embedding, layers, final norm, head)."""
    entries = [_embedding_entry()]
    for i in range(arch.num_layers):
        entries += _layer_entries(arch, i, te)
    finals = _final_entries(arch)
    return entries + (finals[:1] if arch.tie_word_embeddings else finals)


# ---- full-tensor layout transforms -------------------------------------------------------------------------

def to_megatron(entry: Entry, hf: list[torch.Tensor], arch: ModelArch, padded_vocab: int) -> torch.Tensor:
    """HF tensor(s) -> the full (unsharded) Megatron tensor."""
    if entry.kind == "qkv":
        q, k, v = hf
        g, d = arch.num_query_groups, arch.head_dim
        rest = q.shape[1:]
        per_group = [q.reshape(g, -1, *rest), k.reshape(g, d, *rest), v.reshape(g, d, *rest)]
        return torch.cat(per_group, dim=1).reshape(-1, *rest)
    if entry.kind == "glu":
        return torch.cat(hf, dim=0)
    if entry.kind == "vocab":
        (w,) = hf
        if w.shape[0] > padded_vocab:
            raise ValueError(f"{entry.hf_names[0]} has {w.shape[0]} rows, more than the padded vocab {padded_vocab}")
        return torch.cat([w, w.new_zeros(padded_vocab - w.shape[0], *w.shape[1:])]) if w.shape[0] < padded_vocab else w
    (w,) = hf
    return w


def to_hf(entry: Entry, full: torch.Tensor, arch: ModelArch) -> list[tuple[str, torch.Tensor]]:
    """Full Megatron tensor -> [(hf_name, tensor)], the exact inverse of to_megatron."""
    if entry.kind == "qkv":
        g, d = arch.num_query_groups, arch.head_dim
        q_rows = arch.num_attention_heads // g * d
        rest = full.shape[1:]
        q, k, v = full.reshape(g, q_rows + 2 * d, *rest).split([q_rows, d, d], dim=1)
        parts = [q.reshape(-1, *rest), k.reshape(-1, *rest), v.reshape(-1, *rest)]
    elif entry.kind == "glu":
        parts = list(full.chunk(2, dim=0))
    elif entry.kind == "vocab":
        parts = [full[: arch.vocab_size]]
    else:
        parts = [full]
    return [(name, t.contiguous()) for name, t in zip(entry.hf_names, parts)]


def full_shape(entry: Entry, arch: ModelArch, padded_vocab: int) -> tuple[int, ...]:
    """Shape of the full Megatron tensor, known from the architecture alone (receivers allocate with it)."""
    h, d = arch.hidden_size, arch.head_dim
    name = entry.megatron_name
    if entry.kind == "qkv":
        rows = (arch.num_attention_heads + 2 * arch.num_query_groups) * d
        return (rows, h) if name.endswith("weight") else (rows,)
    if entry.kind == "glu":
        return (2 * arch.ffn_hidden_size, h)
    if entry.kind == "vocab":
        return (padded_vocab, h)
    if name.endswith("linear_proj.weight"):
        return (h, arch.num_attention_heads * d)
    if name.endswith("linear_fc2.weight"):
        return (h, arch.ffn_hidden_size)
    if "q_layernorm" in name or "k_layernorm" in name:
        return (d,)
    return (h,)


def hf_tensor_specs(arch: ModelArch) -> list[tuple[str, tuple[int, ...]]]:
    """(hf_name, shape) of every HF tensor, in the order `iter_hf_tensors` yields them.

    Derived by running `to_hf` on meta tensors of `full_shape`, so it cannot drift from the layouts above.
    """
    specs = []
    for entry in all_entries(arch):
        meta = torch.empty(full_shape(entry, arch, arch.vocab_size), device="meta")
        specs += [(name, tuple(t.shape)) for name, t in to_hf(entry, meta, arch)]
    return specs


# HF tensors that carry no weights (old checkpoints stored RoPE's inverse frequencies).
IGNORABLE_HF_SUFFIXES = ("rotary_emb.inv_freq",)


# ---- TP sharding --------------------------------------------------------------------------------------------

def shard(entry: Entry, full: torch.Tensor, tp_rank: int, tp_size: int) -> torch.Tensor:
    if entry.tp_dim is None or tp_size == 1:
        return full
    if entry.kind == "glu":  # each rank holds [gate_r; up_r], not a contiguous slice of [gate; up]
        return torch.cat([half.chunk(tp_size, dim=0)[tp_rank] for half in full.chunk(2, dim=0)])
    return full.chunk(tp_size, dim=entry.tp_dim)[tp_rank]


def unshard(entry: Entry, shards: list[torch.Tensor]) -> torch.Tensor:
    if entry.tp_dim is None or len(shards) == 1:
        return shards[0]
    if entry.kind == "glu":
        halves = [s.chunk(2, dim=0) for s in shards]
        return torch.cat([torch.cat([h[0] for h in halves]), torch.cat([h[1] for h in halves])])
    return torch.cat(shards, dim=entry.tp_dim)


# ---- live (sharded) model ---------------------------------------------------------------------------------

def uses_te_names(chunks) -> bool:
    return any(name.endswith("layer_norm_weight") for c in chunks for name, _ in c.named_parameters())


def local_parameters(chunks) -> Iterator[tuple[str, torch.nn.Parameter]]:
    """(global Megatron name, parameter) for every parameter this rank holds, layer indices made global."""
    for chunk in chunks:
        chunk = unwrap(chunk)
        global_index = {}
        if hasattr(chunk, "decoder"):
            for local_i, layer in enumerate(chunk.decoder.layers):
                global_index[local_i] = layer.layer_number - 1
        for name, param in chunk.named_parameters():
            parts = name.split(".")
            if name.startswith("decoder.layers."):
                parts[2] = str(global_index[int(parts[2])])
            yield ".".join(parts), param


def unwrap(module):
    """The model inside DDP / Float16Module wrappers."""
    while hasattr(module, "module"):
        module = module.module
    return module


def load_into_model(chunks, arch: ModelArch, read_hf: Callable[[str], torch.Tensor], padded_vocab: int,
                    tp_rank: int, tp_size: int, *,
                    read_hf_into: Callable[[str, torch.Tensor], None] | None = None) -> int:
    """Fill this rank's parameters from HF tensors (`read_hf(name)`); returns how many were loaded.

    `read_hf_into(name, out)` (optional) reads an HF tensor straight into `out` (same shape; it casts if the
    dtype differs). At TP=1 it lets every non-QKV parameter be filled without a temporary full tensor.
    """
    entries = {e.megatron_name: e for e in all_entries(arch, te=uses_te_names(chunks))}
    # Tied models: the last PP stage's output_layer copy is filled from the embedding.
    tied_head = Entry("output_layer.weight", ("model.embed_tokens.weight",), "vocab", COLUMN)
    count = 0
    for name, param in local_parameters(chunks):
        entry = entries.get(name) or (tied_head if name == "output_layer.weight" else None)
        if entry is None:
            raise KeyError(f"Megatron parameter {name} has no HF mapping (family {arch.family})")
        if read_hf_into is not None and _read_in_place(entry, param, arch, padded_vocab, read_hf_into, tp_size):
            count += 1
            continue
        full = to_megatron(entry, [read_hf(n) for n in entry.hf_names], arch, padded_vocab)
        local = shard(entry, full, tp_rank, tp_size)
        if local.shape != param.shape:
            raise ValueError(f"{name}: mapped HF tensor has shape {tuple(local.shape)} but the model expects "
                             f"{tuple(param.shape)} (is the HF config consistent with its weights?)")
        with torch.no_grad():
            param.copy_(local)
        count += 1
    return count


def _read_in_place(entry: Entry, param, arch: ModelArch, padded_vocab: int, read_into, tp_size: int) -> bool:
    """TP=1: HF bytes go straight into the parameter, in to_megatron's layout ([gate; up]; vocab rows, then
    zero padding). QKV (per-group interleave) and TP shards take the general path."""
    data = param.data
    if tp_size != 1 or entry.kind == "qkv" or not data.is_contiguous() or data.device.type != "cpu":
        return False
    if entry.kind == "glu":
        parts = list(data.chunk(2, dim=0))
    elif entry.kind == "vocab":
        if data.shape[0] != padded_vocab or padded_vocab < arch.vocab_size:
            return False
        parts = [data[: arch.vocab_size]]
        data[arch.vocab_size:].zero_()
    else:
        parts = [data]
    with torch.no_grad():
        for hf_name, part in zip(entry.hf_names, parts):
            read_into(hf_name, part)
    return True


def iter_hf_tensors(chunks, arch: ModelArch, padded_vocab: int, *, dtype: torch.dtype,
                    getter: Callable[[torch.nn.Parameter], torch.Tensor] = lambda p: p.detach(),
                    ) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield (hf_name, full tensor) on every rank from a live, TP/PP-sharded model, one parameter at a time.

    Collective: every rank of the job must iterate it to the end. The owning PP stage gathers the TP shards,
    then broadcasts the full tensor over the pipeline group, so peak extra memory is one full tensor.
    `getter` picks what to export per parameter (weights by default; e.g. `lambda p: p.main_grad` for grads).
    """
    import torch.distributed as dist
    from megatron.core import parallel_state as ps

    local = dict(local_parameters(chunks))
    tp_group, pp_group = ps.get_tensor_model_parallel_group(), ps.get_pipeline_model_parallel_group()
    tp_size = ps.get_tensor_model_parallel_world_size()
    pp_ranks = dist.get_process_group_ranks(pp_group)
    # Who owns what: one small all-gather of names over the pipeline group.
    owned = [None] * len(pp_ranks)
    dist.all_gather_object(owned, sorted(local), group=pp_group)
    device = next(iter(local.values())).device
    for entry in all_entries(arch, te=uses_te_names(chunks)):
        owner = next(i for i, names in enumerate(owned) if entry.megatron_name in names)
        if entry.megatron_name in local:
            mine = getter(local[entry.megatron_name]).to(dtype).contiguous()
            if tp_size > 1 and entry.tp_dim == 0 and entry.kind != "glu":
                # Row shards concatenate in rank order: gather straight into the full tensor (no second copy).
                full = mine.new_empty((tp_size * mine.shape[0], *mine.shape[1:]))
                dist.all_gather_into_tensor(full, mine, group=tp_group)
            elif tp_size > 1 and entry.tp_dim is not None:
                shards = [torch.empty_like(mine) for _ in range(tp_size)]
                dist.all_gather(shards, mine, group=tp_group)
                full = unshard(entry, shards)
            else:
                full = mine
        else:
            full = torch.empty(full_shape(entry, arch, padded_vocab), dtype=dtype, device=device)
        if len(pp_ranks) > 1:
            dist.broadcast(full, src=pp_ranks[owner], group=pp_group)
        yield from to_hf(entry, full, arch)
