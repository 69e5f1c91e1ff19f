"""A miniature captioned world: a compositional caption grammar with a train/held-out split
(grammar.py), a deterministic 32 px renderer (render.py), the embedded diffusion model
pretrained on it (model.py, pretrain.py) and the rewards that belong to it (alignment.py,
preference.py). Importing this package is cheap; torch models are built on demand.
"""
from .grammar import Scene, all_scenes, held_out_prompts, parse_caption, split_scenes, train_prompts
from .render import IMAGE_SIZE, render_scene

__all__ = ["Scene", "all_scenes", "held_out_prompts", "parse_caption", "split_scenes", "train_prompts",
           "IMAGE_SIZE", "render_scene"]
