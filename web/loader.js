// The source-aware TurboLoader: only the widgets of the chosen `source` are shown.
// Every widget keeps its value (hidden ones too), so saved workflows and prompts are unchanged.
import { fitHeight, setShown } from "./widgets.js";

export const LOADER_TYPE = "TurboBoothLoader";

// Which sources use a widget; mirrors manager/spec.py SOURCE_WIDGETS (tests/test_nodes.py checks it).
// Widgets not listed (source, family, dtype, device, offload, variant) are always shown.
export const SOURCE_WIDGETS = {
  "diffusers folder": ["diffusers_model"],
  "hub repo": ["repo_id", "revision"],
  "split files": ["diffusion_model", "text_encoder", "vae"],
  "single file": ["checkpoint"],
};

const PER_SOURCE = new Set(Object.values(SOURCE_WIDGETS).flat());

export function visibleFor(source) {
  return new Set(SOURCE_WIDGETS[source] || []);
}

export function applySource(node) {
  const source = node.widgets?.find((w) => w.name === "source");
  if (!source) return;
  const wanted = visibleFor(source.value);
  for (const w of node.widgets) {
    if (PER_SOURCE.has(w.name)) setShown(node, w, wanted.has(w.name));
  }
  node.turboboothSource = source.value;
  fitHeight(node);
}

export function setupLoader(node) {
  const source = node.widgets?.find((w) => w.name === "source");
  if (!source) return;
  const callback = source.callback;
  source.callback = function (...args) {
    const r = callback?.apply(this, args);
    applySource(node);
    return r;
  };
  // a value set any other way (loading a workflow, undo, a script) is picked up on the next frame
  const onDraw = node.onDrawForeground;
  node.onDrawForeground = function (...args) {
    if (node.turboboothSource !== source.value) applySource(node);
    return onDraw?.apply(this, args);
  };
  applySource(node);
}
