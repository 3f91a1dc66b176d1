"""Write the live policy as a Hugging Face checkpoint (SFT output, `--export-hf` at the end of RL)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path


def export_hf(policy, hf_cfg: dict, side_files_dir: Path | None, out: Path) -> None:
    """Gather the full policy through the shared mapping (collective: every rank calls it) and write it on rank 0
    into a temp dir renamed at the end. Holds the whole model on rank 0, which suits warm-start sized models;
    `a3po-convert megatron-to-hf` is the streaming path for large ones."""
    from safetensors.torch import save_file

    from megatron_a3po import parallel
    from megatron_a3po.models.tiny import build_tokenizer

    tensors = {name: t.clone() for name, t in policy.hf_state()}
    if not parallel.is_rank0():
        return
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    save_file(tensors, str(tmp / "model.safetensors"), metadata={"format": "pt"})
    (tmp / "config.json").write_text(json.dumps(hf_cfg, indent=2))
    if side_files_dir is None:
        build_tokenizer().save_pretrained(tmp)
    else:
        for f in side_files_dir.iterdir():
            if f.is_file() and f.suffix not in (".safetensors", ".bin") and f.name != "config.json" \
                    and not f.name.endswith(".index.json"):
                shutil.copy(f, tmp / f.name)
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)
    print(f"wrote HF checkpoint {out}", flush=True)
