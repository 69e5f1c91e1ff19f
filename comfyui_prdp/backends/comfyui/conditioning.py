"""Prompt conditioning for ComfyUI models: prompts encoded by the user's CLIP (cached, with
the token extras passed to the model), contexts repeated to one length, rows grouped by their
true token count."""
from __future__ import annotations

import collections
import math
from typing import Dict, List

import torch

from ...models.inference_tensors import ordinary
from ..base import Cond

PROMPT_CACHE_SIZE = 64


def repeat_to_length(context: torch.Tensor, length: int) -> torch.Tensor:
    """[n, L, ...] -> [n, length, ...] by repeating whole token blocks (ComfyUI batches
    conditionings of different lengths this way; cross-attention is unchanged by it)."""
    if context.shape[1] == length:
        return context
    if length % context.shape[1]:
        raise ValueError(f"cannot repeat a conditioning of length {context.shape[1]} to {length}")
    return context.repeat(1, length // context.shape[1], *([1] * (context.dim() - 2)))


#: conditioning extras of ComfyUI's text encoders passed to the model per row, sliced with the
#: context to each row's true token count ([1, tokens] masks: Qwen-Image, Lumina2/Z-Image, Chroma, ...)
TOKEN_EXTRAS = ("attention_mask",)


def row_groups(cond: Cond) -> List[List[int]]:
    """Rows of `cond` that one model call may evaluate together, exactly as each alone: the
    same true token count ("context_tokens") and the same token extras (an attention mask
    is one per call: Lumina2 reads its sum as num_tokens)."""
    tokens = cond["context_tokens"].tolist()
    groups: "collections.OrderedDict[tuple, List[int]]" = collections.OrderedDict()
    for row, count in enumerate(tokens):
        key = (count,) + tuple(tuple(cond[k][row, :count].flatten().tolist()) for k in TOKEN_EXTRAS if k in cond)
        groups.setdefault(key, []).append(row)
    return list(groups.values())


class PromptConditioning:
    """ComfyBackend's prompt encoding (a mixin: it reads the backend's clip, device, model_name
    and prompt cache)."""

    def encode_prompts(self, prompts: List[str]) -> Cond:
        with self.interrupts_as_stop():
            rows = [self._encode_one(p) for p in prompts]
        length = math.lcm(*[row["context"].shape[1] for row in rows])
        cond = {"context": torch.cat([repeat_to_length(r["context"], length) for r in rows]),
                # each row's true token count: joint-attention models are evaluated at it (denoise)
                "context_tokens": torch.tensor([r["context"].shape[1] for r in rows], dtype=torch.int64)}
        if all("pooled_output" in r for r in rows):
            cond["pooled_output"] = torch.cat([r["pooled_output"] for r in rows])
        for key in TOKEN_EXTRAS:
            present = [key in r for r in rows]
            if any(present) and not all(present):
                raise ValueError(f"the text encoder gave a '{key}' for some prompts and not for others; "
                                 "use one CLIP for all prompts")
            if all(present):
                cond[key] = torch.cat([repeat_to_length(r[key], length) for r in rows])
        return {key: value.to(self.device) for key, value in cond.items()}

    def _encode_one(self, prompt: str) -> Dict[str, torch.Tensor]:
        cached = self._prompt_cache.get(prompt)
        if cached is not None:
            self._prompt_cache.move_to_end(prompt)
            return cached
        with torch.inference_mode():    # as CLIPTextEncode does (module docstring: Inference mode)
            schedule = self.clip.encode_from_tokens_scheduled(self.clip.tokenize(prompt))
        context, extras = schedule[0]
        row = {"context": ordinary(context.float().cpu())}
        pooled = extras.get("pooled_output")
        if self._needs_pooled and pooled is None:
            raise ValueError("this model needs the text encoder's pooled output, which the CLIP did not give")
        if self._pass_pooled and pooled is not None:
            row["pooled_output"] = ordinary(pooled.float().cpu()).reshape(1, -1)
        row.update(self._token_extras(extras, context))
        self._prompt_cache[prompt] = row
        while len(self._prompt_cache) > PROMPT_CACHE_SIZE:
            self._prompt_cache.popitem(last=False)
        return row

    def _token_extras(self, extras: dict, context: torch.Tensor) -> Dict[str, torch.Tensor]:
        """The conditioning extras passed to the model per row (TOKEN_EXTRAS); any other extra
        the encoder gives would be dropped, so the model would be trained on a conditioning
        KSampler does not use: refused in one line, before any model work."""
        row = {}
        for key, value in extras.items():
            if key == "pooled_output" or not isinstance(value, torch.Tensor):
                continue      # scheduling entries (clip_start_percent, hooks): not model inputs
            if key not in TOKEN_EXTRAS:
                raise ValueError(f"the text encoder of this {self.model_name} model gives a '{key}' conditioning "
                                 "extra, which PRDP does not pass to the model; train with a CLIP whose "
                                 "conditioning has only pooled_output / attention_mask extras")
            if value.dim() != 2 or value.shape[0] != 1 or value.shape[1] != context.shape[1]:
                raise ValueError(f"the text encoder's '{key}' extra of shape {tuple(value.shape)} "
                                 f"is not one mask over the {context.shape[1]} text tokens of {self.model_name}")
            row[key] = ordinary(value.cpu())
        return row
