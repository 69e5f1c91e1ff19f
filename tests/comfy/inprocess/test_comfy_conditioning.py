"""Conditionings of different lengths in one batch, on tiny in-process ComfyUI models (CPU).

- SD1.5: a prompt over 75 CLIP tokens (154-token conditioning) against the 77-token negative
  prompt at cfg > 1 (concat_cond used to crash); the guided prediction of each row equals the
  model's on that row alone.
- Qwen-Image (joint text-image attention) with a stand-in encoder whose output length is the
  prompt's token count: each batched row equals the model on that prompt alone (repeating a
  row's text tokens to a common length changes a joint-attention model's output).
- An encoder giving an attention_mask extra: passed to the model per row, as KSampler does.
"""
import math

import pytest
import torch

from comfy_inprocess import import_comfy, in_thread, make_backend, randomize_lora

import_comfy()

import comfy.model_management  # noqa: E402
import comfy.sd1_clip  # noqa: E402

from comfy_tiny_families import Family  # noqa: E402
from comfy_tiny_flow import TinyQwenStandInClip, _clip, tiny_flow_family  # noqa: E402
from comfyui_prdp.backends.comfyui.backend import ComfyBackend  # noqa: E402
from comfyui_prdp.config import TrainConfig  # noqa: E402
from comfyui_prdp.trainer import Trainer  # noqa: E402
from toy_backend import BrightnessReward  # noqa: E402
from comfyui_prdp.sampling import concat_cond, guided_prediction  # noqa: E402

END_TOKEN = 49407       # CLIP's end token; SD1Tokenizer pads with it
LONG_PROMPT = " ".join(["a very detailed photo of a cat"] * 20)     # > 75 tokens: 154-token conditioning
PROMPTS = ["a cat", "a red house on a green hill at sunset", "dog"]


def true_token_count(token_weight_pairs) -> int:
    """Tokens of the first section up to and including the first end token (the rest is padding)."""
    tokens = [pair[0] for pair in token_weight_pairs["l"][0]]
    return tokens.index(END_TOKEN, 1) + 1


class VariableLengthClip(TinyQwenStandInClip):
    """Hidden states of the prompt's own tokens only, as Qwen2.5-VL / Qwen3 / Gemma encoders
    give: the conditioning length varies with the prompt."""

    def encode_token_weights(self, token_weight_pairs):
        hidden, _ = super().encode_token_weights(token_weight_pairs)
        return hidden[:, :true_token_count(token_weight_pairs)], None


class MaskedClip(TinyQwenStandInClip):
    """Full 77-token hidden states with an attention_mask extra over the prompt's own tokens."""

    def encode_token_weights(self, token_weight_pairs):
        hidden, _ = super().encode_token_weights(token_weight_pairs)
        mask = torch.zeros(1, hidden.shape[1], dtype=torch.long)
        mask[:, :true_token_count(token_weight_pairs)] = 1
        return hidden, None, {"attention_mask": mask}


class ExtraClip(TinyQwenStandInClip):
    """An encoder giving a tensor extra PRDP does not know how to batch."""

    def encode_token_weights(self, token_weight_pairs):
        hidden, _ = super().encode_token_weights(token_weight_pairs)
        return hidden, None, {"conditioning_llama3": torch.zeros(1, 4, 8)}


def qwen_with(clip_class) -> Family:
    family = tiny_flow_family("qwen-image")
    with torch.inference_mode():
        clip = _clip(comfy.sd1_clip.SD1Tokenizer, clip_class, 11)
    return Family(family.model, clip, family.vae, "qwen-image")


