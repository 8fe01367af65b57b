// Widget helpers that work in both ComfyUI frontends:
// - the current one (litegraph with LGraphNode.isWidgetVisible) hides a widget with `widget.hidden`;
// - the early-2024 one has no such flag, so a hidden widget gets a type nothing draws and no height.
// A hidden widget keeps its value: saved workflows and queued prompts still carry it.

const HIDDEN_TYPE = "turbobooth.hidden";
const CONVERTED = "converted-widget"; // the early-2024 frontend's "widget converted to an input"

export function supportsHiddenFlag(node) {
  return typeof node.isWidgetVisible === "function";
}

export function isShown(node, widget) {
  if (supportsHiddenFlag(node)) return !widget.hidden;
  return widget.type !== HIDDEN_TYPE && widget.type !== CONVERTED;
}

export function setShown(node, widget, shown) {
  if (supportsHiddenFlag(node)) {
    widget.hidden = !shown;
    return;
  }
  if (widget.type === CONVERTED) return; // linked from another node: leave it as it is
  if (!shown && widget.type !== HIDDEN_TYPE) {
    widget.turboboothType = widget.type;
    widget.turboboothComputeSize = widget.computeSize;
    widget.type = HIDDEN_TYPE;
    widget.computeSize = () => [0, -4];
  } else if (shown && widget.type === HIDDEN_TYPE) {
    widget.type = widget.turboboothType;
    widget.computeSize = widget.turboboothComputeSize;
    if (!widget.computeSize) delete widget.computeSize;
  }
}

// Height to fit the visible widgets; the width the user chose stays.
export function fitHeight(node) {
  const size = node.computeSize();
  node.setSize([Math.max(node.size[0], size[0]), size[1]]);
  node.setDirtyCanvas?.(true, true);
}

// A widget the extension draws itself: never saved in the workflow's values nor sent with the prompt.
export function addDrawnWidget(node, name, height, draw) {
  const widget = {
    name,
    type: "turbobooth." + name,
    value: null,
    serialize: false,
    options: { serialize: false },
    draw(ctx, n, width, y) {
      draw(ctx, width, y, height);
    },
    computeSize(width) {
      return [width || 0, height];
    },
  };
  return node.addCustomWidget(widget);
}

// Text that fits `width`, cut at the start ("…/loras/sks_dog.safetensors").
export function fitStart(ctx, text, width) {
  if (ctx.measureText(text).width <= width) return text;
  let cut = text;
  while (cut.length > 1 && ctx.measureText("…" + cut).width > width) cut = cut.slice(1);
  return "…" + cut;
}
