"""world-alignment: a miniature CLIPScore, a contrastive image-text model trained on the world.

Image tower: a 4-layer CNN on 32 px (its flattened 4x4 map keeps where things are). Text tower:
a bag of the grammar's words (plurals folded, other words ignored) through a small MLP. Trained
with InfoNCE on renders of all the world's captions (see train_alignment), each image also
contrasted with captions that differ from its own in one attribute (hard negatives), on renders
degraded by noise and blur so that imperfect samples are scored sensibly. Score: cosine similarity of the two embeddings, in
[-1, 1]. Cached in `$PRDP_CACHE_DIR` like the world model.
"""
from __future__ import annotations

import hashlib
import json
import random
import re
from pathlib import Path
from typing import List, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..models.embedded_pretrain import cache_dir, fixed_threads
from .grammar import ATTRIBUTES, Scene, all_scenes
from .render import IMAGE_SIZE, render_batch

EMBED_DIM = 64
VOCAB = sorted({"a", *[w for values in ATTRIBUTES.values() for w in values]})
TRAIN_STEPS = 600
TRAIN_BATCH = 128
HARD_NEGATIVES = 4
TEMPERATURE = 0.07
LEARNING_RATE = 2e-3
POOL_SIZE = 6000
TRAIN_SEEDS_FROM = 2 ** 20    # render seeds below this are never trained on (tests use them)
DATA_VERSION = 3   # bump when the recipe, grammar or renderer changes


def caption_words(caption: str) -> List[int]:
    """Vocabulary ids of the grammar words in `caption` (plurals folded, other words dropped)."""
    ids = []
    for word in re.findall(r"[a-z]+", caption.lower()):
        if word not in VOCAB and word.endswith("s") and word[:-1] in VOCAB:
            word = word[:-1]
        if word in VOCAB:
            ids.append(VOCAB.index(word))
    return ids


class ImageTower(nn.Module):
    def __init__(self):
        super().__init__()
        self.layers = nn.Sequential(
            nn.Conv2d(3, 32, 3, padding=1), nn.GELU(),
            nn.Conv2d(32, 48, 3, stride=2, padding=1), nn.GELU(),
            nn.Conv2d(48, 64, 3, stride=2, padding=1), nn.GELU(),
            nn.Conv2d(64, 64, 3, stride=2, padding=1), nn.GELU(),
            nn.Flatten(), nn.Linear(64 * 4 * 4, 128), nn.GELU(), nn.Linear(128, EMBED_DIM))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """images [B, H, W, 3] in 0..1 -> unit embeddings [B, D]."""
        x = images.permute(0, 3, 1, 2).float()
        if x.shape[-2:] != (IMAGE_SIZE, IMAGE_SIZE):
            x = F.interpolate(x, size=(IMAGE_SIZE, IMAGE_SIZE), mode="area")
        return F.normalize(self.layers(x * 2 - 1), dim=-1)


class TextTower(nn.Module):
    def __init__(self):
        super().__init__()
        self.words = nn.EmbeddingBag(len(VOCAB), EMBED_DIM, mode="sum")
        self.mlp = nn.Sequential(nn.GELU(), nn.Linear(EMBED_DIM, 128), nn.GELU(), nn.Linear(128, EMBED_DIM))

    def forward(self, captions: Sequence[str]) -> torch.Tensor:
        """captions -> unit embeddings [B, D]; ValueError for a caption with no world word."""
        ids, offsets = [], []
        for caption in captions:
            words = caption_words(caption)
            if not words:
                raise ValueError(f"world-alignment scores captions of the world grammar, and {caption!r} has none "
                                 "of its words; use prompts like 'two small red circles on the left, black "
                                 "background' (see comfyui_prdp.world.grammar)")
            offsets.append(len(ids))
            ids.extend(words)
        bag = self.words(torch.tensor(ids), torch.tensor(offsets))
        return F.normalize(bag + self.mlp(bag), dim=-1)


class AlignmentModel(nn.Module):
    def __init__(self):
        super().__init__()
        self.image = ImageTower()
        self.text = TextTower()

    def similarity(self, images: torch.Tensor, captions: Sequence[str]) -> torch.Tensor:
        """Cosine similarity [B] of images[i] and captions[i]."""
        return (self.image(images) * self.text(captions)).sum(-1)


