// comfyui-prdp: live training dashboard on PRDP Train LoRA and score text on Score Images.
// - Both are DOM widgets (node.addDOMWidget), so they show in the classic canvas and in the
//   Nodes 2.0 (Vue) renderer, which never calls onDrawForeground. They are not serialized:
//   saved workflows keep their widget values.
// - The dashboard follows the websocket events of nodes/train_progress.py (prdp.job,
//   prdp.status, prdp.epoch): phase and ETA, reward mean ± std per epoch as a curve, kl and
//   clip fraction, the latest samples with their rewards, and how the run ended (also a toast).
// - Stop (button, and the node's context menu) = POST /prdp/jobs/<id>/stop: the job stops
//   after the current step, saves its LoRA, and the node finishes normally (outputs kept).
// - Teach by choosing (the human reward): while prdp.status names an open `ballot`, the dashboard
//   shows it (GET /prdp/jobs/<id>/ballot: prompts and the URLs of their images) as a panel; the
//   person's answers go back in one POST to the ballot's answer_url (web/prdp_ballot.js keeps
//   the state; the node grows to show the images large enough to judge).
// - The last run stays shown: after a page reload or a workflow-tab switch the dashboard asks
//   /prdp/last_run for this node of this workflow (running or ended), and Score Images takes
//   its text from the server's history; a result that ComfyUI replays from its cache (same
//   inputs queued again) is shown again and marked as such.
import { app } from "../../scripts/app.js";
import { api } from "../../scripts/api.js";
import { BALLOT_MIN_WIDTH, SCORE_TEXT_MIN_HEIGHT, Dashboard, formatEta, injectStyle, scoreTextElement } from "./prdp_dashboard.js";

const TRAIN = "PRDPTrainLoRA";
const SCORE = "PRDPScoreImages";
const ACTIVE = new Set(["preparing", "pending", "running", "stopping"]);
const STOP_MENU_TEXT = "PRDP: stop training (keep the LoRA so far)";
const HISTORY_ITEMS = 64;
const CACHED_NOTE = "from ComfyUI's cache: same inputs, not run again";
let cachedNodes = new Set();     // nodes of the running prompt that ComfyUI replays from its cache

/** The id the frontend gives the open workflow (sent with each queued prompt), or null. */
function workflowId() {
  const id = app.graph?.id;
  return typeof id === "string" && id ? id : null;
}

/** The node `id` of the open workflow; null when an event names another workflow's node. */
function findNode(id, workflow) {
  if (id === undefined || id === null) return null;
  if (workflow && workflowId() && workflow !== workflowId()) return null;
  const plain = String(id).split(":").pop();
  return app.graph?.getNodeById(Number(plain)) || null;
}

async function getJson(url) {
  const response = await api.fetchApi(url);
  return response.ok ? await response.json() : null;
}

function toast(severity, summary, detail) {
  const service = app.extensionManager?.toast;
  if (service?.add) service.add({ severity, summary, detail, life: 8000 });
  else console.log(`[comfyui-prdp] ${summary}: ${detail}`);
}

function addDomWidget(node, name, element, minHeight) {
  const widget = node.addDOMWidget(name, name, element, {
    serialize: false, hideOnZoom: false, getMinHeight: typeof minHeight === "function" ? minHeight : () => minHeight,
  });
  widget.serialize = false;     // not part of widgets_values (saved workflows keep their order)
  return widget;
}

function dashboardOf(node) {
  if (!node.prdpDashboard && node.addDOMWidget) {
    node.prdpDashboard = new Dashboard(() => stopTraining(node), {
      send: (url, body) => sendAnswers(url, body),
      refresh: () => loadBallot(node),
      resolve: (url) => api.apiURL(url),
      onChange: (what) => { if (what === "shown") growNode(node); },
    });
    addDomWidget(node, "prdp_dashboard", node.prdpDashboard.root, () => node.prdpDashboard.minHeight());
  }
  return node.prdpDashboard;
}

