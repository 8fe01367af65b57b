// TurboBooth's web extension (plain JS modules, no build step), for the early-2024 and the current
// ComfyUI frontend alike:
// - DreamBoothTrain: a live loss chart fed by the node's "turbobooth.train" events, refilled from
//   GET /turbobooth/runs/{run}/log after a page reload and kept after the run;
// - TurboLoader: only the widgets of the chosen source are shown (loader.js);
// - CheckpointSave: the path it wrote, shown in the node.
// Without this extension every node works as before; it only adds what the page shows.
import { app } from "../../scripts/app.js";
import { api } from "../../scripts/api.js";
import { TRAIN_TYPE, addPoint, newState, rateFromLog, setPreview, setupDashboard } from "./dashboard.js";
import { LOADER_TYPE, setupLoader } from "./loader.js";
import { addDrawnWidget, fitStart } from "./widgets.js";

const SAVE_TYPE = "TurboBoothCheckpointSave";
const EVENT = "turbobooth.train";

function findNode(id) {
  if (id === null || id === undefined || !app.graph) return null;
  const key = /^\d+$/.test(String(id)) ? Number(id) : id; // subgraph ids ("3:5") are not on the root graph
  return app.graph.getNodeById(key) || null;
}

async function getJson(route) {
  try {
    const resp = await api.fetchApi(route, { cache: "no-store" });
    return resp.ok ? await resp.json() : null;
  } catch (e) {
    console.warn("TurboBooth: could not read", route, e);
    return null;
  }
}

function runRoute(run, what) {
  return `/turbobooth/runs/${encodeURIComponent(run)}/${what}`;
}

function startRun(node, run) {
  const st = node.turbobooth;
  if (st.run === run) return;
  Object.assign(st, newState(), { run, phase: "running" });
  node.properties = node.properties || {};
  node.properties.turbobooth_run = run;
}

// Fill the chart from the run's own log (after a reload, a resume, or a run reused from disk).
async function refill(node, run) {
  const log = await getJson(runRoute(run, "log"));
  const st = node.turbobooth;
  if (!log || !st || st.run !== run || findNode(node.id) !== node) return;
  for (const row of log.steps) {
    addPoint(st, row);
    if (Number.isFinite(row.total)) st.total = row.total;
  }
  if (st.itPerSec === null) st.itPerSec = rateFromLog(log.steps);
  if (log.preview) setPreview(st, api.apiURL(runRoute(run, "preview")) + `?step=${st.step}`);
  node.setDirtyCanvas?.(true, true);
}

function onTrainEvent(event) {
  const d = event.detail;
  if (!d || typeof d.run !== "string") return;
  const node = findNode(d.node);
  if (!node || node.type !== TRAIN_TYPE || !node.turbobooth) return; // a node deleted or replaced: ignored
  const st = node.turbobooth;
  const isNew = st.run !== d.run;
  startRun(node, d.run);
  if (d.phase === "step") {
    addPoint(st, d);
    st.phase = "running";
    st.itPerSec = Number.isFinite(d.it_s) ? d.it_s : st.itPerSec;
    st.eta = d.eta_s;
    st.lr = d.lr;
    if (d.preview) setPreview(st, d.preview);
  } else if (d.phase === "done" || d.phase === "stopped") {
    st.phase = d.phase;
    st.eta = 0;
  }
  if (Number.isFinite(d.total)) st.total = d.total;
  st.events += 1;
  if (isNew || d.phase !== "step") refill(node, d.run); // earlier steps (resume, reload), and nothing missed
  node.setDirtyCanvas?.(true, true);
}

// After a reload: the run this node is training now, or the one it trained last.
async function restore(node) {
  const active = await getJson("/turbobooth/active");
  const mine = (active?.runs || []).find((r) => String(r.node) === String(node.id));
  const run = mine?.run || node.properties?.turbobooth_run;
  if (!run || typeof run !== "string" || !node.turbobooth) return;
  startRun(node, run);
  node.turbobooth.phase = mine ? "running" : "done";
  if (mine) node.turbobooth.total = mine.total;
  await refill(node, run);
  if (mine) watch(node, run);
}

// While a restored run goes on, refill from its log whenever no event came for a while (a reloaded page
// may have a new client id, and the server sends the events to the client that queued the prompt).
function watch(node, run, every = 2000) {
  let seen = -1;
  const timer = setInterval(async () => {
    const st = node.turbobooth;
    if (!st || st.run !== run || findNode(node.id) !== node) return clearInterval(timer);
    if (st.events !== seen) { seen = st.events; return; }
    const active = await getJson("/turbobooth/active");
    const still = (active?.runs || []).some((r) => String(r.node) === String(node.id) && r.run === run);
    await refill(node, run);
    if (!still) {
      clearInterval(timer);
      if (st.phase === "running") { st.phase = "done"; st.eta = 0; }
    }
  }, every);
}

function setupSavedPath(node) {
  addDrawnWidget(node, "saved_path", 22, (ctx, width, y) => {
    const path = node.turbobooth_saved_path;
    ctx.save();
    ctx.font = "12px sans-serif";
    ctx.textAlign = "left";
    ctx.fillStyle = path ? "#9f9" : "#888";
    ctx.fillText(fitStart(ctx, path ? `saved: ${path}` : "saved path: appears after a run", width - 20), 10, y + 15);
    ctx.restore();
  });
}

app.registerExtension({
  name: "TurboBooth.GraphEditor",
  async setup() {
    api.addEventListener(EVENT, onTrainEvent);
  },
  async beforeRegisterNodeDef(nodeType, nodeData) {
    const name = nodeData?.name;
    if (name !== TRAIN_TYPE && name !== LOADER_TYPE && name !== SAVE_TYPE) return;
    const onCreated = nodeType.prototype.onNodeCreated;
    nodeType.prototype.onNodeCreated = function (...args) {
      const r = onCreated?.apply(this, args);
      if (name === TRAIN_TYPE) setupDashboard(this);
      else if (name === LOADER_TYPE) setupLoader(this);
      else setupSavedPath(this);
      return r;
    };
    if (name === SAVE_TYPE) {
      const onExecuted = nodeType.prototype.onExecuted;
      nodeType.prototype.onExecuted = function (message) {
        onExecuted?.apply(this, [message]);
        const path = message?.text?.[0];
        if (typeof path === "string") {
          this.turbobooth_saved_path = path;
          this.properties = this.properties || {};
          this.properties.turbobooth_saved_path = path;
          this.setDirtyCanvas?.(true, true);
        }
      };
    }
  },
  loadedGraphNode(node) {
    if (node.type === TRAIN_TYPE && node.turbobooth) restore(node);
    if (node.type === SAVE_TYPE && typeof node.properties?.turbobooth_saved_path === "string") {
      node.turbobooth_saved_path = node.properties.turbobooth_saved_path;
    }
  },
});
