"""Public config.json values (architecture fields only) of the paper's models.

Used where the real checkpoint is not at hand: config validation tests for the paper setups and the capacity
planner (`a3po plan`) on a machine without /models. Keyed by the checkpoint's directory name, as in the configs'
`model.hf_path`.
"""

PAPER_MODELS = {
    "Qwen2.5-Math-7B": dict(architectures=["Qwen2ForCausalLM"], hidden_size=3584, intermediate_size=18944,
                            num_hidden_layers=28, num_attention_heads=28, num_key_value_heads=4, vocab_size=152064,
                            rope_theta=10000.0, max_position_embeddings=4096, tie_word_embeddings=False),
    "DeepSeek-R1-Distill-Qwen-7B": dict(architectures=["Qwen2ForCausalLM"], hidden_size=3584, intermediate_size=18944,
                                        num_hidden_layers=28, num_attention_heads=28, num_key_value_heads=4,
                                        vocab_size=152064, rope_theta=10000.0, max_position_embeddings=131072,
                                        tie_word_embeddings=False),
    "Qwen3-8B-Base": dict(architectures=["Qwen3ForCausalLM"], hidden_size=4096, intermediate_size=12288,
                          num_hidden_layers=36, num_attention_heads=32, num_key_value_heads=8, head_dim=128,
                          vocab_size=151936, rope_theta=1000000.0, max_position_embeddings=32768,
                          tie_word_embeddings=False),
    "Qwen2.5-32B": dict(architectures=["Qwen2ForCausalLM"], hidden_size=5120, intermediate_size=27648,
                        num_hidden_layers=64, num_attention_heads=40, num_key_value_heads=8, vocab_size=152064,
                        rope_theta=1000000.0, max_position_embeddings=131072, tie_word_embeddings=False),
}
