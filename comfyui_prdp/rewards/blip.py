"""The two BLIP towers ImageReward uses, with the parameter names of its checkpoint.

- `BlipVisionTransformer`: a ViT (pre-norm blocks, LayerNorm eps 1e-6, exact GELU, class token,
  learned positions) returning the normalised token sequence [B, 1 + patches, width].
- `BlipTextEncoder`: BERT (post-norm, LayerNorm eps 1e-12, exact GELU, word + position
  embeddings, no token types) whose every layer also cross-attends to the image tokens,
  BLIP's "multimodal" mode; returns the hidden states [B, tokens, hidden].
Sizes are read from a state dict (`*_config_from_state`); heads have 64 channels, as in
ViT-L/16 (16 heads of 1024) and BERT-base (12 heads of 768).
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Mapping, Optional

import torch
import torch.nn.functional as F
from torch import nn

HEAD_DIM = 64


def _count_layers(state: Mapping[str, torch.Tensor], pattern: str) -> int:
    indices = {int(m.group(1)) for key in state if (m := re.match(pattern, key))}
    return max(indices) + 1 if indices else 0


# --- vision ----------------------------------------------------------------------------------

@dataclass(frozen=True)
class VisionConfig:
    image_size: int = 224
    patch_size: int = 16
    width: int = 1024
    depth: int = 24
    heads: int = 16
    mlp_width: int = 4096


def vision_config_from_state(state: Mapping[str, torch.Tensor]) -> VisionConfig:
    """Sizes of the ViT whose weights are `state` (keys without the visual_encoder. prefix)."""
    width = state["cls_token"].shape[-1]
    patch = state["patch_embed.proj.weight"].shape[-1]
    patches = state["pos_embed"].shape[1] - 1
    side = int(round(patches ** 0.5))
    if side * side != patches:
        raise ValueError(f"pos_embed holds {patches} patch positions: not a square grid")
    return VisionConfig(image_size=side * patch, patch_size=patch, width=width,
                        depth=_count_layers(state, r"blocks\.(\d+)\."), heads=max(1, width // HEAD_DIM),
                        mlp_width=state["blocks.0.mlp.fc1.weight"].shape[0])


class _PatchEmbed(nn.Module):
    def __init__(self, patch_size: int, width: int):
        super().__init__()
        self.proj = nn.Conv2d(3, width, kernel_size=patch_size, stride=patch_size)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.proj(pixels).flatten(2).transpose(1, 2)


class _SelfAttention(nn.Module):
    def __init__(self, width: int, heads: int):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(width, 3 * width)
        self.proj = nn.Linear(width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, tokens, width = x.shape
        q, k, v = self.qkv(x).reshape(batch, tokens, 3, self.heads, width // self.heads).permute(2, 0, 3, 1, 4)
        out = F.scaled_dot_product_attention(q, k, v)
        return self.proj(out.transpose(1, 2).reshape(batch, tokens, width))


class _Mlp(nn.Module):
    def __init__(self, width: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(width, hidden)
        self.fc2 = nn.Linear(hidden, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x)))


class _VisionBlock(nn.Module):
    def __init__(self, config: VisionConfig):
        super().__init__()
        self.norm1 = nn.LayerNorm(config.width, eps=1e-6)
        self.attn = _SelfAttention(config.width, config.heads)
        self.norm2 = nn.LayerNorm(config.width, eps=1e-6)
        self.mlp = _Mlp(config.width, config.mlp_width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class BlipVisionTransformer(nn.Module):
    def __init__(self, config: VisionConfig):
        super().__init__()
        self.config = config
        patches = (config.image_size // config.patch_size) ** 2
        self.patch_embed = _PatchEmbed(config.patch_size, config.width)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, config.width))
        self.pos_embed = nn.Parameter(torch.zeros(1, patches + 1, config.width))
        self.blocks = nn.ModuleList(_VisionBlock(config) for _ in range(config.depth))
        self.norm = nn.LayerNorm(config.width, eps=1e-6)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        x = self.patch_embed(pixels)
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1)
        x = x + self.pos_embed[:, : x.shape[1]]
        for block in self.blocks:
            x = block(x)
        return self.norm(x)


# --- text ------------------------------------------------------------------------------------

@dataclass(frozen=True)
class TextConfig:
    vocab_size: int = 30524
    hidden: int = 768
    layers: int = 12
    heads: int = 12
    intermediate: int = 3072
    max_positions: int = 512
    encoder_width: int = 1024
    pad_token_id: int = 0


def text_config_from_state(state: Mapping[str, torch.Tensor]) -> TextConfig:
    """Sizes of the BERT whose weights are `state` (keys without the text_encoder. prefix)."""
    vocab, hidden = state["embeddings.word_embeddings.weight"].shape
    return TextConfig(
        vocab_size=vocab, hidden=hidden, heads=max(1, hidden // HEAD_DIM),
        layers=_count_layers(state, r"encoder\.layer\.(\d+)\."),
        intermediate=state["encoder.layer.0.intermediate.dense.weight"].shape[0],
        max_positions=state["embeddings.position_embeddings.weight"].shape[0],
        encoder_width=state["encoder.layer.0.crossattention.self.key.weight"].shape[1])


class _Embeddings(nn.Module):
    def __init__(self, config: TextConfig):
        super().__init__()
        self.word_embeddings = nn.Embedding(config.vocab_size, config.hidden, padding_idx=config.pad_token_id)
        self.position_embeddings = nn.Embedding(config.max_positions, config.hidden)
        self.LayerNorm = nn.LayerNorm(config.hidden, eps=1e-12)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        positions = torch.arange(input_ids.shape[1], device=input_ids.device)
        return self.LayerNorm(self.word_embeddings(input_ids) + self.position_embeddings(positions))


class _AttentionHeads(nn.Module):
    """BERT's query/key/value projections (keys and values may come from another width)."""

    def __init__(self, hidden: int, heads: int, source_width: int):
        super().__init__()
        self.heads = heads
        self.query = nn.Linear(hidden, hidden)
        self.key = nn.Linear(source_width, hidden)
        self.value = nn.Linear(source_width, hidden)

    def _split(self, x: torch.Tensor) -> torch.Tensor:
        return x.reshape(x.shape[0], x.shape[1], self.heads, -1).transpose(1, 2)

    def forward(self, x: torch.Tensor, source: torch.Tensor, mask: Optional[torch.Tensor]) -> torch.Tensor:
        q, k, v = self._split(self.query(x)), self._split(self.key(source)), self._split(self.value(source))
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        return out.transpose(1, 2).reshape(x.shape[0], x.shape[1], -1)


