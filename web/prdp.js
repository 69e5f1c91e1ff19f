// comfyui-prdp: live training status on the PRDP nodes.
// - PRDP Train LoRA shows the latest epoch's metrics while training runs (websocket
//   "prdp.epoch"), and its summary when done; its context menu can stop the job gracefully
//   (POST /prdp/jobs/<id>/stop: the node then finishes normally with the LoRA trained so far).
// - Score Images (PRDP) shows its scores on the node.
// Text is drawn on the node, never added as a widget, so saved workflows keep their layout.
import { app } from "../../scripts/app.js";
import { api } from "../../scripts/api.js";

const LINE_HEIGHT = 15;
const TEXT_NODES = new Set(["PRDPTrainLoRA", "PRDPScoreImages"]);

function setText(node, text) {
  node.prdpLines = String(text || "").split("\n").filter((line) => line.length > 0);
  const needed = (node.computeSize ? node.computeSize()[1] : node.size[1]) + node.prdpLines.length * LINE_HEIGHT + 8;
  if (node.size[1] < needed) node.setSize([node.size[0], needed]);
  node.setDirtyCanvas(true, true);
}

function formatMetrics(detail) {
  const m = detail.metrics || {};
  const number = (v) => (typeof v === "number" ? v.toPrecision(4) : "-");
  return [
    `epoch ${detail.epoch}/${detail.epochs}  reward ${number(m.reward_mean)} ± ${number(m.reward_std)}`,
    `kl ${number(m.kl)}  clip ${number(m.clip_frac)}  loss ${number(m.loss)}`,
  ].join("\n");
}

function findNode(id) {
  if (id === undefined || id === null) return null;
  const plain = String(id).split(":").pop();
  return app.graph?.getNodeById(Number(plain)) || null;
}

app.registerExtension({
  name: "comfyui-prdp.live",

  async beforeRegisterNodeDef(nodeType, nodeData) {
    if (!TEXT_NODES.has(nodeData.name)) return;

    const onExecuted = nodeType.prototype.onExecuted;
    nodeType.prototype.onExecuted = function (message) {
      onExecuted?.apply(this, arguments);
      if (message?.text) setText(this, message.text.join("\n"));
    };

    const onDrawForeground = nodeType.prototype.onDrawForeground;
    nodeType.prototype.onDrawForeground = function (ctx) {
      onDrawForeground?.apply(this, arguments);
      if (!this.prdpLines?.length || this.flags?.collapsed) return;
      ctx.save();
      ctx.font = "12px monospace";
      ctx.fillStyle = "#ddd";
      let y = this.size[1] - this.prdpLines.length * LINE_HEIGHT;
      for (const line of this.prdpLines) {
        ctx.fillText(line, 8, y);
        y += LINE_HEIGHT;
      }
      ctx.restore();
    };

    if (nodeData.name === "PRDPTrainLoRA") {
      const getExtraMenuOptions = nodeType.prototype.getExtraMenuOptions;
      nodeType.prototype.getExtraMenuOptions = function (_, options) {
        getExtraMenuOptions?.apply(this, arguments);
        const jobId = this.prdpJobId;
        options.push({
          content: "PRDP: stop training (keep the LoRA so far)",
          disabled: !jobId,
          callback: async () => {
            const response = await api.fetchApi(`/prdp/jobs/${jobId}/stop`, { method: "POST" });
            if (response.ok) setText(this, "stopping after the current step ...");
          },
        });
      };
    }
  },

  setup() {
    api.addEventListener("prdp.epoch", ({ detail }) => {
      const node = findNode(detail.node);
      if (!node) return;
      node.prdpJobId = detail.job_id;
      setText(node, formatMetrics(detail));
    });
    api.addEventListener("prdp.checkpoint", ({ detail }) => {
      const node = findNode(detail.node);
      if (node) node.prdpJobId = detail.job_id;
    });
    api.addEventListener("prdp.job", ({ detail }) => {
      const node = findNode(detail.node);
      if (!node) return;
      node.prdpJobId = detail.status === "running" ? detail.job_id : null;
      if (detail.status === "running") setText(node, "training started ...");
    });
  },
});
