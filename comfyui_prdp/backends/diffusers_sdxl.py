"""The diffusers backend for SDXL (`StableDiffusionXLPipeline` components) and its finetunes.

What SDXL adds to the SD1.x/SD2.x backend:
- two text encoders: the context is CLIP-L's and CLIP-G's penultimate hidden states side by
  side ([n, 77, 768 + 1280]); the pooled conditioning is CLIP-G's projected text embedding;
- `add_time_ids` = (original height, width, crop top, left, target height, width), here the
  training size of the latent being denoised with no crop, as SDXL's pipeline passes them
  when it generates at that size.
v-prediction and zero-terminal-SNR come from the scheduler, as for the other models.
Memory (see diffusers_backend): both text encoders wait on the CPU between encode calls, and the
float32 VAE decodes one 1024 x 1024 image at a time.
"""
from __future__ import annotations

from typing import List, Union

import torch

from ..models import families as model_families
from ..config import TrainConfig
from .base import Cond
from .diffusers_backend import DiffusersBackend


def is_sdxl_unet(unet) -> bool:
    return getattr(unet.config, "addition_embed_type", None) == "text_time"


class DiffusersSDXLBackend(DiffusersBackend):
    """UNet (text_time additional embeddings) + two CLIP text encoders + VAE + scheduler."""

    def __init__(self, unet, text_encoder, text_encoder_2, tokenizer, tokenizer_2, vae, scheduler,
                 config: TrainConfig, device: Union[str, torch.device, None] = None, model_name: str = "unknown",
                 offload_text_encoders: bool = True):
        if not is_sdxl_unet(unet):
            raise ValueError("this UNet has no SDXL size/pooled conditioning (addition_embed_type 'text_time'): "
                             "load it as an SD1.x/SD2.x model")
        if text_encoder_2 is None or tokenizer_2 is None:
            raise ValueError("an SDXL model needs text_encoder_2 and tokenizer_2 (CLIP-G); the folder lacks them")
        self.text_encoder_2, self.tokenizer_2 = text_encoder_2, tokenizer_2
        super().__init__(unet, text_encoder, tokenizer, vae, scheduler, config, device=device, model_name=model_name,
                         offload_text_encoders=offload_text_encoders)

    @classmethod
    def from_pipeline(cls, pipe, config: TrainConfig, device=None, model_name: str = "unknown"):
        return cls(pipe.unet, pipe.text_encoder, pipe.text_encoder_2, pipe.tokenizer, pipe.tokenizer_2, pipe.vae,
                   pipe.scheduler, config, device=device, model_name=model_name)

    @property
    def family(self) -> model_families.ModelFamily:
        return model_families.diffusers_family(True, self.prediction_type == "v_prediction")

    def text_encoder_modules(self) -> List[torch.nn.Module]:
        return [self.text_encoder, self.text_encoder_2]

    def _encode(self, prompts: List[str]) -> Cond:
        hidden_states = []
        pooled = None
        for tokenizer, encoder in ((self.tokenizer, self.text_encoder), (self.tokenizer_2, self.text_encoder_2)):
            tokens = tokenizer(list(prompts), padding="max_length", max_length=int(tokenizer.model_max_length),
                               truncation=True, return_tensors="pt")
            with self._autocast():
                out = encoder(tokens.input_ids.to(self.device), output_hidden_states=True)
            hidden_states.append(out.hidden_states[-2])
            pooled = out[0]        # the last encoder's (CLIP-G's) projected text embedding
        return {"context": torch.cat(hidden_states, dim=-1).to(self.dtype), "pooled_output": pooled.to(self.dtype)}

    def time_ids(self, x: torch.Tensor) -> torch.Tensor:
        """[n, 6] SDXL micro-conditioning for latents x: the training size, no crop."""
        height, width = x.shape[-2] * self.vae_scale_factor, x.shape[-1] * self.vae_scale_factor
        row = torch.tensor([height, width, 0, 0, height, width], dtype=x.dtype, device=x.device)
        return row.expand(x.shape[0], 6)

    def _unet_output(self, x: torch.Tensor, t: torch.Tensor, cond: Cond) -> torch.Tensor:
        added = {"text_embeds": cond["pooled_output"].to(self.device), "time_ids": self.time_ids(x)}
        return self.unet(x, t, encoder_hidden_states=cond["context"].to(self.device),
                         added_cond_kwargs=added).sample