/** Make room for the ballot: the node at least BALLOT_MIN_WIDTH wide and as tall as its widgets
 *  (the dashboard's minimum height grows while a ballot is shown). */
function growNode(node) {
  const [width, height] = node.size;
  const needed = node.computeSize?.([Math.max(width, BALLOT_MIN_WIDTH), height]);
  node.setSize?.([Math.max(width, BALLOT_MIN_WIDTH), Math.max(height, needed?.[1] ?? height)]);
  node.setDirtyCanvas?.(true, true);
  app.graph?.setDirtyCanvas?.(true, true);
}

/** POST the answers (one per prompt) to the ballot's answer_url: {ok, error}. */
async function sendAnswers(url, body) {
  const response = await api.fetchApi(url, {
    method: "POST", headers: { "Content-Type": "application/json" }, body: JSON.stringify(body),
  });
  if (response.ok) return { ok: true };
  const answer = await response.json().catch(() => ({}));
  return { ok: false, status: response.status, error: `${answer.error || response.statusText} (HTTP ${response.status})` };
}

/** Ask the route for the node's open ballot and show it (or take the panel away: none waits). */
async function loadBallot(node) {
  const dashboard = dashboardOf(node);
  const jobId = node.prdpJobId;
  if (!dashboard || !jobId || node.prdpBallotLoading) return;
  node.prdpBallotLoading = true;
  try {
    const ballot = await getJson(`/prdp/jobs/${jobId}/ballot`);
    if (node.prdpJobId !== jobId) return;
    if (ballot?.id !== dashboard.ballot.id || !ballot) dashboard.showBallot(ballot || null);
  } catch (error) {
    console.warn("[comfyui-prdp] could not fetch the ballot", error);
  } finally {
    node.prdpBallotLoading = false;
  }
}

