"""Tiny random Hugging Face checkpoints for tests and the demo (no hub: everything is built here).

A character-level tokenizer (digits, arithmetic symbols, ASCII letters) with a ChatML-style chat template,
and a random model of each supported family written with transformers' own `save_pretrained`, so the
files are exactly what a real HF checkpoint looks like. head_dim is 64 because vLLM's CPU attention
rejects smaller heads.
"""

from __future__ import annotations

import string
from pathlib import Path

SPECIAL_TOKENS = ["<pad>", "<s>", "</s>", "<|im_start|>", "<|im_end|>"]
CHARS = list(string.digits + string.ascii_letters + string.punctuation + " \n")
CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

TINY_SHAPES = dict(hidden_size=256, intermediate_size=512, num_hidden_layers=4, num_attention_heads=4,
                   num_key_value_heads=2, head_dim=64, vocab_size=128, max_position_embeddings=512)
FAMILY_CLASSES = {"llama": "LlamaConfig", "qwen2": "Qwen2Config", "qwen3": "Qwen3Config"}
# Cover both embedding layouts across the families.
TIED = {"llama": False, "qwen2": True, "qwen3": False}


def build_tokenizer():
    """A character-level fast tokenizer; every printable ASCII char is one token."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {tok: i for i, tok in enumerate(SPECIAL_TOKENS + CHARS)}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<pad>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("[\\s\\S]"), behavior="isolated")
    tok.decoder = decoders.Fuse()
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="<|im_end|>", unk_token="<pad>",
        additional_special_tokens=["</s>", "<|im_start|>"],
    )
    fast.chat_template = CHAT_TEMPLATE
    return fast


def hf_config(family: str, **overrides):
    import transformers

    if family not in FAMILY_CLASSES:
        raise ValueError(f"unknown tiny model family {family!r}; choose one of {sorted(FAMILY_CLASSES)}")
    shapes = dict(TINY_SHAPES, **overrides)
    tok = build_tokenizer()
    kwargs = dict(shapes, tie_word_embeddings=TIED[family], rope_theta=10000.0, rms_norm_eps=1e-6,
                  pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
    if family == "llama":
        kwargs["attention_bias"] = False
    config = getattr(transformers, FAMILY_CLASSES[family])(**kwargs)
    config.architectures = [config.__class__.__name__.replace("Config", "ForCausalLM")]
    return config


def write_tiny_hf_checkpoint(out_dir: str | Path, family: str = "qwen2", seed: int = 0, dtype: str = "float32",
                             init_std: float = 0.02, **overrides) -> Path:
    """Write config.json, model.safetensors, tokenizer.json and tokenizer_config.json to `out_dir`."""
    import torch
    import transformers

    out = Path(out_dir)
    config = hf_config(family, **overrides)
    config.initializer_range = init_std
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    with torch.no_grad():
        # Random (not zero/one) norms and biases so a mapping mistake on them cannot hide.
        for name, param in model.named_parameters():
            if "norm" in name:
                param.copy_(1.0 + 0.1 * torch.randn_like(param))
            elif name.endswith(".bias"):
                param.copy_(0.1 * torch.randn_like(param))
    model = model.to(getattr(torch, dtype))
    model.save_pretrained(out, safe_serialization=True)
    build_tokenizer().save_pretrained(out)
    return out


def main(argv=None) -> int:
    from megatron_a3po.flag_parser import FlagParser

    parser = FlagParser(description="Write a tiny random HF checkpoint (no downloads).")
    parser.add_argument("--out", required=True)
    parser.add_argument("--family", default="qwen2", choices=sorted(FAMILY_CLASSES))
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    print(f"wrote tiny {args.family} checkpoint {write_tiny_hf_checkpoint(args.out, args.family, seed=args.seed)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
