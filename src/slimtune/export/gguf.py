"""A merged causal LM as one GGUF file that llama.cpp (and Ollama, LM Studio...) runs.

Written with the `gguf` package (llama.cpp's own gguf-py): GGUFWriter for the file, TensorNameMap for the
tensor names, gguf.quants for Q8_0, the way llama.cpp's convert_hf_to_gguf.py writes the same model:
  - hyperparameters: context / embedding / feed-forward lengths, block count, head counts, key / value
    lengths, RMS-norm epsilon, RoPE base and dimension count (and linear RoPE scaling), vocabulary size
    (llama), file type;
  - tensors: q_proj / k_proj rows permuted for llama (llama.cpp rotates interleaved pairs, transformers
    rotates halves: `permute(w, n_head, n_head_kv)`), the output matrix left out when it is the embedding
    (llama.cpp ties it back), 1-D tensors, norms and biases in F32, the rest in F16 or Q8_0 (a row Q8_0's
    32-value blocks do not divide falls back to F16, as llama.cpp's converter does);
  - tokenizer metadata: gguf_vocab.py.
Supported: the llama family (LlamaForCausalLM, MistralForCausalLM; SmolLM / SmolLM2 are llama) and Qwen2.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Iterator

import torch

from ..errors import ModelError
from .gguf_vocab import add_tokenizer

# transformers class -> llama.cpp architecture (convert_hf_to_gguf.py registers Mistral on its llama model)
ARCHITECTURES = {"LlamaForCausalLM": "llama", "MistralForCausalLM": "llama", "Qwen2ForCausalLM": "qwen2"}
QUANTS = ("f16", "q8_0")
CONVERT_HINT = ("export the merged model (`slimtune export RUN OUT --format merged --dtype bf16`) and convert that "
                "folder with llama.cpp's converter: `python convert_hf_to_gguf.py OUT --outfile model.gguf "
                "--outtype q8_0`")


def gguf_architecture(model: torch.nn.Module) -> str:
    name = type(model).__name__
    if name not in ARCHITECTURES:
        raise ModelError(f"GGUF export supports {', '.join(ARCHITECTURES)}; this run's model is {name}. "
                         f"For other architectures, {CONVERT_HINT}")
    return ARCHITECTURES[name]


def write_gguf(model: torch.nn.Module, tokenizer: Any, meta: dict, path: Path, quant: str, name: str) -> list[str]:
    """Write `path`; returns the warnings said on the way (an unrecognised pre-tokenizer, ...)."""
    import gguf

    arch = gguf_architecture(model)
    warnings: list[str] = []
    writer = gguf.GGUFWriter(str(path), arch, use_temp_file=True)  # tensors spill to disk, not all held in memory
    writer.add_type(gguf.GGUFType.MODEL)
    writer.add_name(name)
    file_type = gguf.LlamaFileType.MOSTLY_Q8_0 if quant == "q8_0" else gguf.LlamaFileType.MOSTLY_F16
    add_hparams(writer, model.config, arch, int(file_type))
    n_vocab = model.get_input_embeddings().weight.shape[0]
    add_tokenizer(writer, tokenizer, meta, n_vocab, warnings)
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    for gguf_name, data in gguf_tensors(model, arch):
        data, qtype = quantized(gguf_name, data, quant)
        writer.add_tensor(gguf_name, data, raw_dtype=qtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return warnings


def _rope(config: Any) -> tuple[float, dict]:
    """(RoPE base, scaling parameters): transformers 5 holds both in rope_parameters, earlier ones apart."""
    params = dict(getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {})
    theta = params.get("rope_theta", getattr(config, "rope_theta", None))
    return float(theta if theta is not None else 10000.0), params


def add_hparams(writer: Any, config: Any, arch: str, file_type: int) -> None:
    """convert_hf_to_gguf.py's set_gguf_parameters for these architectures."""
    import gguf

    heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(heads)
    writer.add_head_count_kv(getattr(config, "num_key_value_heads", None) or heads)
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    theta, scaling = _rope(config)
    writer.add_rope_freq_base(theta)
    writer.add_rope_dimension_count(head_dim)
    writer.add_key_length(head_dim)
    writer.add_value_length(head_dim)
    rope_type = scaling.get("rope_type") or scaling.get("type") or "default"
    if rope_type == "linear":
        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(float(scaling["factor"]))
    elif rope_type != "default":
        raise ModelError(f"the model's RoPE scaling {rope_type!r} is not one slimtune writes to GGUF (default, "
                         f"linear); {CONVERT_HINT}")
    if arch == "llama":
        writer.add_vocab_size(config.vocab_size)
    writer.add_file_type(file_type)


def permute(weights: torch.Tensor, n_head: int, n_head_kv: int | None) -> torch.Tensor:
    """convert_hf_to_gguf.py's LlamaModel.permute: the rows of each head from transformers' half-split RoPE
    order to the interleaved pairs llama.cpp's rotation expects (k: by its kv heads)."""
    if n_head_kv is not None and n_head != n_head_kv:
        n_head = n_head_kv
    return (weights.reshape(n_head, 2, weights.shape[0] // n_head // 2, *weights.shape[1:])
            .swapaxes(1, 2).reshape(weights.shape))


def gguf_tensors(model: torch.nn.Module, arch: str) -> Iterator[tuple[str, Any]]:
    """(GGUF name, float32 numpy array) for every tensor llama.cpp loads."""
    import gguf

    config = model.config
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH[arch.upper()], config.num_hidden_layers)
    out, emb = model.get_output_embeddings(), model.get_input_embeddings()
    tied = out is not None and out.weight.data_ptr() == emb.weight.data_ptr()
    n_head = config.num_attention_heads
    n_kv = getattr(config, "num_key_value_heads", None)
    for hf_name, tensor in model.state_dict().items():
        if (tied and hf_name == "lm_head.weight") or hf_name.endswith("rotary_emb.inv_freq"):
            continue
        gguf_name = names.get_name(hf_name, try_suffixes=(".weight", ".bias"))
        if gguf_name is None:
            raise ModelError(f"no GGUF name for the model's tensor {hf_name!r}; {CONVERT_HINT}")
        data = tensor.detach().to(torch.float32)
        if arch == "llama" and hf_name.endswith(("q_proj.weight", "q_proj.bias")):
            data = permute(data, n_head, n_head)
        elif arch == "llama" and hf_name.endswith(("k_proj.weight", "k_proj.bias")):
            data = permute(data, n_head, n_kv)
        yield gguf_name, data.squeeze().contiguous().numpy()


def quantized(name: str, data: Any, quant: str) -> tuple[Any, Any]:
    """The tensor's bytes and GGML type, chosen as convert_hf_to_gguf.py's prepare_tensors chooses them."""
    import gguf

    types = gguf.GGMLQuantizationType
    if data.ndim <= 1 or name.endswith("_norm.weight") or not name.endswith(".weight"):
        qtype = types.F32  # llama.cpp reads 1-D tensors, norms and biases as F32
    else:
        qtype = types.Q8_0 if quant == "q8_0" else types.F16
    try:
        return gguf.quants.quantize(data, qtype), qtype
    except gguf.QuantError:  # rows not a multiple of Q8_0's 32-value block
        return gguf.quants.quantize(data, types.F16), types.F16
