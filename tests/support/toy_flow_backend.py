"""A tiny flow-matching Backend: the toy model of toy_backend.py in rectified-flow form.

Data x0 ~ N(m(c), DATA_STD^2) per element with the LoRA-trained prompt mean m(c); the model is
the exact posterior-mean denoiser at x_sigma = (1 - sigma) x0 + sigma noise. Like ComfyUI's
apply_model it predicts the denoised x0 (prediction "x0"); with prediction="velocity" it
answers v = noise - x0 as diffusers' flow transformers do. The schedule is SD3's shifted one:
sigma = shift t / (1 + (shift - 1) t), t = 1 - i / steps.
"""
from __future__ import annotations

import torch

from toy_backend import ToyBackend


def shifted_sigmas(steps: int, shift: float) -> torch.Tensor:
    t = 1 - torch.arange(steps + 1, dtype=torch.float64) / steps
    return shift * t / (1 + (shift - 1) * t)


class ToyFlowBackend(ToyBackend):
    model_name = "toy-flow"
    sampling_kind = "flow"

    def __init__(self, *args, shift: float = 3.0, prediction: str = "x0", **kwargs):
        super().__init__(*args, **kwargs)
        self.shift = shift
        self.prediction = prediction

    @property
    def alphas_cumprod(self):
        raise AttributeError("a flow model has no VP schedule")

    def flow_sigmas(self, steps):
        return shifted_sigmas(steps, self.shift)

    def denoised(self, x, sigma, cond):
        mean = self.lora(cond["context"][:, 0]).view_as(x)
        s = sigma.to(x.dtype).view(-1, 1, 1, 1)
        var = self.DATA_STD ** 2
        return mean + (1 - s) * var / ((1 - s) ** 2 * var + s ** 2) * (x - (1 - s) * mean)

    def predict(self, x, t, cond):
        x0 = self.denoised(x, t, cond)
        if self.prediction == "x0":
            return x0
        return (x - x0) / t.to(x.dtype).view(-1, 1, 1, 1)

    def predict_eps(self, x, t, cond):
        raise AssertionError("a flow backend is never asked for a VP noise prediction")
