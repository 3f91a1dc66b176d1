"""HF <-> Megatron checkpoint conversion CLI (`a3po-convert`); thin over megatron_a3po.models.hf_mapping."""
