// comfyui-prdp: live training dashboard on PRDP Train LoRA and score text on Score Images.
// - Both are DOM widgets (node.addDOMWidget), so they show in the classic canvas and in the
//   Nodes 2.0 (Vue) renderer, which never calls onDrawForeground. They are not serialized:
//   saved workflows keep their widget values.
// - The dashboard follows the websocket events of nodes/train_progress.py (prdp.job,
//   prdp.status, prdp.epoch): phase and ETA, reward mean ± std per epoch as a curve, kl and
//   clip fraction, the latest samples with their rewards, and how the run ended (also a toast).
// - Stop (button, and the node's context menu) = POST /prdp/jobs/<id>/stop: the job stops
//   after the current step, saves its LoRA, and the node finishes normally (outputs kept).
import { app } from "../../scripts/app.js";
import { api } from "../../scripts/api.js";
import { DASHBOARD_MIN_HEIGHT, SCORE_TEXT_MIN_HEIGHT, Dashboard, formatEta, injectStyle, scoreTextElement } from "./prdp_dashboard.js";

const TRAIN = "PRDPTrainLoRA";
const SCORE = "PRDPScoreImages";
const ACTIVE = new Set(["preparing", "pending", "running", "stopping"]);
const STOP_MENU_TEXT = "PRDP: stop training (keep the LoRA so far)";

function findNode(id) {
  if (id === undefined || id === null) return null;
  const plain = String(id).split(":").pop();
  return app.graph?.getNodeById(Number(plain)) || null;
}

function toast(severity, summary, detail) {
  const service = app.extensionManager?.toast;
  if (service?.add) service.add({ severity, summary, detail, life: 8000 });
  else console.log(`[comfyui-prdp] ${summary}: ${detail}`);
}

function addDomWidget(node, name, element, minHeight) {
  const widget = node.addDOMWidget(name, name, element, {
    serialize: false, hideOnZoom: false, getMinHeight: () => minHeight,
  });
  widget.serialize = false;     // not part of widgets_values (saved workflows keep their order)
  return widget;
}

function dashboardOf(node) {
  if (!node.prdpDashboard && node.addDOMWidget) {
    node.prdpDashboard = new Dashboard(() => stopTraining(node));
    addDomWidget(node, "prdp_dashboard", node.prdpDashboard.root, DASHBOARD_MIN_HEIGHT);
  }
  return node.prdpDashboard;
}

async function stopTraining(node) {
  const jobId = node.prdpJobId;
  if (!jobId) return;
  const dashboard = dashboardOf(node);
  dashboard?.setStoppable(false);
  const response = await api.fetchApi(`/prdp/jobs/${jobId}/stop`, { method: "POST" });
  if (response.ok) {
    dashboard?.setStatus("stopping after the current step ...");
  } else {
    const body = await response.json().catch(() => ({}));
    dashboard?.setStatus(`stop refused: ${body.error || body.status || response.status}`);
  }
}

function stopMenuItem(node) {
  return {
    content: STOP_MENU_TEXT,
    disabled: !(node.prdpJobId && ACTIVE.has(node.prdpJobStatus)),
    callback: () => stopTraining(node),
  };
}

function onJob(detail) {
  const node = findNode(detail.node);
  const dashboard = node && dashboardOf(node);
  if (!dashboard) return;
  node.prdpJobId = detail.job_id;
  node.prdpJobStatus = detail.status;
  if (detail.status === "preparing") {
    dashboard.reset(detail.epochs);
    dashboard.setStatus(detail.phase || "preparing ...");
    dashboard.setStoppable(true);
    return;
  }
  if (ACTIVE.has(detail.status)) {
    dashboard.setStoppable(true);
    return;
  }
  dashboard.setStoppable(false);
  const failed = detail.status === "failed";
  const message = detail.message || detail.status;
  dashboard.setStatus(detail.status);
  dashboard.setMessage(message, failed);
  if (detail.status === "finished") dashboard.setProgress(1);
  toast(failed ? "error" : detail.status === "stopped" ? "warn" : "success",
        `PRDP ${detail.status}`, message);
}

