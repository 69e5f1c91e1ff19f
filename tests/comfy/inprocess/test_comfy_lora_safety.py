"""The LoRA attachment stays correct when ComfyUI reuses the memory a weight wrapper is given
(issue 9.3): dynamic VRAM and low-VRAM offload cast weights into shared buffers
(`get_cast_buffer`, aimdo's vbar) and hand the wrappers views of them.

On the CPU ComfyUI always casts into a private copy, so the reuse is simulated: the wrappers
get views of one flat "cast buffer" that is overwritten after the forward pass, as ComfyUI
overwrites it with the next layer's weights. The real thing runs in benchmarks/gpu_memory_modes.sh.
"""
import inspect

import pytest
import torch

from comfy_inprocess import import_comfy, in_thread

import_comfy()

import comfy.sd  # noqa: E402
import comfy.weight_adapter  # noqa: E402

from comfyui_prdp.backends.comfyui.adapters import AdapterSwitch, SwitchableAdapter, identity_weight  # noqa: E402
from comfyui_prdp.backends.comfyui.backend import ComfyBackend  # noqa: E402


def storage(tensor: torch.Tensor) -> int:
    return tensor.untyped_storage().data_ptr()


def test_no_registered_wrapper_returns_storage_of_its_input(sd15):
    """Every weight and bias wrapper the backend registers, adapters on and off."""
    model, clip, vae = sd15
    with torch.inference_mode():
        backend = ComfyBackend(model, clip, vae, rank=2)
    try:
        modules = dict(backend.patcher.model.named_modules())
        checked = 0
        with torch.inference_mode(False):
            for key, wrappers in backend.patcher.weight_wrapper_patches.items():
                module_name, attr = key.rsplit(".", 1)
                source = getattr(modules[module_name], attr)
                for enabled in (True, False):
                    backend.switch.enabled = enabled
                    for wrapper in wrappers:
                        buffer = source.detach().clone()        # a cast buffer holding the weight
                        out = wrapper(buffer)
                        assert storage(out) != storage(buffer), f"{key} (adapters {'on' if enabled else 'off'})"
                        assert out.shape == buffer.shape
                        checked += 1
        backend.switch.enabled = True
        assert checked > 2 * len(backend.adapters)
    finally:
        backend.release()


def two_layer_net(buffer: torch.Tensor, wrap1, wrap2, x: torch.Tensor):
    """x -> linear(W1 through wrap1) -> tanh -> linear(W2 through wrap2): W1 and W2 are views
    of `buffer`, as ComfyUI's cast gives them to the wrappers."""
    n = x.shape[1]
    w1 = buffer[: n * n].view(n, n)
    w2 = buffer[n * n: 2 * n * n].view(n, n)
    h = torch.tanh(torch.nn.functional.linear(x, wrap1(w1)))
    return torch.nn.functional.linear(h, wrap2(w2)).square().sum()


def overwrite_in_place(buffer):      # ComfyUI's cast_to(..., r=buffer) copies the next weight in
    with torch.no_grad():
        buffer.copy_(torch.randn_like(buffer) * 3)


def overwrite_storage(buffer):       # a buffer handed on without autograd seeing it (allocator, aimdo)
    buffer.data.copy_(torch.randn_like(buffer) * 3)


@pytest.mark.parametrize("adapters_on", [True, False], ids=["adapters-on", "adapters-off"])
@pytest.mark.parametrize("overwrite", [overwrite_in_place, overwrite_storage], ids=["copy_", "storage"])
def test_gradients_are_exact_when_the_cast_buffer_is_reused_after_forward(overwrite, adapters_on):
    n = 6
    generator = torch.Generator().manual_seed(0)
    weights = torch.randn(2 * n * n, generator=generator)
    x0 = torch.randn(3, n, generator=generator)
    switch = AdapterSwitch()
    switch.enabled = adapters_on
    lora = comfy.weight_adapter.LoRAAdapter.create_train(weights[: n * n].view(n, n), 2, 2.0)
    with torch.no_grad():
        lora.lora_down.weight.copy_(torch.randn(lora.lora_down.weight.shape, generator=generator))
    adapter = SwitchableAdapter(lora, switch).requires_grad_(True)
    lora.alpha.requires_grad_(False)
    params = [lora.lora_up.weight, lora.lora_down.weight]

    def gradients(reuse: bool):
        for p in params:
            p.grad = None
        x = x0.clone().requires_grad_(True)
        buffer = weights.clone()
        loss = two_layer_net(buffer, adapter, identity_weight, x)
        if reuse:
            overwrite(buffer)
        loss.backward()
        grads = [x.grad] + ([p.grad for p in params] if adapters_on else [])
        assert all(g is not None for g in grads)
        return [g.clone() for g in grads]

    reference = gradients(reuse=False)
    reused = gradients(reuse=True)
    for expected, got in zip(reference, reused):
        assert torch.equal(expected, got)


