"""benchmarks/gpu_check.sh and gpu_bench.py, tried on this CPU (issue 20.5).

- `gpu_check.sh --cpu` prints one table whose rows are the GPU check's at toy sizes (the neural
  reward built under inference mode, SD1.5 / SDXL epochs in fp16 and bf16, DDPO, the update
  memory at two T, fp32 on-policy), all passing, and writes the same rows as JSON;
- the neural-reward row catches the "Inference tensors" crash: with the reward's move as it was
  before issue 20 (plain Module.to), the row fails with that error (on the CPU the row follows
  each move with a float64 round trip, the copy a move to a GPU makes);
- on a bare machine the script sets up its own environment: a venv with the system's site
  packages (a system CUDA torch is reused) and scripts/setup_env.sh with the installed torch
  pinned; a set-up that fails prints its own error, exit 3, never "no CUDA GPU". The bare
  machine's python3 and the venv's python are stubs that log their calls (no network, no pip).
  A venv that already has what the check needs is used as it is (an offline GPU machine);
- without a usable GPU the script says why (torch's own reason), exit 2.
"""
from __future__ import annotations

import importlib.util
import json
import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from comfyui_prdp.rewards.model_reward import ModelReward

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "benchmarks" / "gpu_check.sh"
TOY = " (CPU runs fp32)"
EXPECTED_ROWS = [
    "SD1.5 (toy) neural reward (aesthetic built under inference_mode) fp16" + TOY,
    "SD1.5 (toy) epoch prdp fp16" + TOY,
    "SD1.5 (toy) epoch ddpo fp16" + TOY,
    "SDXL (toy) epoch prdp fp16" + TOY,
    "SDXL (toy) update memory T=2 fp16" + TOY,
    "SDXL (toy) update memory T=5 fp16" + TOY,
    "SD1.5 (toy) epoch prdp bf16" + TOY,
    "SDXL (toy) epoch prdp bf16" + TOY,
    "SD1.5 (toy) onpolicy (TF32 off) fp32",
]


