"""The CLIP ViT-L/14 text tower (transformers' CLIPTextModel), built from numbers, never from a hub.

Checkpoints store it as `cond_stage_model.transformer.text_model.*`. transformers 4.x has that
`text_model.` level inside CLIPTextModel; 5.x flattened it. `FrozenCLIPEmbedder.transformer.text_model`
is always the module that owns `embeddings`, `encoder` and `final_layer_norm`, so the keys match in both.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn


@dataclass(frozen=True)
class TextEncoderConfig:
    vocab_size: int = 49408
    hidden_size: int = 768
    intermediate_size: int = 3072
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    max_position_embeddings: int = 77
    hidden_act: str = "quick_gelu"
    layer_norm_eps: float = 1e-5


class _TransformerLevel(nn.Module):
    """Holds `text_model` so state-dict keys read `transformer.text_model.*` as in the checkpoints."""

    def __init__(self, text_model: nn.Module):
        super().__init__()
        self.text_model = text_model


class FrozenCLIPEmbedder(nn.Module):
    """Token ids (B, 77) -> last hidden state after the final layer norm (B, 77, hidden); CLIP skip."""

    def __init__(self, cfg: TextEncoderConfig):
        super().__init__()
        from transformers import CLIPTextConfig, CLIPTextModel

        hf_cfg = CLIPTextConfig(
            vocab_size=cfg.vocab_size,
            hidden_size=cfg.hidden_size,
            intermediate_size=cfg.intermediate_size,
            num_hidden_layers=cfg.num_hidden_layers,
            num_attention_heads=cfg.num_attention_heads,
            max_position_embeddings=cfg.max_position_embeddings,
            hidden_act=cfg.hidden_act,
            layer_norm_eps=cfg.layer_norm_eps,
            attention_dropout=0.0,
            dropout=0.0,
            bos_token_id=49406,
            eos_token_id=49407,
            pad_token_id=49407,
        )
        hf_cfg._attn_implementation = "sdpa"
        model = CLIPTextModel(hf_cfg)
        inner = getattr(model, "text_model", model)  # transformers 4.x nests, 5.x does not
        # Checkpoints carry position_ids (1, 77); newer transformers keep the buffer out of the state
        # dict. Make it persistent so the model's keys equal a real file's.
        ids = torch.arange(cfg.max_position_embeddings).unsqueeze(0)
        inner.embeddings.register_buffer("position_ids", ids, persistent=True)
        self.transformer = _TransformerLevel(inner)

    def forward(self, ids: torch.Tensor, clip_skip: int = 1, overrides=None) -> torch.Tensor:
        """CLIP skip N > 1 (A1111's "Clip skip"): the output of layer -N, through the final layer norm.
        overrides [(row, position, vectors (n, hidden))]: those token embeddings replaced (textual inversion)."""
        if overrides:
            hook = self.transformer.text_model.embeddings.token_embedding.register_forward_hook(
                lambda module, args, out: _replace_rows(out, overrides))
            try:
                return self.forward(ids, clip_skip)
            finally:
                hook.remove()
        text_model = self.transformer.text_model
        if clip_skip == 1:
            return text_model(input_ids=ids).last_hidden_state  # (B, 77, hidden)
        layers = len(text_model.encoder.layers)
        if not 1 <= clip_skip <= layers:
            raise ValueError(f"clip skip {clip_skip}: this text encoder has {layers} layers")
        out = text_model(input_ids=ids, output_hidden_states=True)
        return text_model.final_layer_norm(out.hidden_states[-clip_skip])  # (B, 77, hidden)


def _replace_rows(embedded: torch.Tensor, overrides) -> torch.Tensor:
    """Token embeddings (B, 77, hidden) with rows [row, pos : pos + n] set to the given vectors."""
    out = embedded.clone()
    for row, pos, vectors in overrides:
        out[row, pos : pos + vectors.shape[0]] = vectors.to(out.dtype)
    return out