def test_control_a_wrapper_returning_a_view_gets_other_gradients():
    """Control: the reuse test above can fail. With a wrapper that hands on a view of its input
    (what `weight.detach()` did) the overwritten buffer changes the gradients."""
    n = 6
    generator = torch.Generator().manual_seed(0)
    weights = torch.randn(2 * n * n, generator=generator)
    x = torch.randn(3, n, generator=generator, requires_grad=True)

    def view_wrapper(w):
        return w.detach()

    grads = []
    for reuse in (False, True):
        x.grad = None
        buffer = weights.clone()
        loss = two_layer_net(buffer, identity_weight, view_wrapper, x)
        if reuse:
            overwrite_storage(buffer)
        loss.backward()
        grads.append(x.grad.clone())
    assert not torch.allclose(grads[0], grads[1])


def test_the_training_clone_owns_its_weights_where_comfyui_supports_a_deep_copy(sd15, tmp_path):
    """A model from a checkpoint file (as CheckpointLoaderSimple loads it): where `clone` takes
    force_deepcopy (ComfyUI >= 2026-06) the backend trains on its own copy, reloaded outside
    inference mode, sharing no storage with the user's model; elsewhere on a shared clone."""
    from safetensors.torch import save_file

    from comfy_inprocess import tiny_sd15_state_dict

    path = tmp_path / "tiny.safetensors"
    save_file({k: v.contiguous() for k, v in tiny_sd15_state_dict().items()}, str(path))
    with torch.inference_mode():
        model, clip, vae, _ = comfy.sd.load_checkpoint_guess_config(str(path), output_vae=True, output_clip=True)
        backend = ComfyBackend(model, clip, vae, rank=2)
    try:
        ours = dict(backend.patcher.model.diffusion_model.named_parameters())
        theirs = dict(model.model.diffusion_model.named_parameters())
        deep = "force_deepcopy" in inspect.signature(model.clone).parameters
        if deep:
            assert backend.patcher.model is not model.model
            assert ours.keys() == theirs.keys()
            assert all(storage(ours[k]) != storage(theirs[k]) for k in ours)
            assert all(torch.equal(ours[k], theirs[k]) for k in ours)
            assert not any(p.is_inference() for p in ours.values())
        else:
            assert backend.patcher.model is model.model
        assert model.weight_wrapper_patches == {}
        if deep:   # the user's modules never carry the backend's wrappers
            assert all(not getattr(m, "weight_function", None) for m in model.model.diffusion_model.modules())
    finally:
        backend.release()


def test_without_host_ram_for_a_deep_copy_the_clone_shares_the_weights_and_still_trains(sd15, tmp_path,
                                                                                        monkeypatch):
    """A second copy of a large model (Flux bf16: 24 GB) may not fit in host RAM: then the
    backend trains on a clone sharing the user's weights, and leaves them as they were."""
    from safetensors.torch import save_file

    import comfy.model_management
    from comfy_inprocess import tiny_sd15_state_dict

    path = tmp_path / "tiny.safetensors"
    save_file({k: v.contiguous() for k, v in tiny_sd15_state_dict().items()}, str(path))
    with torch.inference_mode():
        model, clip, vae, _ = comfy.sd.load_checkpoint_guess_config(str(path), output_vae=True, output_clip=True)
    before = {k: v.clone() for k, v in model.model.diffusion_model.state_dict().items()}
    real_free_memory = comfy.model_management.get_free_memory

    def free_memory(dev=None, torch_free_too=False):     # host RAM: room for one more copy only
        if dev is not None and torch.device(dev).type == "cpu" and not torch_free_too:
            return model.model_size()
        return real_free_memory(dev, torch_free_too)

    monkeypatch.setattr(comfy.model_management, "get_free_memory", free_memory)
    with torch.inference_mode():
        backend = ComfyBackend(model, clip, vae, rank=2)
    monkeypatch.setattr(comfy.model_management, "get_free_memory", real_free_memory)
    try:
        assert backend.patcher.model is model.model
        def step():
            cond = backend.encode_prompts(["a cat", "a dog"])
            x = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(3))
            backend.predict_eps(x, torch.tensor([800, 200]), cond).pow(2).mean().backward()
            return [p.grad for p in backend.trainable_parameters()]

        gradients = in_thread(step)
        assert all(g is not None and torch.isfinite(g).all() for g in gradients)
        assert any(g.abs().sum() > 0 for g in gradients)
        assert not [n for n, p in model.model.diffusion_model.named_parameters() if p.grad is not None]
    finally:
        backend.release()
    after = model.model.diffusion_model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert all(not getattr(m, "weight_function", None) for m in model.model.diffusion_model.modules())
