"""The ComfyUI frontend in a tab: wait until it is ready, load workflows, read and set widgets, queue.

Works with both frontends:

- legacy (ComfyUI's own web/ folder, as in the pinned early-2024 host):
  ``window.app`` appears after ``app.setup()``, the queue button is ``#queue-button``;
- modern (pip ``comfyui-frontend-package``, Vue): additionally wait for
  ``app.vueAppReady`` and for its start-up graph, and the queue button is
  ``[data-testid="queue-button"]``.
"""

from __future__ import annotations

import json
import time

from cdp import BrowserError, Page

READY_JS = """(() => {
  const a = window.app, LG = window.LiteGraph;
  if (!a || !a.graph || !a.canvas || !LG || !LG.registered_node_types) return false;
  const t = LG.registered_node_types;
  if (!t.KSampler || !t.SaveImage || !t.LoadImage) return false;
  const modern = !!document.querySelector('#vue-app') || ('vueAppReady' in a);
  if (modern && !a.vueAppReady) return false;
  return modern ? 'modern' : 'legacy';
})()"""

NODE_REPORT_JS = """(() => app.graph._nodes.map(n => ({
  id: n.id, type: n.type, title: n.title,
  has_errors: !!n.has_errors,
  registered: n.type in LiteGraph.registered_node_types,
  widgets: (n.widgets || []).map(w => w.name),
  values: (n.widgets || []).map(w => (typeof w.value === 'object' && w.value !== null) ? null : w.value),
})))()"""

VISIBLE_JS = """((sel) => [...document.querySelectorAll(sel)]
  .filter(e => e.offsetParent !== null || getComputedStyle(e).position === 'fixed')
  .map(e => (e.innerText || '').trim().slice(0, 500)))"""

# Settings that keep the modern frontend's first-run dialogs out of the way.
QUIET_SETTINGS = {
    "Comfy.TutorialCompleted": True,
    "Comfy.InstalledVersion": "99.0.0",
    "Comfy.Release.Version": "99.0.0",
    "Comfy.Release.Timestamp": int(time.time() * 1000),
    "Comfy.Workflow.WorkflowTabsPosition": "Topbar",
    "Comfy.Minimap.Visible": False,
    "Comfy.VueNodes.Enabled": False,
    "Comfy.Validation.Workflows": True,
    "Comfy.Window.UnloadConfirmation": False,  # a reload mid-run must not stop at "leave the page?"
}

QUEUE_BUTTONS = ('[data-testid="queue-button"] button', '[data-testid="queue-button"]', "#queue-button")


