"""Load Reward Model shows only the widgets that apply to the chosen reward (issue 22, section 4).

web/prdp_reward_widgets.js runs here under Node.js on stand-in node objects (the frontend's
`hidden` flag is what both renderers read); its table must be nodes/load_reward.py's
``widgets_in_use`` for every reward the node offers. Skipped without a `node` executable.
"""
from __future__ import annotations

import importlib
import json
import shutil
import subprocess

import pytest

from comfy_harness import REPO_ROOT
from comfy_inprocess import load_plugin_package

SCRIPT = REPO_ROOT / "web" / "prdp_reward_widgets.js"
NODE_JS = shutil.which("node")
pytestmark = pytest.mark.skipif(NODE_JS is None, reason="Node.js is not installed")

DRIVER = """
const m = await import(process.argv[1]);
const cases = JSON.parse(process.argv[2]);
const out = {table: m.WIDGETS_IN_USE, optional: m.OPTIONAL_WIDGETS, cases: []};
for (const c of cases) {
  const widgets = Object.entries(c.values).map(([name, value]) => ({name, value, options: {}}));
  const node = {widgets, inputs: (c.linked ?? []).map((name) => ({name, widget: {name}, link: 7})),
                size: [300, 200], computeSize: () => [300, 120], setSize(s) { this.size = s; }};
  m.watch(node);
  const hidden = () => widgets.filter((w) => w.hidden).map((w) => w.name).sort();
  const first = hidden();
  let after = null;
  if (c.change) {           // the user picks another value: the widget's callback runs
    const w = widgets.find((w) => w.name === c.change[0]);
    w.value = c.change[1];
    w.callback(w.value);
    after = hidden();
  }
  out.cases.push({hidden: first, after, optionsHidden: widgets.filter((w) => w.options.hidden).map((w) => w.name).sort(),
                  height: node.size[1]});
}
console.log(JSON.stringify(out));
"""


@pytest.fixture(scope="module")
def load_reward():
    package = load_plugin_package()
    return importlib.import_module(f"{package.__name__}.nodes.load_reward")


def _values(load_reward, **changes):
    spec = load_reward.PRDPLoadRewardModel.INPUT_TYPES()
    values = {}
    for section in ("required", "optional"):
        for name, (kind, *options) in spec[section].items():
            options = options[0] if options else {}
            values[name] = options.get("default", kind[0] if isinstance(kind, list) else None)
    return {**values, **changes}


def _run(cases):
    proc = subprocess.run([NODE_JS, "--input-type=module", "-e", DRIVER, SCRIPT.as_uri(), json.dumps(cases)],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)


def _optional(load_reward):
    return [name for name, _ in load_reward.OPTIONAL_WIDGETS]


def test_the_scripts_table_is_the_nodes(load_reward):
    out = _run([])
    rewards = load_reward.reward_choices()
    assert out["table"] == {reward: load_reward.widgets_in_use(reward) for reward in rewards}
    spec = load_reward.PRDPLoadRewardModel.INPUT_TYPES()
    widgets = [n for s in ("required", "optional") for n in spec[s] if n != "reward"]
    assert sorted(out["optional"]) == sorted(_optional(load_reward)) == sorted(widgets)


def test_each_reward_shows_what_it_uses(load_reward):
    rewards = load_reward.reward_choices()
    out = _run([{"values": _values(load_reward, reward=reward)} for reward in rewards])
    for reward, case in zip(rewards, out["cases"]):
        unused = sorted(set(_optional(load_reward)) - set(load_reward.widgets_in_use(reward)))
        assert case["hidden"] == unused == case["optionsHidden"], reward
    by_reward = dict(zip(rewards, out["cases"]))
    assert by_reward["jpeg-compressibility"]["hidden"] == sorted(_optional(load_reward))
    assert by_reward["pickscore"]["hidden"] == ["components"]
    assert by_reward["weighted"]["hidden"] == ["weights"]
    assert by_reward["jpeg-compressibility"]["height"] == 120     # the node shrinks to what it shows


def test_switching_reward_and_setting_a_server_update_what_is_shown(load_reward):
    optional = _optional(load_reward)
    out = _run([
        {"values": _values(load_reward, reward="jpeg-compressibility"), "change": ["reward", "weighted"]},
        {"values": _values(load_reward, reward="pickscore"), "change": ["server_url", "http://127.0.0.1:8190"]},
        {"values": _values(load_reward, reward="jpeg-compressibility", weights="picked.safetensors")},
        {"values": _values(load_reward, reward="jpeg-compressibility"), "linked": ["device"]},
        {"values": _values(load_reward, reward="a-reward-this-script-does-not-know")},
    ])
    switched, server, picked, linked, unknown = out["cases"]
    assert switched["hidden"] == sorted(optional) and switched["after"] == ["weights"]
    assert server["hidden"] == ["components"]
    assert server["after"] == sorted(set(optional) - {"server_url"})   # the server decides the rest
    assert "weights" not in picked["hidden"]    # refused for JPEG: it must stay in sight
    assert "device" not in linked["hidden"]
    assert unknown["hidden"] == []
