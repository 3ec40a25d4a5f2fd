"""prefill_longllama: fotlab's prefill against the public LongLLaMA code on the same weights (issue 7 acceptance).

`python -m benchmarks prefill_longllama --longllama-code DIR --longllama-python PY --repeats 2`
(`--size tiny`: a seconds-long smoke run). DIR holds the public LongLLaMA modeling files
(`modeling_longllama.py`, `configuration_longllama.py`, `longllama_utils.py`); PY is an interpreter where that
code runs (transformers 4.33). Nothing of that code is part of this repo: it is imported at run time, in the
reference's own child processes only.

Design choices:
- ONE set of weights: the benchmark model of `models.py` (8 layers, D 512, 8 heads, vocab 32000, W 2048, last
  context 1024, fp32 weights, bf16 memory in layers 3 and 6) built by fotlab with seed 0 and written once as a
  LongLLaMA checkpoint dir (`config.json` with `model_type: "longllama"` and LongLLaMA's config field names,
  `model.safetensors` with LLaMA key names). The reference loads it with its own `from_pretrained`, fotlab with
  `FoTForCausalLM.from_pretrained(dir)`; so the two sides share config and weights by construction.
- Each side's natural user-facing call for a long prompt. fotlab: `model(ids, logits_to_keep=1,
  use_cache=False)` (as in `prefill.py`). Reference: `model(input_ids=ids)`, the call its README documents for
  long inputs (the forward itself splits the input into windows, fills the memory cache and keeps the last
  `last_context_length` tokens local). That call returns logits for EVERY position (L x 32000 fp32: 2 GiB at
  16k), which is what its users get. Two informational variants separate that cost from the attention code:
  `longllama-ref-lastlogits` (its lm_head applied to the last position only, a patch made here, not its
  documented call) and `longllama-ref-grouped` (its README's memory-saving `mem_attention_grouping=(4, 2048)`).
- Same process pattern as the other benchmarks: a fresh child per case and repeat (the reference's children run
  under PY), one math thread, CPU seconds of the timed region, peak RSS, a warm-up prompt of 2W tokens first,
  `torch.inference_mode()`.
- Same computation check: the fotlab child saves its prompt and next-token logits; the reference children of the
  same run load them and report `logits_max_abs_diff` (and `argmax_equal`) against their own.
"""

from __future__ import annotations

import importlib
import json
import sys
import tempfile
import time
import types
from pathlib import Path

import torch

from benchmarks import models
from benchmarks.runner import Case, current_rss_mib, peak_rss_mib, timed

BENCHMARK = "prefill_longllama"
LENGTHS = {"full": [4096, 16384], "tiny": [256]}
SEED = 0
GROUPING = (4, 2048)  # the LongLLaMA README's example of mem_attention_grouping
# case name -> implementation; the first is the ratio baseline, the second the acceptance reference
VARIANTS = {
    "fotlab": "fotlab",
    "longllama-ref": "ref",
    "longllama-ref-lastlogits": "ref-lastlogits",
    "longllama-ref-grouped": "ref-grouped",
}
OPTIONS: dict = {}  # set by configure(): code dir, interpreter, checkpoint root


def configure(code: str | None, python: str | None, ckpt_root: str | None = None) -> None:
    """Where the reference code and interpreter are (both or neither) and where checkpoints are kept."""
    if bool(code) != bool(python):
        raise ValueError("--longllama-code and --longllama-python go together")
    OPTIONS.clear()
    if code:
        if not (Path(code) / "modeling_longllama.py").is_file():
            raise FileNotFoundError(f"{code}: no modeling_longllama.py")
        OPTIONS.update(
            code=str(Path(code).resolve()),
            python=python,
            ckpt_root=str(ckpt_root or Path(tempfile.gettempdir()) / "fotlab-bench-longllama"),
        )


def cases(size: str) -> list[Case]:
    """Cases per prompt length, fotlab first; writes the shared checkpoint once. No cases when not configured."""
    if not OPTIONS:
        print(f"{BENCHMARK}: skipped (needs --longllama-code and --longllama-python)", file=sys.stderr)
        return []
    ckpt = write_checkpoint(size, Path(OPTIONS["ckpt_root"]) / f"{size}-seed{SEED}")
    run_id = time.strftime("%Y%m%d-%H%M%S")
    out = []
    for length in LENGTHS[size]:
        group = f"{length // 1024}k tokens" if length >= 1024 else f"{length} tokens"
        for name, impl in VARIANTS.items():
            params = {"size": size, "length": length, "impl": impl, "ckpt": str(ckpt), "run_id": run_id}
            python = None
            if impl != "fotlab":
                params["code"], python = OPTIONS["code"], OPTIONS["python"]
            out.append(Case(BENCHMARK, group, name, params, python=python))
    return out


# ---- the shared checkpoint (written by fotlab in the parent process) ----


def longllama_config(size: str) -> dict:
    """config.json of the benchmark model in LongLLaMA's format (its public config field names)."""
    shape = models.SHAPES[size]
    return {
        "model_type": "longllama",
        "architectures": ["LongLlamaForCausalLM"],
        "torch_dtype": "float32",
        **{
            k: shape[k]
            for k in (
                "vocab_size",
                "hidden_size",
                "intermediate_size",
                "num_hidden_layers",
                "num_attention_heads",
                "max_position_embeddings",
                "last_context_length",
            )
        },
        "hidden_act": "silu",
        "initializer_range": 0.02,
        "rms_norm_eps": 1e-6,
        "use_cache": True,
        "pad_token_id": 0,
        "bos_token_id": 1,
        "eos_token_id": 2,
        "tie_word_embeddings": False,
        "mem_layers": list(models.PREFILL_MEM_LAYERS[size]),
        "mem_positionals": True,
        "mem_dtype": "bfloat16",
        "mem_attention_grouping": None,
    }


