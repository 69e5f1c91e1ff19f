"""Model families (no ComfyUI needed): the native training size the node falls back to, the
kohya `ss_*` metadata naming the base family, and the SDXL consumer preset."""
import pytest

from comfyui_prdp.models import families as mf
from comfyui_prdp.config import TrainConfig, preset
from comfyui_prdp.lora.files import lora_metadata


@pytest.mark.parametrize("config_name, v_pred, size, version", [
    ("SD15", False, 512, "sd_v1"), ("SD20", False, 512, "sd_v2"), ("SD20", True, 768, "sd_v2_768_v"),
    ("SDXL", False, 1024, "sdxl_base_v1-0"), ("SDXL", True, 1024, "sdxl_base_v1-0"),
    ("SSD1B", False, 1024, "sdxl_base_v1-0"), ("Flux", False, 512, None)])
def test_comfyui_configs_map_to_their_family(config_name, v_pred, size, version):
    family = mf.comfy_family(config_name, v_pred)
    assert (family.native_size, family.kohya_version, family.v_prediction) == (size, version, v_pred)
    assert family.is_sdxl == (version == "sdxl_base_v1-0")


def test_a_zero_side_means_native_and_any_other_size_is_kept():
    native = mf.NATIVE_SIZE
    assert native == 0
    assert mf.training_size(native, native, mf.SDXL) == (1024, 1024)
    assert mf.training_size(native, native, mf.SD2_V) == (768, 768)
    assert mf.training_size(native, native, mf.SD1) == (512, 512)
    assert mf.training_size(native, 768, mf.SDXL) == (1024, 768)       # each side on its own
    assert mf.training_size(512, 512, mf.SDXL) == (512, 512)           # 512 is a choice on SDXL too
    assert mf.training_size(768, 512, mf.SDXL) == (768, 512)
    assert mf.training_size(832, 1216, mf.SDXL) == (832, 1216)


class FakeBackend:
    model_name = "SDXL"

    def __init__(self, family):
        self.family = family

    def lora_info(self):
        return {"targets": ["to_q"], "family": self.family} if self.family else {"targets": ["to_q"]}


@pytest.mark.parametrize("family, expected", [
    (mf.SDXL, {"ss_base_model_version": "sdxl_base_v1-0", "ss_v2": "False", "ss_v_parameterization": "False"}),
    (mf.SDXL_V, {"ss_base_model_version": "sdxl_base_v1-0", "ss_v2": "False", "ss_v_parameterization": "True"}),
    (mf.SD2_V, {"ss_base_model_version": "sd_v2_768_v", "ss_v2": "True", "ss_v_parameterization": "True"}),
    (mf.SD1, {"ss_base_model_version": "sd_v1", "ss_v2": "False", "ss_v_parameterization": "False"})])
def test_lora_metadata_names_the_base_family_in_kohya_keys(family, expected):
    config = TrainConfig(lora_rank=4, lora_alpha=2.0, width=1024, height=768)
    metadata = lora_metadata(config, FakeBackend(family), "aesthetic", epochs=1, prompt_count=3)
    assert {k: metadata[k] for k in expected} == expected
    assert metadata["base_family"] == family.name
    assert (metadata["ss_network_module"], metadata["ss_network_dim"], metadata["ss_network_alpha"],
            metadata["ss_resolution"]) == ("networks.lora", "4", "2.0", "(1024, 768)")
    assert all(isinstance(v, str) for v in metadata.values())


def test_an_unknown_family_writes_no_base_model_version_guess():
    metadata = lora_metadata(TrainConfig(), FakeBackend(mf.comfy_family("Flux", False)), "r", 1, 1)
    assert "ss_base_model_version" not in metadata and metadata["base_family"] == "Flux"


def test_consumer_sdxl_preset_trains_at_1024_and_states_its_cost():
    config = preset("consumer-gpu-sdxl")
    assert (config.width, config.height) == (1024, 1024)
    assert config.gradient_checkpointing and config.mixed_precision == "fp16" and config.train_batch_size == 1
    evaluations = config.model_evaluations_per_epoch()
    # 2 prompts x 4 images x 20 steps x 2 CFG branches per phase, as the preset's comment says;
    # pass 1 (no grad) for the second of its two one-prompt minibatches: 1 x 4 x 20 x 2
    assert evaluations == {"sampling": 320, "reference": 320, "update_forward_no_grad": 160,
                           "update_forward_backward": 320}