def alone_x0(backend, clip, prompt, x, sigma):
    """x0 of the backend's (LoRA-patched) Qwen-Image on one prompt alone: the CLIP's own
    conditioning (CLIPTextEncode's), its extras passed as model_base would, the raw velocity."""
    with torch.inference_mode(False), torch.no_grad():
        context, extras = clip.encode_from_tokens_scheduled(clip.tokenize(prompt))[0]
        comfy.model_management.load_models_gpu([backend.patcher])
        model = backend.patcher.model
        kwargs = {}
        mask = extras.get("attention_mask")
        if mask is not None and "attention_mask" in model.extra_conds(attention_mask=mask):
            kwargs["attention_mask"] = mask       # this ComfyUI's Qwen-Image reads it (not 0.3.64's)
        v = model.diffusion_model(x, sigma.float(), context=context.float(), **kwargs)
    return x - sigma.view(-1, *[1] * (x.dim() - 1)).float() * v.float()


def batched_vs_alone(family, prompts):
    backend = make_backend(family)
    try:
        randomize_lora(backend)
        cond = in_thread(lambda: backend.encode_prompts(prompts))
        n = len(prompts)
        x = torch.randn(n, *backend.latent_shape(32, 32), generator=torch.Generator().manual_seed(5))
        sigma = torch.linspace(0.9, 0.3, n, dtype=torch.float64)
        with torch.no_grad():
            got = in_thread(lambda: backend.predict(x, sigma, cond).detach())
        expected = torch.cat([alone_x0(backend, family.clip, p, x[i:i + 1], sigma[i:i + 1])
                              for i, p in enumerate(prompts)])
        return cond, got, expected
    finally:
        backend.release()


def test_a_long_prompt_with_the_negative_prompt_at_cfg_is_each_row_alone(sd15):
    model, clip, vae = sd15
    with torch.inference_mode():
        backend = ComfyBackend(model, clip, vae, rank=2, seed=0)
    try:
        randomize_lora(backend)
        cond = in_thread(lambda: backend.encode_prompts(["a cat", LONG_PROMPT]))
        uncond = in_thread(lambda: backend.encode_prompts(["", ""]))
        assert cond["context"].shape[1] == 154 and uncond["context"].shape[1] == 77
        x = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(2))
        t = torch.tensor([900, 400])
        cfg = 4.5
        with torch.no_grad():
            got = in_thread(lambda: guided_prediction(backend, x, t, cond, uncond, cfg))
            rows = []
            for i, prompt in enumerate(["a cat", LONG_PROMPT]):
                one = in_thread(lambda p=prompt: backend.encode_prompts([p]))
                neg = in_thread(lambda: backend.encode_prompts([""]))
                c = in_thread(lambda: backend.predict_eps(x[i:i + 1], t[i:i + 1], one))
                u = in_thread(lambda: backend.predict_eps(x[i:i + 1], t[i:i + 1], neg))
                rows.append(u + cfg * (c - u))
        expected = torch.cat(rows)
        assert torch.isfinite(got).all()
        # batched vs alone is float32 rounding, times cfg in u + cfg * (c - u): 1.49e-5 measured on
        # one CPU (another gave < 1e-5), so the bound leaves room for kernels' rounding, not for a
        # row that reads another row's tokens
        assert (got - expected).abs().max() < 1e-4, (got - expected).abs().max()
        assert cond["context_tokens"].tolist() == [77, 154]
    finally:
        backend.release()


def test_concat_cond_refuses_different_lengths_without_true_token_counts():
    a, b = {"context": torch.zeros(1, 77, 8)}, {"context": torch.zeros(1, 154, 8)}
    with pytest.raises(ValueError, match="context_tokens"):
        concat_cond(a, b)
    joined = concat_cond({**a, "context_tokens": torch.tensor([77])}, {**b, "context_tokens": torch.tensor([154])})
    assert joined["context"].shape == (2, 154, 8) and joined["context_tokens"].tolist() == [77, 154]


def test_joint_attention_rows_of_different_lengths_are_each_the_prompt_alone():
    family = qwen_with(VariableLengthClip)
    cond, got, expected = batched_vs_alone(family, PROMPTS)
    assert (got - expected).abs().max() < 1e-5, (got - expected).abs().max()
    lengths = cond["context_tokens"].tolist()
    assert len(set(lengths)) == 3 and cond["context"].shape[1] > max(lengths)    # repeated to a common length


