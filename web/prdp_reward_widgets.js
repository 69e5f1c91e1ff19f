// comfyui-prdp: Load Reward Model (PRDP) shows only the widgets that apply to the chosen reward.
//
// `weights`, `device`, `dtype`, `allow_download`, `components` and `server_url` are hidden when
// the chosen reward does not use them (WIDGETS_IN_USE, the table of nodes/load_reward.py's
// widgets_in_use; tests/test_reward_widgets.py keeps the two in step). A set server_url means
// the reward server decides everything else, so then only `reward` and `server_url` stay.
// Never hidden: a widget fed by a link, and a picked weights file (the node refuses one for
// rewards without weights: the widget to change must stay in sight). Unknown rewards show
// everything. Hiding sets the widget's `hidden` flag (and options.hidden), which the classic
// canvas and Nodes 2.0 both honour; hidden widgets still send their values.

export const NODE = "PRDPLoadRewardModel";
export const OPTIONAL_WIDGETS = ["weights", "device", "dtype", "allow_download", "components", "server_url"];
export const WIDGETS_IN_USE = {
  "pickscore": ["weights", "device", "dtype", "allow_download", "server_url"],
  "aesthetic": ["weights", "device", "dtype", "allow_download", "server_url"],
  "clipscore": ["weights", "device", "dtype", "allow_download", "server_url"],
  "hpsv2": ["weights", "device", "dtype", "allow_download", "server_url"],
  "hpsv2.1": ["weights", "device", "dtype", "allow_download", "server_url"],
  "imagereward": ["weights", "device", "dtype", "allow_download", "server_url"],
  "jpeg-compressibility": [],
  "jpeg-incompressibility": [],
  "weighted": ["device", "dtype", "allow_download", "components", "server_url"],
  "world-alignment": ["device"],
  "world-preference": [],
};
export const AUTO_WEIGHTS = "(auto)";

/** The optional widgets to show for `reward` and `serverUrl`. */
export function widgetsToShow(reward, serverUrl) {
  if (typeof serverUrl === "string" && serverUrl.trim()) return new Set(["server_url"]);
  const used = WIDGETS_IN_USE[reward];
  return new Set(used ?? OPTIONAL_WIDGETS);
}

function isLinked(node, widget) {
  return (node.inputs ?? []).some((input) => input?.widget?.name === widget.name && input.link != null);
}

function setHidden(widget, hidden) {
  widget.hidden = hidden;
  widget.options = widget.options ?? {};
  widget.options.hidden = hidden;
  // frontend 1.2x's classic canvas skips drawing a hidden widget but still lays out its row:
  // a hidden widget asks for no height (the newer frontends skip hidden widgets in layout anyway)
  if (hidden && !widget.prdpComputeSize) {
    widget.prdpComputeSize = { original: widget.computeSize };
    widget.computeSize = () => [0, -4];
  } else if (!hidden && widget.prdpComputeSize) {
    const { original } = widget.prdpComputeSize;
    if (original) widget.computeSize = original; else delete widget.computeSize;
    delete widget.prdpComputeSize;
  }
}

/** Hide what does not apply on `node`; returns the names hidden. */
export function applyRewardWidgets(node) {
  const widgets = node.widgets ?? [];
  const value = (name) => widgets.find((w) => w.name === name)?.value;
  const show = widgetsToShow(value("reward"), value("server_url"));
  const hidden = [];
  for (const widget of widgets) {
    if (!OPTIONAL_WIDGETS.includes(widget.name)) continue;
    const pickedFile = widget.name === "weights" && widget.value !== AUTO_WEIGHTS;
    const keep = show.has(widget.name) || isLinked(node, widget) || pickedFile;
    setHidden(widget, !keep);
    if (!keep) hidden.push(widget.name);
  }
  return hidden;
}

function refresh(node) {
  applyRewardWidgets(node);
  const wanted = node.computeSize?.();
  if (wanted && node.size) node.setSize?.([node.size[0], wanted[1]]);
  node.setDirtyCanvas?.(true, true);
  node.graph?.setDirtyCanvas?.(true, true);
}

export function watch(node) {
  for (const name of ["reward", "server_url", ...OPTIONAL_WIDGETS]) {
    const widget = node.widgets?.find((w) => w.name === name);
    if (!widget || widget.prdpWatched) continue;
    const callback = widget.callback;
    widget.callback = function () {
      const result = callback?.apply(this, arguments);
      refresh(node);
      return result;
    };
    widget.prdpWatched = true;
  }
  refresh(node);
}

if (globalThis.window !== undefined && globalThis.document !== undefined) {
  const { app } = await import("../../scripts/app.js");
  app.registerExtension({
    name: "comfyui-prdp.rewardWidgets",
    async beforeRegisterNodeDef(nodeType, nodeData) {
      if (nodeData.name !== NODE) return;
      const onNodeCreated = nodeType.prototype.onNodeCreated;
      nodeType.prototype.onNodeCreated = function () {
        const result = onNodeCreated?.apply(this, arguments);
        watch(this);
        return result;
      };
      const onConfigure = nodeType.prototype.onConfigure;
      nodeType.prototype.onConfigure = function () {   // a loaded workflow's values
        const result = onConfigure?.apply(this, arguments);
        watch(this);
        return result;
      };
      const onConnectionsChange = nodeType.prototype.onConnectionsChange;
      nodeType.prototype.onConnectionsChange = function () {
        const result = onConnectionsChange?.apply(this, arguments);
        refresh(this);
        return result;
      };
    },
  });
}
