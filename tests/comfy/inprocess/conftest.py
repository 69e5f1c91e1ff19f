"""The in-process tier: ComfyUI imported into this pytest process (tests/support/comfy_inprocess.py).

``sd15`` is the tiny random SD1.5 (MODEL, CLIP, VAE) loaded through ComfyUI's checkpoint loader,
built once per process and shared by the modules here (several seconds each, with the
full-size CLIP-L text encoder). A test must leave it as it found it, as the nodes promise to
leave the user's MODEL, CLIP and VAE.
"""
import pytest


@pytest.fixture(scope="session")
def sd15():
    from comfy_inprocess import import_comfy, load_tiny_sd15

    import_comfy()
    return load_tiny_sd15()