class ComfyPage:
    def __init__(self, page: Page, server) -> None:
        self.page = page
        self.server = server
        self.frontend = ""

    # ------------------------------------------------------------------ start-up
    def open(self, timeout: float = 120, fresh: bool = True) -> str:
        """Open ComfyUI. ``fresh``: from empty browser storage (the current frontend would otherwise restore the
        workflows an earlier test's page left there, and skip their missing-models dialog when loaded again);
        ``fresh=False`` is a reload that keeps this page's own graph."""
        for key, value in QUIET_SETTINGS.items():
            self.server.request("POST", f"/settings/{key}", value)
        self.page.goto(self.server.url + "/", timeout=timeout)
        if fresh:
            self.page.evaluate("(() => { localStorage.clear(); sessionStorage.clear(); })()")
            self.page.goto(self.server.url + "/", timeout=timeout)
        self.frontend = self.page.wait_for(READY_JS, timeout=timeout, what="ComfyUI frontend ready")
        if self.frontend == "modern":
            # the modern frontend restores or builds a start-up graph after it reports ready
            self.page.wait_for("app.graph._nodes.length > 0", timeout=30, what="start-up graph")
            self.page.evaluate("new Promise(r => setTimeout(r, 500))")
        self.dismiss_dialogs()
        return self.frontend

    def dismiss_dialogs(self) -> None:
        self.page.evaluate(
            """(() => { for (const b of document.querySelectorAll(
                '.p-dialog-close-button, .p-dialog-header-close, .comfy-modal .comfy-modal-close, .comfy-modal button'))
                { if (b.offsetParent !== null && /close|×|✕|^$/i.test((b.innerText || b.getAttribute('aria-label') || '').trim()))
                    b.click(); } })()"""
        )

    # ------------------------------------------------------------------ graphs
    def load(self, workflow: dict) -> None:
        self.page.call("async (wf) => { await app.loadGraphData(wf); }", workflow, timeout=60)
        self.page.evaluate("new Promise(r => requestAnimationFrame(() => requestAnimationFrame(r)))")

    def nodes(self) -> list[dict]:
        return self.page.evaluate(NODE_REPORT_JS)

    def visible(self, selector: str) -> list[str]:
        return self.page.call(VISIBLE_JS, selector)

    def set_widget(self, node_id: int, name: str, value) -> None:
        self.page.call(
            """(id, name, value) => {
                const n = app.graph.getNodeById(id);
                if (!n) throw new Error('no node ' + id);
                const w = (n.widgets || []).find(w => w.name === name);
                if (!w) throw new Error(n.type + ' has no widget ' + name);
                w.value = value;
                if (w.callback) w.callback(value, app.canvas, n);
            }""",
            node_id, name, value,
        )

    def widget_value(self, node_id: int, name: str):
        return self.page.call(
            "(id, name) => { const w = (app.graph.getNodeById(id).widgets || []).find(w => w.name === name); return w ? w.value : undefined; }",
            node_id, name,
        )

    def fit_view(self, hide_menu: bool = False, padding: int = 40) -> None:
        """Scale and centre the canvas so every node is visible."""
        self.page.call(
            """(hideMenu, pad) => {
                if (hideMenu) for (const el of document.querySelectorAll('.comfy-menu')) el.style.display = 'none';
                if (hideMenu) { app.canvas.show_info = false; app.canvas.render_canvas_border = false; }
                const nodes = app.graph._nodes;
                if (!nodes.length) return;
                const th = LiteGraph.NODE_TITLE_HEIGHT || 30;
                let x0 = Infinity, y0 = Infinity, x1 = -Infinity, y1 = -Infinity;
                for (const n of nodes) {
                    x0 = Math.min(x0, n.pos[0]); y0 = Math.min(y0, n.pos[1] - th);
                    x1 = Math.max(x1, n.pos[0] + n.size[0]); y1 = Math.max(y1, n.pos[1] + n.size[1]);
                }
                const c = app.canvas.canvas;
                const W = c.clientWidth || c.width, H = c.clientHeight || c.height;
                const s = Math.min((W - 2 * pad) / (x1 - x0), (H - 2 * pad) / (y1 - y0), 1.25);
                const ds = app.canvas.ds;
                ds.scale = s;
                ds.offset[0] = (W / s - (x1 - x0)) / 2 - x0;
                ds.offset[1] = (H / s - (y1 - y0)) / 2 - y0;
                app.canvas.setDirty(true, true);
                app.canvas.draw(true, true);
            }""",
            hide_menu, padding,
        )
        self.page.evaluate("new Promise(r => requestAnimationFrame(() => requestAnimationFrame(r)))")

    # ------------------------------------------------------------------ running
    def click_queue(self) -> str:
        for selector in QUEUE_BUTTONS:
            if self.visible(selector):
                self.page.click(selector)
                return selector
        raise BrowserError(f"no queue button visible (tried {QUEUE_BUTTONS}); frontend {self.frontend}")

    def wait_image_shown(self, node_id: int, prefix: str, timeout: float = 60) -> dict:
        """Wait until the page shows an output image whose URL names ``prefix`` (on the node, or anywhere in the DOM)."""
        js = """((id, prefix) => {
            const n = app.graph.getNodeById(id);
            const imgs = (n && n.imgs) || [];
            const onNode = imgs.filter(i => i.complete && i.naturalWidth > 0 && decodeURIComponent(i.src).includes(prefix));
            if (onNode.length) return {where: 'node.imgs', src: onNode[0].src, w: onNode[0].naturalWidth, h: onNode[0].naturalHeight};
            const dom = [...document.querySelectorAll('img')].filter(i => i.complete && i.naturalWidth > 0 && decodeURIComponent(i.src).includes(prefix));
            if (dom.length) return {where: 'dom', src: dom[0].src, w: dom[0].naturalWidth, h: dom[0].naturalHeight};
            return null;
        })""" + f"({int(node_id)}, {json.dumps(prefix)})"
        return self.page.wait_for(js, timeout=timeout, what=f"output image {prefix} shown in the page")
