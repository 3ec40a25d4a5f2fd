"""`FoTConfig`: LLaMA configuration fields plus the Focused Transformer (FoT) memory fields.

Design choices:
- One config class (model_type "fot") also reads LongLLaMA configs (model_type "longllama"): their extra fields
  (`torch_attention`, `gradient_checkpoint_every_ith`, `rope_scaling`, ...) are accepted and kept, never required.
- `max_position_embeddings` is the window W; `last_context_length` the default local (generation) context.
- `rope_theta` is a plain float (no rope scaling variants: FoT/LongLLaMA use plain RoPE).
"""

from __future__ import annotations

from transformers import PretrainedConfig

MEM_DTYPES = ("bfloat16", "float16", "float32")
RETRIEVALS = ("dense", "topk", "faiss")


class FoTConfig(PretrainedConfig):
    """LLaMA decoder + FoT memory layers.

    LLaMA fields: vocab_size V, hidden_size D, intermediate_size (SwiGLU FFN), num_hidden_layers,
    num_attention_heads H, num_key_value_heads Hkv (GQA; None = H), head_dim Dh (None = D // H),
    max_position_embeddings (= window W), rms_norm_eps, rope_theta, tie_word_embeddings, initializer_range,
    bos/eos/pad_token_id.
    FoT fields:
      mem_layers: 0-based indices of memory layers (attend over local + memory keys in one softmax).
      mem_dtype: storage dtype of memory keys/values ("bfloat16" default, even for fp32 models).
      mem_positionals: False = no RoPE at all in memory layers.
      mem_attention_grouping: (heads, queries) chunk for memory attention, or None (kernel default).
      last_context_length: tokens of a long input kept local (not sent to memory); overridable per call.
      mem_retrieval: "dense" | "topk" | "faiss"; mem_topk: k for top-k retrieval.
      mem_capacity: max memory slots per layer (FIFO eviction) or None (unbounded).
      qk_norm: the paper's small-model variant (FOT_SPEC §1.3): queries and keys are L2-normalised per head
        before RoPE and the attention logit is a learnable per-head temperature times their cosine (in every
        layer; memory then stores the normalised keys). qk_norm_temperature: its initial value (our choice).
    LongLLaMA compatibility fields (accepted, stored): torch_attention, gradient_checkpoint_every_ith.
    """

    model_type = "fot"
    keys_to_ignore_at_inference = ["cache", "memory"]

    def __init__(
        self,
        vocab_size: int = 32000,
        hidden_size: int = 4096,
        intermediate_size: int = 11008,
        num_hidden_layers: int = 32,
        num_attention_heads: int = 32,
        num_key_value_heads: int | None = None,
        head_dim: int | None = None,
        hidden_act: str = "silu",
        max_position_embeddings: int = 2048,
        initializer_range: float = 0.02,
        rms_norm_eps: float = 1e-6,
        rope_theta: float = 10000.0,
        use_cache: bool = True,
        tie_word_embeddings: bool = False,
        bos_token_id: int | None = 1,
        eos_token_id: int | None = 2,
        pad_token_id: int | None = None,
        mem_layers: list[int] | tuple[int, ...] = (),
        mem_dtype: str = "bfloat16",
        mem_positionals: bool = True,
        mem_attention_grouping: tuple[int, int] | list[int] | None = None,
        last_context_length: int = 1024,
        mem_retrieval: str = "dense",
        mem_topk: int = 128,
        mem_capacity: int | None = None,
        qk_norm: bool = False,
        qk_norm_temperature: float = 10.0,
        torch_attention: bool = True,
        gradient_checkpoint_every_ith: int = 1,
        **kwargs,
    ):
        rope_params = kwargs.pop("rope_parameters", None)
        if isinstance(rope_params, dict) and "rope_theta" in rope_params:  # HF LLaMA v5 config dicts
            rope_theta = rope_params["rope_theta"]
        kwargs.pop("rope_scaling", None)  # LongLLaMA/LLaMA v4 configs carry `rope_scaling: null`
        if hidden_act != "silu":
            raise ValueError(f"FoTConfig supports hidden_act='silu' only, got {hidden_act!r}")
        if mem_dtype not in MEM_DTYPES:
            raise ValueError(f"mem_dtype must be one of {MEM_DTYPES}, got {mem_dtype!r}")
        if mem_retrieval not in RETRIEVALS:
            raise ValueError(f"mem_retrieval must be one of {RETRIEVALS}, got {mem_retrieval!r}")
        n_kv_heads = num_attention_heads if num_key_value_heads is None else num_key_value_heads
        if num_attention_heads % n_kv_heads:
            raise ValueError(f"num_attention_heads {num_attention_heads} not divisible by kv heads {n_kv_heads}")
        self.vocab_size = vocab_size
        self.hidden_size = hidden_size
        self.intermediate_size = intermediate_size
        self.num_hidden_layers = num_hidden_layers
        self.num_attention_heads = num_attention_heads
        self.num_key_value_heads = n_kv_heads
        self.head_dim = hidden_size // num_attention_heads if head_dim is None else head_dim
        self.hidden_act = hidden_act
        self.max_position_embeddings = max_position_embeddings
        self.initializer_range = initializer_range
        self.rms_norm_eps = rms_norm_eps
        self.rope_theta = float(rope_theta)
        self.use_cache = use_cache
        self.mem_layers = sorted(int(i) for i in mem_layers)
        bad = [i for i in self.mem_layers if not 0 <= i < num_hidden_layers]
        if bad:
            raise ValueError(f"mem_layers {bad} out of range for {num_hidden_layers} layers")
        self.mem_dtype = mem_dtype
        self.mem_positionals = bool(mem_positionals)
        self.mem_attention_grouping = None if mem_attention_grouping is None else tuple(mem_attention_grouping)
        self.last_context_length = int(last_context_length)
        self.mem_retrieval = mem_retrieval
        self.mem_topk = int(mem_topk)
        self.mem_capacity = mem_capacity
        self.qk_norm = bool(qk_norm)
        self.qk_norm_temperature = float(qk_norm_temperature)
        self.torch_attention = torch_attention
        self.gradient_checkpoint_every_ith = gradient_checkpoint_every_ith
        kwargs.pop("model_type", None)
        super().__init__(
            bos_token_id=bos_token_id,
            eos_token_id=eos_token_id,
            pad_token_id=pad_token_id,
            tie_word_embeddings=tie_word_embeddings,
            **kwargs,
        )