def test_an_attention_mask_extra_reaches_the_model_per_row():
    family = qwen_with(MaskedClip)
    cond, got, expected = batched_vs_alone(family, PROMPTS)
    assert (got - expected).abs().max() < 1e-5, (got - expected).abs().max()
    assert cond["attention_mask"].shape == (3, 77)
    assert len(set(cond["attention_mask"].sum(1).tolist())) == 3


def test_an_unknown_conditioning_extra_is_refused_before_training():
    family = qwen_with(ExtraClip)
    backend = make_backend(family)
    try:
        with pytest.raises(ValueError, match="'conditioning_llama3' conditioning extra"):
            in_thread(lambda: backend.encode_prompts(["a cat"]))
    finally:
        backend.release()


def test_lora_gradients_of_grouped_rows_are_those_of_each_row_alone():
    """Training goes through the row groups too: d(sum of batched x0)/d(LoRA) is the sum of the
    per-prompt gradients (rows put back in their order, none lost or doubled)."""
    family = qwen_with(VariableLengthClip)
    backend = make_backend(family)
    try:
        randomize_lora(backend)
        params = backend.trainable_parameters()
        x = torch.randn(3, *backend.latent_shape(32, 32), generator=torch.Generator().manual_seed(7))
        sigma = torch.tensor([0.8, 0.5, 0.2], dtype=torch.float64)
        weights = torch.randn(3, *x.shape[1:], generator=torch.Generator().manual_seed(8))

        def gradients(prompts, rows):
            def body():
                backend.prepare_for_training()
                cond = backend.encode_prompts(prompts)
                loss = (backend.predict(x[rows], sigma[rows], cond) * weights[rows]).sum()
                return [g.detach().clone() for g in torch.autograd.grad(loss, params)]
            return in_thread(body)

        batched = gradients(PROMPTS, [0, 1, 2])
        alone = [gradients([p], [i]) for i, p in enumerate(PROMPTS)]
        for i, total in enumerate(batched):
            expected = sum(a[i] for a in alone)
            assert torch.allclose(total, expected, atol=1e-5, rtol=1e-4), (total - expected).abs().max()
        assert max(g.abs().max() for g in batched) > 0
    finally:
        backend.release()


@pytest.mark.parametrize("kind", ["sd15 long prompt", "qwen-image variable length"])
def test_training_at_cfg_runs_on_policy_with_prompts_of_different_lengths(kind, sd15, tmp_path):
    """An epoch at cfg 3 with the (shorter) negative prompt: sampling, re-evaluation and the
    update all batch rows of different lengths; the re-evaluated log-probs are the recorded ones."""
    if kind.startswith("sd15"):
        model, clip, vae = sd15
        family, prompts, size = Family(model, clip, vae, "sd15"), ["a cat", LONG_PROMPT], 64
    else:
        family, prompts, size = qwen_with(VariableLengthClip), PROMPTS[:2], 32
    config = TrainConfig(epochs=1, prompts_per_epoch=2, images_per_prompt=2, updates_per_epoch=1, steps=3, cfg=3.0,
                         beta=0.05, clip_range=0.05, learning_rate=0.05, lora_rank=2, width=size, height=size,
                         sample_batch_size=4, train_batch_size=4, seed=5).validate()
    backend = make_backend(family)
    try:
        result = in_thread(Trainer(backend, BrightnessReward(), prompts, config, out_dir=tmp_path / "run").run)
        assert result.epochs_done == 1 and not result.stopped
        metrics = result.metrics[0]
        assert metrics["onpolicy_max_diff"] < 1e-5, metrics["onpolicy_max_diff"]
        assert all(math.isfinite(float(metrics[k])) for k in ("loss", "grad_norm"))
    finally:
        backend.release()
