"""LoRA weights: safetensors files, key naming across formats, the ComfyUI model adapter."""
