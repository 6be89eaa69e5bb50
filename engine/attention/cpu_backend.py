"""The CPU backend: decodes through the compiled paged-attention kernel, prefill chunks as the torch backend."""

from __future__ import annotations

import torch

from engine.attention.backend import AttentionInputs
from engine.attention.torch_backend import TorchAttentionBackend
from kernels.paged_attention import paged_decode_attention


class CpuAttentionBackend(TorchAttentionBackend):
    def prepare_decodes(self, inputs: AttentionInputs) -> tuple[torch.Tensor, torch.Tensor]:
        return inputs.decode_block_tables.contiguous(), inputs.decode_context_lens

    def attend_decodes(self, q, k_cache, v_cache, decode) -> torch.Tensor:
        block_tables, context_lens = decode
        out = paged_decode_attention(
            q.float().contiguous(), k_cache, v_cache, block_tables, context_lens, self.scale, self.sliding_window
        )
        return out.to(q.dtype)
