"""`--base` resolution: the embedded default, a saved diffusers folder, a single-file SD checkpoint
(original LDM key layout) with local configs, the Hugging Face cache, and clear errors — all with
no network (a socket guard fails any connection attempt)."""
import json
import shutil
import socket

import pytest
import torch
from safetensors.torch import save_file

from comfyui_prdp.config import preset
from comfyui_prdp.models.embedded import MODEL_NAME, build_embedded_stable_diffusion_pipeline
from comfyui_prdp.models.loading import ModelLoadError, load_backend, single_file_model_type


@pytest.fixture(autouse=True)
def no_network(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("a network connection was attempted")
    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)


@pytest.fixture
def empty_hf_cache(tmp_path, monkeypatch):
    import huggingface_hub.constants
    cache = tmp_path / "hf-cache"
    cache.mkdir()
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))
    return cache


@pytest.fixture(scope="module")
def saved_model(tmp_path_factory):
    """The embedded model saved as a diffusers folder (seed 0, so it equals the default)."""
    folder = tmp_path_factory.mktemp("models") / "tiny-sd"
    build_embedded_stable_diffusion_pipeline(0).save_pretrained(str(folder))
    return folder


def eps_of(backend):
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(2, *backend.latent_shape(64, 64), generator=generator)
    with torch.no_grad():
        return backend.predict_eps(x, torch.tensor([800, 50]), backend.encode_prompts(["a fox", ""]))


def put_in_hf_cache(cache, repo_id, source, patterns=("*",)):
    """Lay files out the way huggingface_hub stores a downloaded snapshot."""
    commit = "0" * 40
    repo = cache / ("models--" + repo_id.replace("/", "--"))
    snapshot = repo / "snapshots" / commit
    for path in source.rglob("*"):
        if path.is_file() and any(path.match(p) for p in patterns):
            target = snapshot / path.relative_to(source)
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(path, target)
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)


# --- an original-layout (LDM) single-file checkpoint of the tiny model, written independently -----
_RESNET = {"norm1": "in_layers.0", "conv1": "in_layers.2", "norm2": "out_layers.0", "conv2": "out_layers.3",
           "time_emb_proj": "emb_layers.1", "conv_shortcut": "skip_connection"}
_VAE_ATTENTION = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}


def _unet_prefixes(unet):
    """diffusers module prefix -> (LDM prefix, renames inside the module)."""
    levels, per_block = len(unet.config.block_out_channels), unet.config.layers_per_block
    prefixes = {"conv_in": ("input_blocks.0.0", {}), "time_embedding.linear_1": ("time_embed.0", {}),
                "time_embedding.linear_2": ("time_embed.2", {}), "conv_norm_out": ("out.0", {}),
                "conv_out": ("out.2", {}), "mid_block.resnets.0": ("middle_block.0", _RESNET),
                "mid_block.attentions.0": ("middle_block.1", {}), "mid_block.resnets.1": ("middle_block.2", _RESNET)}
    for level in range(levels):
        for layer in range(per_block):
            index = 1 + level * (per_block + 1) + layer
            prefixes[f"down_blocks.{level}.resnets.{layer}"] = (f"input_blocks.{index}.0", _RESNET)
            prefixes[f"down_blocks.{level}.attentions.{layer}"] = (f"input_blocks.{index}.1", {})
        prefixes[f"down_blocks.{level}.downsamplers.0.conv"] = (f"input_blocks.{(level + 1) * (per_block + 1)}.0.op", {})
        has_attention = unet.config.up_block_types[level].startswith("CrossAttn")
        for layer in range(per_block + 1):
            index = level * (per_block + 1) + layer
            prefixes[f"up_blocks.{level}.resnets.{layer}"] = (f"output_blocks.{index}.0", _RESNET)
            prefixes[f"up_blocks.{level}.attentions.{layer}"] = (f"output_blocks.{index}.1", {})
        last = level * (per_block + 1) + per_block
        prefixes[f"up_blocks.{level}.upsamplers.0.conv"] = (f"output_blocks.{last}.{2 if has_attention else 1}.conv", {})
    return prefixes