def load_bench():
    spec = importlib.util.spec_from_file_location("gpu_bench", REPO / "benchmarks" / "gpu_bench.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module            # its dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def run_script(*args: str, env: dict, timeout: float = 600) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(SCRIPT), *args], env=env, capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def cpu_run(tmp_path_factory):
    rows_file = tmp_path_factory.mktemp("gpu-check") / "rows.json"
    result = run_script("--cpu", "--json", str(rows_file), env={**os.environ, "PYTHON": sys.executable})
    rows = json.loads(rows_file.read_text()) if rows_file.exists() else None
    return result, rows


def test_the_cpu_run_prints_one_table_of_the_checks_rows_all_passing(cpu_run):
    result, rows = cpu_run
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    assert [row["run"] for row in rows] == EXPECTED_ROWS
    assert [row["check"] for row in rows] == ["ok"] * len(rows)
    table = [line for line in result.stdout.splitlines() if line.startswith("| ")]
    assert len(table) == 1 + len(rows) and "check" in table[0]
    assert f"{len(rows)} rows, 0 failed" in result.stdout
    by_name = {row["run"]: row for row in rows}
    for name in EXPECTED_ROWS:
        if " epoch prdp " in name:         # time by phase against the FLOP floor
            assert "x of" in by_name[name]["floor"] and "update" in by_name[name]["seconds"], by_name[name]
    assert "PRDP/DDPO epoch time" in by_name[EXPECTED_ROWS[2]]["note"]
    assert "scored on cpu" in by_name[EXPECTED_ROWS[0]]["note"]


def plain_move(self, device):
    """ModelReward._move as it was before issue 20: Module.to, whatever mode built the module."""
    for module in self.modules():
        current = next(module.parameters(), None)
        if current is not None and current.device != device:
            module.to(device)


def test_the_neural_reward_row_fails_on_the_inference_tensor_crash(monkeypatch, tmp_path):
    bench = load_bench()
    monkeypatch.setattr(ModelReward, "_move", plain_move)
    check = bench.Check(torch.device("cpu"), toy=True, deadline=600, scratch=tmp_path)
    check.group(check.sd15, "fp16", [("neural", lambda b: check.neural_reward_row(b, check.short(check.sd15, "fp16")))])
    [row] = check.table.rows
    assert row.check.startswith("FAIL") and "Inference tensors" in row.check, row.check
    assert check.table.failed == 1


BASE_PYTHON_STUB = """#!/usr/bin/env bash
# a bare GPU machine's python3: it can only make a venv (whose python is the venv stub)
echo "base $*" >> "$STUB_LOG"
if [ "$1" = "-m" ] && [ "$2" = "venv" ]; then
    dir="${@: -1}"
    mkdir -p "$dir/bin" && cp "$STUB_VENV_PYTHON" "$dir/bin/python" && chmod +x "$dir/bin/python"
    exit 0
fi
exit 1
"""
VENV_PYTHON_STUB = """#!/usr/bin/env bash
# the venv's python: torch importable only when STUB_TORCH names a version; pip cannot reach an index
echo "venv $*" >> "$STUB_LOG"
if [ "$1" = "-m" ] && [ "$2" = "pip" ]; then
    [ -n "${PIP_CONSTRAINT:-}" ] && echo "constraint $(cat "$PIP_CONSTRAINT")" >> "$STUB_LOG"
    [ "$3" = "show" ] && exit 1
    echo "ERROR: stub pip cannot reach the package index" >&2
    exit 1
fi
if [ "$1" = "-c" ] && [ -n "$STUB_TORCH" ]; then
    case "$2" in
        *importlib.metadata*) echo "torch==$STUB_TORCH"; exit 0 ;;
        "import torch") exit 0 ;;
    esac
fi
echo "ModuleNotFoundError: No module named 'torch'" >&2
exit 1
"""


def bare_machine(tmp_path: Path, system_torch: str) -> dict:
    """The environment of gpu_check.sh on a machine with no project venv (stubs log to STUB_LOG)."""
    for name, text in (("python3", BASE_PYTHON_STUB), ("venv-python", VENV_PYTHON_STUB)):
        (tmp_path / name).write_text(text)
        (tmp_path / name).chmod((tmp_path / name).stat().st_mode | stat.S_IEXEC)
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHON", "PIP_CONSTRAINT")}
    return {**env, "PRDP_VENV": str(tmp_path / "venv"), "BASE_PYTHON": str(tmp_path / "python3"),
            "STUB_VENV_PYTHON": str(tmp_path / "venv-python"), "STUB_LOG": str(tmp_path / "calls.log"),
            "STUB_TORCH": system_torch}


def test_a_bare_machine_without_torch_shows_the_set_up_error(tmp_path):
    result = run_script(env=bare_machine(tmp_path, system_torch=""), timeout=120)
    output = result.stdout + result.stderr
    calls = (tmp_path / "calls.log").read_text()
    assert result.returncode == 3, output
    assert f"base -m venv --system-site-packages {tmp_path / 'venv'}" in calls
    assert "ERROR: stub pip cannot reach the package index" in result.stderr
    assert "setup_env.sh" in result.stderr and "no CUDA GPU" not in output


def test_a_system_torch_is_pinned_while_the_project_installs(tmp_path):
    result = run_script(env=bare_machine(tmp_path, system_torch="2.9.0+cu128"), timeout=120)
    calls = (tmp_path / "calls.log").read_text()
    installs = [line for line in calls.splitlines() if line.startswith("venv -m pip install")]
    assert result.returncode == 3, result.stdout + result.stderr
    assert installs and all(line.endswith(" -e .") for line in installs), calls   # never torch itself
    assert "constraint torch==2.9.0+cu128" in calls
    assert "ERROR: stub pip cannot reach the package index" in result.stderr


def ready_venv(tmp_path: Path) -> Path:
    """A venv folder whose python is this test's interpreter (which has everything)."""
    python = tmp_path / "venv" / "bin" / "python"
    python.parent.mkdir(parents=True)
    python.write_text(f'#!/bin/sh\nexec "{sys.executable}" "$@"\n')
    python.chmod(python.stat().st_mode | stat.S_IEXEC)
    return python.parents[1]


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message of a machine without a usable GPU")
def test_a_ready_environment_is_used_as_it_is(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "PYTHON"}
    result = run_script(env={**env, "PRDP_VENV": str(ready_venv(tmp_path)), "BASE_PYTHON": "/nonexistent/python3"},
                        timeout=120)
    assert result.returncode == 2, result.stdout + result.stderr      # no GPU here: checked after the set-up
    assert "has what the check needs (no set-up)" in result.stdout
    assert "setup_env" not in result.stdout + result.stderr


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message of a machine without a usable GPU")
def test_without_a_usable_gpu_the_script_says_why(tmp_path):
    result = run_script(env={**os.environ, "PYTHON": sys.executable}, timeout=120)
    assert result.returncode == 2, result.stdout + result.stderr
    assert f"torch {torch.__version__}" in result.stderr
    assert ("cannot use a GPU here: " in result.stderr) or ("build without CUDA" in result.stderr), result.stderr
    assert "pass --cpu" in result.stderr