function onStatus(detail) {
  const node = findNode(detail.node);
  const dashboard = node && dashboardOf(node);
  if (!dashboard) return;
  node.prdpJobId = detail.job_id;
  if (detail.status) node.prdpJobStatus = detail.status;
  if (node.prdpJobStatus !== "stopping") dashboard.setStatus(dashboard.statusLine(detail));
  dashboard.setProgress(detail.progress);
  dashboard.setStoppable(ACTIVE.has(node.prdpJobStatus) && node.prdpJobStatus !== "stopping");
}

function onEpoch(detail) {
  const node = findNode(detail.node);
  const dashboard = node && dashboardOf(node);
  if (!dashboard) return;
  node.prdpJobId = detail.job_id;
  dashboard.addEpoch(detail);
  if (node.prdpJobStatus !== "stopping") {
    dashboard.setStatus([`epoch ${detail.epoch}/${detail.epochs} done`, formatEta(detail.eta_seconds)]
      .filter(Boolean).join(" · "));
  }
}

/** After a page reload: show the runs still going (their metrics so far). */
async function restoreRunningJobs() {
  try {
    const response = await api.fetchApi("/prdp/jobs");
    if (!response.ok) return;
    for (const summary of (await response.json()).jobs || []) {
      const node = ACTIVE.has(summary.status) && findNode(summary.info?.node);
      if (!node || node.type !== TRAIN) continue;
      const full = await (await api.fetchApi(`/prdp/jobs/${summary.id}`)).json();
      const dashboard = dashboardOf(node);
      node.prdpJobId = summary.id;
      node.prdpJobStatus = summary.status;
      dashboard.restore(full);
      dashboard.setStatus(`${summary.phase || summary.status} · epoch ${summary.epoch}/${summary.info?.epochs}`);
      dashboard.setProgress(summary.progress);
      dashboard.setStoppable(summary.status !== "stopping");
    }
  } catch (error) {
    console.warn("[comfyui-prdp] could not list running jobs", error);
  }
}

// The extension-level node menu hook (getNodeMenuItems) exists in newer frontends; older ones
// only call the node's getExtraMenuOptions. Use one, never both (no duplicate entry).
const hasNodeMenuHook = () => typeof app.collectNodeMenuItems === "function";

app.registerExtension({
  name: "comfyui-prdp.live",

  async beforeRegisterNodeDef(nodeType, nodeData) {
    if (nodeData.name !== TRAIN && nodeData.name !== SCORE) return;

    const onNodeCreated = nodeType.prototype.onNodeCreated;
    nodeType.prototype.onNodeCreated = function () {
      const result = onNodeCreated?.apply(this, arguments);
      injectStyle();
      if (nodeData.name === TRAIN) dashboardOf(this);
      else {
        this.prdpScoreText = scoreTextElement();
        addDomWidget(this, "prdp_scores", this.prdpScoreText, SCORE_TEXT_MIN_HEIGHT);
      }
      return result;
    };

    const onExecuted = nodeType.prototype.onExecuted;
    nodeType.prototype.onExecuted = function (message) {
      onExecuted?.apply(this, arguments);
      const text = message?.text?.join("\n");
      if (!text) return;
      if (nodeData.name === SCORE && this.prdpScoreText) {
        this.prdpScoreText.textContent = text;
        this.prdpScoreText.classList.remove("prdp-muted");
      } else if (nodeData.name === TRAIN) {
        dashboardOf(this)?.setMessage(text);
      }
    };

    if (nodeData.name === TRAIN) {
      const getExtraMenuOptions = nodeType.prototype.getExtraMenuOptions;
      nodeType.prototype.getExtraMenuOptions = function (_, options) {
        const result = getExtraMenuOptions?.apply(this, arguments);
        if (!hasNodeMenuHook()) options.push(stopMenuItem(this));
        return result;
      };
    }
  },

  getNodeMenuItems(node) {
    return node?.type === TRAIN || node?.constructor?.comfyClass === TRAIN ? [stopMenuItem(node)] : [];
  },

  setup() {
    injectStyle();
    api.addEventListener("prdp.job", ({ detail }) => onJob(detail));
    api.addEventListener("prdp.status", ({ detail }) => onStatus(detail));
    api.addEventListener("prdp.epoch", ({ detail }) => onEpoch(detail));
  },

  async afterConfigureGraph() {
    await restoreRunningJobs();
  },
});