def _vae_prefixes(vae):
    levels = len(vae.config.block_out_channels)
    prefixes = {"encoder.conv_norm_out": ("encoder.norm_out", {}), "decoder.conv_norm_out": ("decoder.norm_out", {})}
    for part in ("encoder", "decoder"):
        prefixes[f"{part}.mid_block.resnets.0"] = (f"{part}.mid.block_1", {"conv_shortcut": "nin_shortcut"})
        prefixes[f"{part}.mid_block.resnets.1"] = (f"{part}.mid.block_2", {"conv_shortcut": "nin_shortcut"})
        prefixes[f"{part}.mid_block.attentions.0"] = (f"{part}.mid.attn_1", _VAE_ATTENTION)
    for level in range(levels):
        for layer in range(vae.config.layers_per_block + 1):
            prefixes[f"encoder.down_blocks.{level}.resnets.{layer}"] = (
                f"encoder.down.{level}.block.{layer}", {"conv_shortcut": "nin_shortcut"})
            prefixes[f"decoder.up_blocks.{level}.resnets.{layer}"] = (
                f"decoder.up.{levels - 1 - level}.block.{layer}", {"conv_shortcut": "nin_shortcut"})
        prefixes[f"encoder.down_blocks.{level}.downsamplers.0.conv"] = (f"encoder.down.{level}.downsample.conv", {})
        prefixes[f"decoder.up_blocks.{level}.upsamplers.0.conv"] = (f"decoder.up.{levels - 1 - level}.upsample.conv", {})
    return prefixes


def _rename(state, prefixes, ldm_root):
    out = {}
    for key, value in state.items():
        matches = [p for p in prefixes if key.startswith(p + ".")]
        if matches:
            prefix = max(matches, key=len)
            ldm_prefix, inner = prefixes[prefix]
            rest = key[len(prefix) + 1:]
            for old, new in inner.items():
                if rest.startswith(old + "."):
                    rest = new + rest[len(old):]
            key = f"{ldm_prefix}.{rest}"
        out[ldm_root + key] = value.contiguous()
    return out


def write_ldm_checkpoint(pipe, path):
    state = _rename(pipe.unet.state_dict(), _unet_prefixes(pipe.unet), "model.diffusion_model.")
    state.update(_rename(pipe.vae.state_dict(), _vae_prefixes(pipe.vae), "first_stage_model."))
    # real SD 1.x files name the text encoder `cond_stage_model.transformer.text_model.*`
    state.update({"cond_stage_model.transformer.text_model." + k.removeprefix("text_model."): v.contiguous()
                  for k, v in pipe.text_encoder.state_dict().items()})
    save_file(state, str(path))
    return path


@pytest.fixture(scope="module")
def single_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("ckpt") / "tiny-sd-v1.safetensors"
    return write_ldm_checkpoint(build_embedded_stable_diffusion_pipeline(0), path)


# --- the tests ------------------------------------------------------------------------------
def test_no_base_gives_the_embedded_model():
    for base in (None, "", MODEL_NAME):
        backend = load_backend(base, preset("cpu-smoke"), device="cpu")
        assert backend.model_name == MODEL_NAME
        assert tuple(backend.latent_shape(64, 64)) == (4, 8, 8)


def test_diffusers_folder(saved_model):
    backend = load_backend(str(saved_model), preset("cpu-smoke"), device="cpu")
    assert backend.model_name == "tiny-sd"
    assert torch.allclose(eps_of(backend), eps_of(load_backend(None, preset("cpu-smoke"), device="cpu")), atol=1e-6)
    assert backend.lora_info()["rank"] == 4


def test_single_file_with_a_local_config_folder(single_file, saved_model, empty_hf_cache):
    assert single_file_model_type(single_file) == "v1"
    backend = load_backend(str(single_file), preset("cpu-smoke"), device="cpu", base_config=str(saved_model))
    assert backend.model_name == "tiny-sd-v1"
    reference = load_backend(None, preset("cpu-smoke"), device="cpu")
    assert torch.allclose(eps_of(backend), eps_of(reference), atol=1e-5)
    latents = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    assert torch.allclose(backend.decode(latents), reference.decode(latents), atol=1e-5)


def test_single_file_without_configs_says_what_to_do(single_file, empty_hf_cache):
    with pytest.raises(ModelLoadError) as error:
        load_backend(str(single_file), preset("cpu-smoke"), device="cpu")
    message = str(error.value)
    assert "--base-config" in message and "base_config=" in message
    assert "huggingface-cli download stable-diffusion-v1-5/stable-diffusion-v1-5" in message
    assert "convert the checkpoint" in message


