"""/prdp/jobs never shows the server's absolute folders (issue 8, item 3)."""
import json
import sys
import types

from comfyui_prdp.service.jobs import JobRegistry
from comfyui_prdp.service.routes import get_job, list_jobs


def test_job_listing_names_folders_relative_to_comfyui(tmp_path, monkeypatch):
    base = tmp_path / "srv" / "ComfyUI"
    output = base / "output"
    fake = types.SimpleNamespace(get_output_directory=lambda: str(output), get_input_directory=lambda: str(base / "input"),
                                 get_temp_directory=lambda: str(base / "temp"), models_dir=str(base / "models"),
                                 base_path=str(base))
    monkeypatch.setitem(sys.modules, "folder_paths", fake)
    registry = JobRegistry()
    checkpoint = output / "prdp_runs" / "run1" / "checkpoints" / "epoch_00001"

    def target(job):
        job.record({"type": "checkpoint", "epoch": 1, "path": str(checkpoint)})
        job.outputs["checkpoint"] = str(checkpoint)
        raise RuntimeError(f"could not read {base / 'models' / 'loras' / 'x.safetensors'}")

    job = registry.start(target, name="run1")
    job.wait(10)
    for status, body in (list_jobs(registry), get_job(job.id, registry)):
        text = json.dumps(body)
        assert status == 200
        assert str(tmp_path) not in text, text
        assert "output/prdp_runs/run1/checkpoints/epoch_00001" in text
        assert "models/loras/x.safetensors" in text


def test_without_comfyui_paths_are_left_alone(monkeypatch):
    monkeypatch.delitem(sys.modules, "folder_paths", raising=False)
    registry = JobRegistry()
    job = registry.start(lambda job: job.outputs.update({"lora": "/tmp/a/b.safetensors"}), name="x")
    job.wait(10)
    assert list_jobs(registry)[1]["jobs"][0]["outputs"]["lora"] == "/tmp/a/b.safetensors"
