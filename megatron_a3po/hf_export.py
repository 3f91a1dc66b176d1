"""Write the live policy as a Hugging Face checkpoint (SFT output, `--export-hf` at the end of RL)."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

from megatron_a3po import checkpoint_files as files


def export_hf(policy, hf_cfg: dict, side_files_dir: Path | None, out: Path) -> None:
    """Stream the live policy to `out` through the shared mapping; collective (every rank calls it).

    One parameter at a time: its owning stage gathers the TP shards, the pipeline group receives the full
    tensor, rank 0 writes it straight into the safetensors file (header planned up front) and drops it. Peak
    memory beyond the model is about one full tensor plus its host copy, on every rank, whatever the model size
    (bench/bench_export_memory.py measures it). Written into a temp dir that replaces `out` crash-safely at the end
    (checkpoint_files.replace_dir).
    """
    from megatron_a3po import parallel
    from megatron_a3po.models import hf_mapping
    from megatron_a3po.models.hf_io import ShardedSafetensorsWriter, copy_side_files
    from megatron_a3po.models.tiny import build_tokenizer

    tmp = out.with_name(f"{files.TMP_PREFIX}{out.name}-{os.getpid()}")  # two exports never share a temp dir
    writer = None
    if parallel.is_rank0():
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        plan = [(name, shape, policy.dtype) for name, shape in hf_mapping.hf_tensor_specs(policy.arch)]
        writer = ShardedSafetensorsWriter(tmp, plan)
    for name, tensor in policy.hf_state():
        if writer is not None:
            writer.write(name, tensor)
        del tensor
    if writer is None:
        return
    writer.close()
    (tmp / "config.json").write_text(json.dumps(hf_cfg, indent=2))
    if side_files_dir is None:
        build_tokenizer().save_pretrained(tmp)
    else:
        copy_side_files(side_files_dir, tmp)
    files.remove(files.replace_dir(tmp, out))  # a crash at any point leaves the old or the new export whole
    print(f"wrote HF checkpoint {out}", flush=True)