def test_single_file_uses_configs_from_the_hf_cache(single_file, saved_model, empty_hf_cache):
    put_in_hf_cache(empty_hf_cache, "stable-diffusion-v1-5/stable-diffusion-v1-5", saved_model,
                    patterns=("*.json", "*.txt"))
    backend = load_backend(str(single_file), preset("cpu-smoke"), device="cpu")
    reference = load_backend(None, preset("cpu-smoke"), device="cpu")
    assert torch.allclose(eps_of(backend), eps_of(reference), atol=1e-5)


def test_hub_id_from_the_hf_cache(saved_model, empty_hf_cache):
    with pytest.raises(ModelLoadError, match="not in the local Hugging Face cache"):
        load_backend("someone/tiny-sd", preset("cpu-smoke"), device="cpu")
    put_in_hf_cache(empty_hf_cache, "someone/tiny-sd", saved_model)
    backend = load_backend("someone/tiny-sd", preset("cpu-smoke"), device="cpu")
    assert backend.model_name == "someone/tiny-sd"
    assert torch.allclose(eps_of(backend), eps_of(load_backend(None, preset("cpu-smoke"), device="cpu")), atol=1e-6)


def test_clear_errors_for_bad_bases(tmp_path, saved_model):
    config = preset("cpu-smoke")
    with pytest.raises(FileNotFoundError, match="not found"):
        load_backend(str(tmp_path / "missing" / "model.safetensors"), config)
    with pytest.raises(ModelLoadError, match="model_index.json"):
        load_backend(str(tmp_path), config)
    text = tmp_path / "notes.txt"
    text.write_text("hello")
    with pytest.raises(ModelLoadError, match="not a model checkpoint"):
        load_backend(str(text), config)
    garbage = tmp_path / "broken.safetensors"
    garbage.write_bytes(b"not a safetensors file")
    with pytest.raises(ModelLoadError, match="could not be read"):
        load_backend(str(garbage), config)
    with pytest.raises(FileNotFoundError, match="not a directory"):
        load_backend(str(garbage), config, base_config=str(tmp_path / "nowhere"))


@pytest.mark.parametrize("edit, refusal", [
    # SDXL is supported; this one is incomplete
    (lambda index: index.update(text_encoder_2=["transformers", "CLIPTextModelWithProjection"]),
     "lacks the component.s. tokenizer_2 an SDXL pipeline needs"),
    (lambda index: index.update(transformer=["diffusers", "FluxTransformer2DModel"]), "runs UNet models"),
    (lambda index: index.pop("vae"), "lacks the component"),
], ids=["incomplete-sdxl", "flux-transformer", "no-vae"])
def test_other_architectures_and_incomplete_folders_are_refused(tmp_path, saved_model, edit, refusal):
    folder = tmp_path / "model"
    shutil.copytree(saved_model, folder)
    index = json.loads((folder / "model_index.json").read_text())
    edit(index)
    (folder / "model_index.json").write_text(json.dumps(index))
    with pytest.raises(ModelLoadError, match=refusal):
        load_backend(str(folder), preset("cpu-smoke"))


def test_a_single_file_sdxl_checkpoint_without_its_config_is_refused(tmp_path):
    xl_like = tmp_path / "xl.safetensors"
    save_file({"conditioner.embedders.1.model.transformer.resblocks.9.mlp.c_proj.bias": torch.zeros(2)}, str(xl_like))
    with pytest.raises(ModelLoadError, match="xl_base"):
        load_backend(str(xl_like), preset("cpu-smoke"))


@pytest.mark.parametrize("markers,prediction,zero_snr", [
    ((), "epsilon", False), (("v_pred",), "v_prediction", False), (("v_pred", "ztsnr"), "v_prediction", True)])
def test_single_file_v_pred_and_ztsnr_markers_set_the_schedule(markers, prediction, zero_snr, tmp_path,
                                                                saved_model, empty_hf_cache):
    from safetensors.torch import load_file
    from comfyui_prdp.models.embedded import build_embedded_stable_diffusion_pipeline as build

    path = write_ldm_checkpoint(build(0), tmp_path / "tiny.safetensors")
    state = load_file(str(path))
    state.update({name: torch.tensor([]) for name in markers})     # as v-prediction finetunes ship
    save_file(state, str(path))
    backend = load_backend(str(path), preset("cpu-smoke"), device="cpu", base_config=str(saved_model))
    assert backend.prediction_type == prediction
    alphas = backend.alphas_cumprod
    assert (alphas[-1].item() < 1e-6) if zero_snr else (alphas[-1].item() > 1e-3)