class _AttentionOutput(nn.Module):
    def __init__(self, hidden: int):
        super().__init__()
        self.dense = nn.Linear(hidden, hidden)
        self.LayerNorm = nn.LayerNorm(hidden, eps=1e-12)

    def forward(self, x: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        return self.LayerNorm(self.dense(x) + residual)


class _Attention(nn.Module):
    def __init__(self, hidden: int, heads: int, source_width: int):
        super().__init__()
        self.self = _AttentionHeads(hidden, heads, source_width)
        self.output = _AttentionOutput(hidden)

    def forward(self, x: torch.Tensor, source: torch.Tensor, mask: Optional[torch.Tensor]) -> torch.Tensor:
        return self.output(self.self(x, source, mask), x)


class _Dense(nn.Module):
    def __init__(self, inputs: int, outputs: int, norm: bool):
        super().__init__()
        self.dense = nn.Linear(inputs, outputs)
        if norm:
            self.LayerNorm = nn.LayerNorm(outputs, eps=1e-12)


class _TextLayer(nn.Module):
    def __init__(self, config: TextConfig):
        super().__init__()
        self.attention = _Attention(config.hidden, config.heads, config.hidden)
        self.crossattention = _Attention(config.hidden, config.heads, config.encoder_width)
        self.intermediate = _Dense(config.hidden, config.intermediate, norm=False)
        self.output = _Dense(config.intermediate, config.hidden, norm=True)

    def forward(self, x: torch.Tensor, mask: torch.Tensor, image: torch.Tensor) -> torch.Tensor:
        x = self.attention(x, x, mask)
        x = self.crossattention(x, image, None)  # every image token is attended to
        hidden = F.gelu(self.intermediate.dense(x))
        return self.output.LayerNorm(self.output.dense(hidden) + x)


class _TextStack(nn.Module):
    def __init__(self, config: TextConfig):
        super().__init__()
        self.layer = nn.ModuleList(_TextLayer(config) for _ in range(config.layers))


class BlipTextEncoder(nn.Module):
    def __init__(self, config: TextConfig):
        super().__init__()
        self.config = config
        self.embeddings = _Embeddings(config)
        self.encoder = _TextStack(config)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                image_tokens: torch.Tensor) -> torch.Tensor:
        x = self.embeddings(input_ids)
        # BERT's additive mask: 0 where attended, -10000 at padding
        mask = (1.0 - attention_mask[:, None, None, :].to(x.dtype)) * -10000.0
        for layer in self.encoder.layer:
            x = layer(x, mask, image_tokens)
        return x
