"""Tokens per second and model FLOPs utilisation (MFU) of training.

MFU follows PaLM (Chowdhery et al. 2022, appendix B): the FLOPs a step must do whatever the
implementation, ``6 N`` per token for the matrix multiplications of the forward and backward pass
over ``N`` non-embedding parameters, plus ``12 L d T`` for attention (``L`` layers, ``d`` the
attention width, ``T`` the sequence length), over the device's peak dense FLOP/s. Recomputation
(activation checkpointing) is not counted: it is work the hardware does, not the model.
"""

from __future__ import annotations

import torch

# Dense (no sparsity) peak FLOP/s from the vendors' data sheets: (name fragment, bf16, fp32).
# Ordered so that the first fragment found in the device name is the most specific one.
PEAK_FLOPS: tuple[tuple[str, float, float], ...] = (
    ("GH200", 989.4e12, 67e12),
    ("H200", 989.4e12, 67e12),
    ("H100 NVL", 835.5e12, 60e12),
    ("H100 PCIe", 756.5e12, 51e12),
    ("H100", 989.4e12, 67e12),  # SXM
    ("H800", 989.4e12, 67e12),
    ("B200", 2250e12, 80e12),
    ("A100", 312e12, 19.5e12),
    ("A800", 312e12, 19.5e12),
    ("L40S", 362.05e12, 91.6e12),
    ("L40", 181.05e12, 90.5e12),
    ("L4", 121e12, 30.3e12),
    ("A10", 125e12, 31.2e12),
    ("MI300X", 1307.4e12, 163.4e12),
    ("MI250X", 383e12, 47.9e12),
)


def device_peak_flops(device_name: str, precision: str) -> float | None:
    """The peak FLOP/s of a known accelerator at ``precision`` ("bf16" or "fp32"), None otherwise."""
    for fragment, bf16, fp32 in PEAK_FLOPS:
        if fragment.lower() in device_name.lower():
            return bf16 if precision == "bf16" else fp32
    return None


def local_peak_flops(device: torch.device, precision: str) -> float | None:
    """This process's accelerator's peak, None on a CPU or an unknown device."""
    if device.type != "cuda":
        return None
    return device_peak_flops(torch.cuda.get_device_name(device), precision)


def flops_per_token(config, n_params: int, n_embedding: int, seq_len: int) -> float:
    """Training FLOPs per token (forward and backward) of a decoder of ``config``.

    ``n_params`` counts every weight, ``n_embedding`` the input embedding's, which is a lookup
    rather than a matrix multiplication unless the output projection shares it.
    """
    tied = bool(getattr(config, "tie_word_embeddings", False))
    matmul = n_params - (0 if tied else n_embedding)
    layers = config.num_hidden_layers
    heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    return 6.0 * matmul + 12.0 * layers * heads * head_dim * seq_len


def mfu(tokens_per_s: float, flops_token: float, peak_flops_per_process: float, processes: int) -> float:
    """Achieved over peak FLOP/s of all processes together."""
    return tokens_per_s * flops_token / (peak_flops_per_process * processes)


def model_flops_per_token(model: torch.nn.Module, seq_len: int) -> float:
    """:func:`flops_per_token` of a Hugging Face model, whose weights may be ZeRO-3 partitions."""
    def numel(p: torch.nn.Parameter) -> int:
        return int(getattr(p, "ds_numel", p.numel()))  # a ZeRO-3 weight is empty outside forward

    n_params = sum(numel(p) for p in model.parameters())
    return flops_per_token(model.config, n_params, numel(model.get_input_embeddings().weight), seq_len)
