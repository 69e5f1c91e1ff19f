"""comfyui-prdp engine: PRDP (Proximal Reward Difference Prediction, Deng et al., CVPR 2024)
online reward finetuning of a diffusion model's LoRA. Importable without ComfyUI."""

__version__ = "0.1.0"
