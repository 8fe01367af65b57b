// The live DreamBoothTrain dashboard: a loss chart (raw + smoothed), step/total, it/s, ETA and the latest
// validation image, drawn inside the node. The state is `node.turbobooth` (read by the browser tests):
//   { run, phase, step, total, itPerSec, eta, lr, points: [[step, loss], ...], preview }
import { addDrawnWidget } from "./widgets.js";

export const TRAIN_TYPE = "TurboBoothDreamBoothTrain";
const HEIGHT = 200;
const SMOOTH = 0.3; // weight of the newest point in the smoothed curve (an exponential moving average)

export function newState() {
  return { run: null, phase: "idle", step: 0, total: 0, itPerSec: null, eta: null, lr: null, points: [],
           preview: null, events: 0 };
}

// Merge one step {step, loss, ...} into the chart (a step seen twice keeps the newest loss).
export function addPoint(state, row) {
  const step = Number(row.step), loss = Number(row.loss);
  if (!Number.isFinite(step) || !Number.isFinite(loss)) return;
  const pts = state.points;
  const last = pts.length ? pts[pts.length - 1][0] : -Infinity;
  if (step > last) pts.push([step, loss]);
  else {
    const i = pts.findIndex((p) => p[0] >= step);
    if (pts[i][0] === step) pts[i][1] = loss;
    else pts.splice(i, 0, [step, loss]);
  }
  if (step >= state.step) state.step = step;
}

export function smoothed(points) {
  const out = [];
  let ema = null;
  for (const [s, v] of points) {
    ema = ema === null ? v : SMOOTH * v + (1 - SMOOTH) * ema;
    out.push([s, ema]);
  }
  return out;
}

// it/s from the log's timestamps (the last 20 steps), for a chart refilled after a reload.
export function rateFromLog(rows) {
  const tail = rows.filter((r) => Number.isFinite(r.time)).slice(-20);
  if (tail.length < 2) return null;
  const dt = tail[tail.length - 1].time - tail[0].time;
  return dt > 0 ? (tail[tail.length - 1].step - tail[0].step) / dt : null;
}

function fmtTime(s) {
  if (!Number.isFinite(s)) return "–";
  s = Math.max(0, Math.round(s));
  const h = Math.floor(s / 3600), m = Math.floor((s % 3600) / 60), sec = s % 60;
  const mm = String(m).padStart(2, "0"), ss = String(sec).padStart(2, "0");
  return h ? `${h}:${mm}:${ss}` : `${m}:${ss}`;
}

function statusLine(st) {
  if (!st.run) return "loss chart: appears when training starts";
  const parts = [`step ${st.step}/${st.total || "?"}`];
  if (Number.isFinite(st.itPerSec)) parts.push(`${st.itPerSec.toFixed(st.itPerSec < 10 ? 2 : 1)} it/s`);
  if (st.phase === "running") parts.push(`ETA ${fmtTime(st.eta)}`);
  else if (st.phase !== "idle") parts.push(st.phase);
  const last = st.points[st.points.length - 1];
  if (last) parts.push(`loss ${last[1].toPrecision(4)}`);
  return parts.join(" · ");
}

function drawLine(ctx, pts, sx, sy, color, width) {
  if (!pts.length) return;
  ctx.strokeStyle = color;
  ctx.lineWidth = width;
  ctx.beginPath();
  pts.forEach(([s, v], i) => (i ? ctx.lineTo(sx(s), sy(v)) : ctx.moveTo(sx(s), sy(v))));
  ctx.stroke();
}

function drawChart(ctx, st, x, y, w, h) {
  ctx.fillStyle = "#1b1b1b";
  ctx.fillRect(x, y, w, h);
  ctx.strokeStyle = "#444";
  ctx.lineWidth = 1;
  ctx.strokeRect(x + 0.5, y + 0.5, w - 1, h - 1);
  const pts = st.points;
  if (!pts.length) return;
  const vals = pts.map((p) => p[1]);
  let lo = Math.min(...vals), hi = Math.max(...vals);
  if (hi - lo < 1e-12) { hi += 0.5 * Math.abs(hi || 1); lo -= 0.5 * Math.abs(lo || 1); }
  const s0 = Math.min(pts[0][0], 1), s1 = Math.max(st.total || 0, pts[pts.length - 1][0], s0 + 1);
  const pad = 6;
  const sx = (s) => x + pad + ((s - s0) / (s1 - s0)) * (w - 2 * pad);
  const sy = (v) => y + h - pad - ((v - lo) / (hi - lo)) * (h - 2 * pad - 12);
  drawLine(ctx, pts, sx, sy, "rgba(120,170,255,0.45)", 1);
  drawLine(ctx, smoothed(pts), sx, sy, "#ffb347", 2);
  ctx.fillStyle = "#999";
  ctx.font = "10px sans-serif";
  ctx.textAlign = "left";
  ctx.fillText(`max ${hi.toPrecision(3)}  min ${lo.toPrecision(3)}  — raw  — smoothed`, x + pad, y + 11);
}

export function drawDashboard(node, ctx, width, y, height) {
  const st = node.turbobooth;
  if (!st) return;
  const m = 10, top = y + 4;
  ctx.save();
  ctx.fillStyle = "#ddd";
  ctx.font = "12px sans-serif";
  ctx.textAlign = "left";
  ctx.fillText(statusLine(st), m, top + 12);
  const img = st.previewImage;
  const imgSize = img && img.complete && img.naturalWidth ? Math.min(96, height - 24) : 0;
  const chartW = width - 2 * m - (imgSize ? imgSize + 6 : 0);
  drawChart(ctx, st, m, top + 20, chartW, height - 28);
  if (imgSize) ctx.drawImage(img, width - m - imgSize, top + 20, imgSize, imgSize);
  ctx.restore();
}

export function setupDashboard(node) {
  node.turbobooth = newState();
  addDrawnWidget(node, "dashboard", HEIGHT, (ctx, width, y, h) => drawDashboard(node, ctx, width, y, h));
  const size = node.computeSize();
  node.setSize([Math.max(node.size[0], size[0]), Math.max(node.size[1], size[1])]);
}

export function setPreview(st, url) {
  if (!url || st.preview === url) return;
  st.preview = url;
  const img = new Image();
  img.src = url;
  st.previewImage = img;
}