async function stopTraining(node) {
  const jobId = node.prdpJobId;
  if (!jobId) return;
  const dashboard = dashboardOf(node);
  dashboard?.setStoppable(false);
  const response = await api.fetchApi(`/prdp/jobs/${jobId}/stop`, { method: "POST" });
  if (response.ok) {
    dashboard?.setStatus("stopping: finishing the model's current block, then saving the LoRA ...");
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
  const node = findNode(detail.node, detail.workflow);
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
  dashboard.showBallot(null);
  const failed = detail.status === "failed";
  const message = detail.message || detail.status;
  dashboard.setStatus(detail.status);
  dashboard.setMessage(message, failed);
  if (detail.status === "finished") dashboard.setProgress(1);
  toast(failed ? "error" : detail.status === "stopped" ? "warn" : "success", "PRDP Train LoRA", message);
}

function onStatus(detail) {
  const node = findNode(detail.node, detail.workflow);
  const dashboard = node && dashboardOf(node);
  if (!dashboard) return;
  node.prdpJobId = detail.job_id;
  if (detail.status) node.prdpJobStatus = detail.status;
  if (detail.ballot && detail.ballot !== dashboard.ballot.id) loadBallot(node);
  else if (!detail.ballot && dashboard.choosing && !dashboard.ballot.sending) dashboard.showBallot(null);
  if (node.prdpJobStatus !== "stopping") dashboard.setStatus(dashboard.statusLine(detail));
  dashboard.setProgress(detail.progress);
  dashboard.setStoppable(ACTIVE.has(node.prdpJobStatus) && node.prdpJobStatus !== "stopping");
}

function onEpoch(detail) {
  const node = findNode(detail.node, detail.workflow);
  const dashboard = node && dashboardOf(node);
  if (!dashboard) return;
  node.prdpJobId = detail.job_id;
  dashboard.addEpoch(detail);
  if (node.prdpJobStatus !== "stopping") {
    dashboard.setStatus([`epoch ${detail.epoch}/${detail.epochs} done`, formatEta(detail.eta_seconds)]
      .filter(Boolean).join(" · "));
  }
}

/** Show `job` (from /prdp/jobs/<id> or /prdp/last_run) on `node`: a run still going goes on
 *  updating from the websocket; an ended one is shown as the node's last run. */
function showJob(node, job, note = "") {
  const dashboard = dashboardOf(node);
  if (!dashboard || !job) return;
  node.prdpJobId = job.id;
  node.prdpJobStatus = job.status;
  dashboard.restore(job);
  if (ACTIVE.has(job.status)) {
    dashboard.setStatus(`${job.phase || job.status} · epoch ${job.epoch}/${job.info?.epochs}`);
    dashboard.setStoppable(job.status !== "stopping");
    if (job.info?.reward === "human") loadBallot(node);      // a ballot may wait for an answer
  } else {
    dashboard.setStatus([`last run: ${job.status}`, note].filter(Boolean).join(" · "));
    dashboard.setStoppable(false);
  }
}

/** After a page reload or a workflow-tab switch: each train node shows its newest run (still
 *  going or ended), each Score Images node its newest text from the server's history. */
async function restoreLastRuns() {
  const nodes = app.graph?.nodes || [];
  const workflow = workflowId();
  for (const node of nodes.filter((n) => n.type === TRAIN)) {
    try {
      const query = new URLSearchParams({ node: String(node.id), ...(workflow ? { workflow } : {}) });
      const job = await getJson(`/prdp/last_run?${query}`);
      if (job && !node.prdpJobId) showJob(node, job);
    } catch (error) {
      console.warn("[comfyui-prdp] could not fetch the node's last run", error);
    }
  }
  const scoreNodes = nodes.filter((n) => n.type === SCORE && n.prdpScoreText?.classList.contains("prdp-muted"));
  if (!scoreNodes.length || !workflow) return;
  try {
    const history = Object.values((await getJson(`/history?max_items=${HISTORY_ITEMS}`)) || {})
      .filter((entry) => entry?.prompt?.[3]?.extra_pnginfo?.workflow?.id === workflow)
      .sort((a, b) => b.prompt[0] - a.prompt[0]);         // newest first
    for (const node of scoreNodes) {
      const text = history.map((entry) => entry.outputs?.[String(node.id)]?.text).find((t) => t?.length);
      if (text) setScoreText(node, `${text.join("\n")}\n(last run)`);
    }
  } catch (error) {
    console.warn("[comfyui-prdp] could not read the history for Score Images", error);
  }
}

function setScoreText(node, text) {
  node.prdpScoreText.textContent = text;
  node.prdpScoreText.classList.remove("prdp-muted");
}

/** Train nodes whose outputs ComfyUI takes from its cache (it does not run them, and sends
 *  them no "executed" when nothing downstream runs): show the run whose outputs those are,
 *  the node's newest run that returned its outputs. */
async function showCachedRuns(nodeIds) {
  const workflow = workflowId();
  for (const id of nodeIds) {
    const node = findNode(id);
    if (node?.type !== TRAIN) continue;
    const query = new URLSearchParams({ node: String(node.id), delivered: "1", ...(workflow ? { workflow } : {}) });
    const job = await getJson(`/prdp/last_run?${query}`).catch(() => null);
    const dashboard = dashboardOf(node);
    if (job) showJob(node, job, CACHED_NOTE);
    else dashboard?.setStatus(`${CACHED_NOTE} (the server no longer knows that run)`);
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
      const cached = cachedNodes.has(String(this.id));
      if (nodeData.name === SCORE && this.prdpScoreText) {
        setScoreText(this, cached ? `${text}\n(${CACHED_NOTE})` : text);
      } else if (nodeData.name === TRAIN) {
        if (!cached) dashboardOf(this)?.setMessage(text);     // cached: see showCachedRuns
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
    api.addEventListener("execution_start", () => { cachedNodes = new Set(); });
    api.addEventListener("execution_cached", ({ detail }) => {
      cachedNodes = new Set((detail?.nodes || []).map((id) => String(id).split(":").pop()));
      showCachedRuns([...cachedNodes]);
    });
    api.addEventListener("prdp.checkpoint", () => {});     // known, so the frontend logs no "unhandled message"
  },

  async afterConfigureGraph() {
    await restoreLastRuns();
  },
});
