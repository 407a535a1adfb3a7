"""config.json sizes of real models (dense, 16-bit), for the benchmarks that write model folders or read
the GPU runs' logs: the offline kit's folders and those tests/gpu/large_workspace_check.sh writes."""

QWEN_HALF_B = dict(  # Qwen2.5-0.5B-Instruct
    hidden_size=896,
    num_hidden_layers=24,
    num_attention_heads=14,
    num_key_value_heads=2,
    vocab_size=151936,
    intermediate_size=4864,
    tie_word_embeddings=True,
)
QWEN_ONE_AND_HALF_B = dict(  # Qwen2.5-1.5B-Instruct
    QWEN_HALF_B, hidden_size=1536, num_hidden_layers=28, num_attention_heads=12, intermediate_size=8960
)
QWEN_7B = dict(  # Qwen2.5-7B-Instruct
    hidden_size=3584,
    num_hidden_layers=28,
    num_attention_heads=28,
    num_key_value_heads=4,
    vocab_size=152064,
    intermediate_size=18944,
    tie_word_embeddings=False,
)
LLAMA_8B = dict(  # Llama-3.1-8B
    hidden_size=4096,
    num_hidden_layers=32,
    num_attention_heads=32,
    num_key_value_heads=8,
    vocab_size=128256,
    intermediate_size=14336,
    tie_word_embeddings=False,
)
QWEN_LARGE = dict(QWEN_7B, hidden_size=5120, num_attention_heads=40, num_key_value_heads=8)

# The GPU runs' model folders by name (Llama-3.1-8B-shape carries the kit tokenizer's vocabulary)
KIT_FOLDERS = {
    "Qwen2.5-0.5B-Instruct": QWEN_HALF_B,
    "Qwen2.5-1.5B-Instruct": QWEN_ONE_AND_HALF_B,
    "Qwen2.5-7B-Instruct": QWEN_7B,
    "Llama-3.1-8B-shape": dict(LLAMA_8B, vocab_size=151936),
    "Qwen2.5-14B-shape": dict(QWEN_LARGE, num_hidden_layers=48, intermediate_size=13824),
    "Qwen2.5-32B-shape": dict(QWEN_LARGE, num_hidden_layers=64, intermediate_size=27648),
    "Qwen2.5-0.5B-vocab262k": dict(QWEN_HALF_B, vocab_size=262144),
    "Qwen2.5-0.5B-vocab202k": dict(QWEN_HALF_B, vocab_size=202048),
}