def degrade(images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Random blur and noise per image, as imperfect samples have ([B, H, W, 3] 0..1)."""
    x = images.permute(0, 3, 1, 2)
    blurred = F.avg_pool2d(F.pad(x, (1, 1, 1, 1), mode="replicate"), 3, stride=1)
    mix = torch.rand(len(x), 1, 1, 1, generator=generator)
    x = (1 - mix) * x + mix * blurred
    x = x + torch.randn(x.shape, generator=generator) * torch.rand(len(x), 1, 1, 1, generator=generator) * 0.12
    return x.clamp(0, 1).permute(0, 2, 3, 1)


#: how often each attribute is the one changed in a hard negative (shape, the finest detail at
#: 32 px, was ignored by a scorer trained with uniform weights: margin -0.04 on held-out renders)
NEGATIVE_WEIGHTS = {"count": 1, "size": 1, "colour": 1, "shape": 4, "position": 1, "background": 1}


def one_attribute_changed(scene: Scene, rng: random.Random) -> Scene:
    name = rng.choices(list(NEGATIVE_WEIGHTS), weights=list(NEGATIVE_WEIGHTS.values()))[0]
    other = rng.choice([v for v in ATTRIBUTES[name] if v != getattr(scene, name)])
    return scene.replace(**{name: other})


def train_alignment(model: AlignmentModel, seed: int, steps: int = TRAIN_STEPS) -> None:
    """Contrastive training in place on renders of every caption of the world (fresh seeds are
    held out for testing). Like CLIP, trained on the whole world and not on the generator's
    split: trained on the training captions alone, its image tower tied shape to colour and
    ranked shapes wrongly on the unseen shape-colour pairs (margin -0.07, 30 % right)."""
    scenes = all_scenes()
    rng = random.Random(seed + 777)
    generator = torch.Generator().manual_seed(seed + 778)
    pool_scenes = [rng.choice(scenes) for _ in range(POOL_SIZE)]
    seeds = [rng.randrange(TRAIN_SEEDS_FROM, 2 ** 31) for _ in range(POOL_SIZE)]
    pool = torch.from_numpy(render_batch(pool_scenes, seeds))
    optimizer = torch.optim.AdamW(model.parameters(), lr=LEARNING_RATE, weight_decay=1e-4)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min(1.0, (s + 1) / 30) * (1 - s / steps))
    model.train()
    from ..progress import PhaseProgress
    progress = PhaseProgress("training the world-alignment scorer (once, then cached)", steps)
    for step in range(steps):
        rows = [rng.randrange(POOL_SIZE) for _ in range(TRAIN_BATCH)]
        batch = [pool_scenes[r] for r in rows]
        images = model.image(degrade(pool[torch.tensor(rows)], generator))
        texts = model.text([s.caption() for s in batch])
        hard = model.text([one_attribute_changed(s, rng).caption() for s in batch for _ in range(HARD_NEGATIVES)])
        hard = hard.view(TRAIN_BATCH, HARD_NEGATIVES, EMBED_DIM)
        logits = images @ texts.T / TEMPERATURE
        hard_logits = torch.einsum("bd,bkd->bk", images, hard) / TEMPERATURE
        target = torch.arange(TRAIN_BATCH)
        same = torch.tensor([[a == b for b in batch] for a in batch])   # duplicate captions are no negatives
        logits = logits.masked_fill(same & ~torch.eye(TRAIN_BATCH, dtype=torch.bool), -1e4)
        loss = (F.cross_entropy(torch.cat([logits, hard_logits], 1), target)
                + F.cross_entropy(logits.T, target)) / 2
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
        progress.update(step + 1)
    progress.finish()
    model.eval().requires_grad_(False)


def cache_path(seed: int) -> Path:
    payload = json.dumps({"vocab": VOCAB, "dim": EMBED_DIM, "steps": TRAIN_STEPS, "batch": TRAIN_BATCH,
                          "hard": HARD_NEGATIVES, "t": TEMPERATURE, "lr": LEARNING_RATE, "pool": POOL_SIZE,
                          "data": DATA_VERSION, "negatives": NEGATIVE_WEIGHTS, "seed": seed, "torch": torch.__version__.split("+")[0]},
                         sort_keys=True)
    return cache_dir() / f"world-alignment-{hashlib.sha256(payload.encode()).hexdigest()[:16]}.safetensors"


def load_or_train_alignment(seed: int = 0) -> AlignmentModel:
    """The trained scorer from the cache, or trained now and cached atomically."""
    from safetensors.torch import load_file, save_file

    from ..lora.files import atomic_write

    path = cache_path(seed)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = AlignmentModel()
        if path.is_file():
            try:
                model.load_state_dict(load_file(str(path)))
                return model.eval().requires_grad_(False)
            except Exception:   # a broken cache file is rebuilt, never trusted
                pass
        print(f"training the world-alignment scorer once (cached in {path.parent})", flush=True)
        with fixed_threads():
            train_alignment(model, seed)
    state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    if not all(torch.isfinite(v).all() for v in state.values()):
        raise RuntimeError("world-alignment training produced non-finite weights; nothing was cached")
    atomic_write(path, lambda tmp: save_file(state, tmp))
    return model