def write_checkpoint(size: str, path: Path) -> Path:
    """The benchmark model's weights (fotlab init, seed SEED) as a LongLLaMA checkpoint dir; reused if present."""
    if (path / "config.json").exists() and (path / "model.safetensors").exists():
        return path
    from safetensors.torch import save_file

    config = longllama_config(size)
    fot_config = models.fot_config(size, config["mem_layers"], rms_norm_eps=config["rms_norm_eps"])
    model = models.build_fot(fot_config, seed=SEED)
    state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    head_dim = config["hidden_size"] // config["num_attention_heads"]
    inv_freq = 1.0 / (10000.0 ** (torch.arange(0, head_dim, 2).float() / head_dim))  # RoPE, base 10000
    for i in range(config["num_hidden_layers"]):  # a buffer LongLLaMA checkpoints carry (fotlab drops it)
        state[f"model.layers.{i}.self_attn.rotary_emb.inv_freq"] = inv_freq.clone()
    path.mkdir(parents=True, exist_ok=True)
    save_file(state, str(path / "model.safetensors"), metadata={"format": "pt"})  # "pt": transformers 4.x wants it
    (path / "config.json").write_text(json.dumps(config, indent=1))
    return path


# ---- inside the child processes ----


def import_reference(code_dir: str):
    """The reference's modeling module, imported from `code_dir` as a package (its files import each other
    relatively; the dir need not have an __init__.py)."""
    name = "longllama_reference_code"
    if name not in sys.modules:
        package = types.ModuleType(name)
        package.__path__ = [code_dir]
        sys.modules[name] = package
    return importlib.import_module(f"{name}.modeling_longllama")


class LastPositionHead(torch.nn.Module):
    """Wraps an lm_head so that only the last position's logits are computed: (B, L, D) -> (B, 1, V)."""

    def __init__(self, head: torch.nn.Module):
        super().__init__()
        self.head = head

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.head(hidden[:, -1:])


def load_model(params: dict):
    """(model, next-token-logits function) of one side, loaded from the shared checkpoint dir."""
    if params["impl"] == "fotlab":
        from benchmarks.prefill import prefill
        from fotlab.model import FoTForCausalLM

        return FoTForCausalLM.from_pretrained(params["ckpt"]).eval(), prefill
    modeling = import_reference(params["code"])
    extra = {"mem_attention_grouping": GROUPING} if params["impl"] == "ref-grouped" else {}
    model = modeling.LongLlamaForCausalLM.from_pretrained(params["ckpt"], **extra).eval()
    if params["impl"] == "ref-lastlogits":
        model.lm_head = LastPositionHead(model.lm_head)
    return model, reference_prefill


def reference_prefill(model, ids: torch.Tensor) -> torch.Tensor:
    """The reference's documented long-input call; next-token logits (B, V) from its (B, L, V) output."""
    return model(input_ids=ids).logits[:, -1]


def _exchange_file(params: dict) -> Path:
    return Path(params["ckpt"]) / "logits" / f"fotlab-{params['length']}-{params['run_id']}.pt"


def _compare(params: dict, ids: torch.Tensor, logits: torch.Tensor) -> dict:
    """fotlab child: save (ids, logits). Reference child: max abs diff against fotlab's logits of this run."""
    file = _exchange_file(params)
    if params["impl"] == "fotlab":
        file.parent.mkdir(exist_ok=True)
        torch.save({"ids": ids, "logits": logits.float()}, file)
        return {}
    if not file.exists():
        return {}  # the fotlab case of this run failed: nothing to compare with
    theirs = torch.load(file)
    if not torch.equal(theirs["ids"], ids):
        raise RuntimeError("fotlab and the reference read different prompts")
    diff = (logits.float() - theirs["logits"]).abs().max().item()
    return {
        "logits_max_abs_diff": diff,
        "argmax_equal": int(torch.equal(logits.argmax(-1), theirs["logits"].argmax(-1))),
    }


def run(params: dict) -> dict:
    torch.manual_seed(0)
    model, next_logits = load_model(params)
    shape = models.SHAPES[params["size"]]
    with torch.inference_mode():
        next_logits(model, models.random_ids(1, 2 * shape["max_position_embeddings"], shape["vocab_size"], seed=1))
        rss_before = current_rss_mib()
        ids = models.random_ids(1, params["length"], shape["vocab_size"])
        seconds, cpu_seconds, logits = timed(next_logits, model, ids)
    peak = peak_rss_mib()
    if not torch.isfinite(logits).all():
        raise RuntimeError("non-finite logits")
    metrics = {
        "cpu_seconds": cpu_seconds,
        "seconds": seconds,
        "peak_rss_mib": peak,
        "prefill_rss_mib": peak - rss_before,
        "tokens_per_cpu_s": params["length"] / cpu_seconds,
        "logits_max_abs": logits.abs().max().item(),
    }
    if params["impl"] != "fotlab":
        import transformers

        metrics["transformers"] = transformers.__version__
    return {**metrics, **_compare(params, ids, logits), "threads": torch.get_num_threads()}
