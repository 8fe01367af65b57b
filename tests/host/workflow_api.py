"""Workflow files in the graph editor's "UI" format, read against a host's ``/object_info``.

The editor saves a graph as ``{"nodes": [...], "links": [...], ...}``. Each node
keeps its widget values as a positional list, ``widgets_values``, in the order
the node declares its inputs (required, then optional), with one extra value
("fixed", "randomize", ...) that the frontend inserts after every seed widget.
The server only runs the "API" format, ``{id: {"class_type", "inputs"}}``.

``widget_names`` gives the positional layout, ``set_widget`` / ``get_widget``
edit a UI-format node by name, and ``ui_to_api`` converts a whole graph the
way the frontend's "Queue Prompt" does: widgets by name, links followed, and
frontend-only nodes (notes, reroutes) left out.
"""

from __future__ import annotations

import copy
import json
import os

# Nodes that exist only in the browser: the server never sees them.
FRONTEND_ONLY = frozenset({"Note", "MarkdownNote", "Reroute", "PrimitiveNode"})
# The value inserted after a seed widget; both frontends name it so.
CONTROL = "control_after_generate"
# Widget types whose values the server does not need (buttons the frontend adds).
_WIDGET_KINDS = ("INT", "FLOAT", "STRING", "BOOLEAN")
_SEED_NAMES = ("seed", "noise_seed")


def load_workflow(path: str) -> dict:
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def _inputs_in_order(info: dict) -> list[tuple[str, list]]:
    spec = info.get("input", {}) or {}
    order = info.get("input_order") or {}
    out = []
    for section in ("required", "optional"):
        entries = spec.get(section, {}) or {}
        names = order.get(section) or list(entries)
        out.extend((name, entries[name]) for name in names if name in entries)
    return out


def is_widget(spec) -> bool:
    kind = spec[0]
    return isinstance(kind, list) or kind in _WIDGET_KINDS or kind == "COMBO"


def has_control(name: str, spec) -> bool:
    """Whether the frontend adds a control_after_generate widget after this input."""
    kind = spec[0]
    opts = spec[1] if len(spec) > 1 and isinstance(spec[1], dict) else {}
    if opts.get("control_after_generate"):
        return True
    return kind == "INT" and name in _SEED_NAMES


def widget_names(info: dict) -> list[str]:
    """The positional layout of ``widgets_values`` for a node type (``/object_info`` entry)."""
    names = []
    for name, spec in _inputs_in_order(info):
        if not is_widget(spec):
            continue
        names.append(name)
        if has_control(name, spec):
            names.append(CONTROL)
    return names


def link_inputs(info: dict) -> list[tuple[str, str, bool]]:
    """(name, type, optional) of the inputs that take a link rather than a widget."""
    spec = info.get("input", {}) or {}
    optional = set((spec.get("optional") or {}).keys())
    return [(name, s[0], name in optional) for name, s in _inputs_in_order(info) if not is_widget(s)]


def node_by_id(workflow: dict, node_id: int) -> dict:
    for node in workflow["nodes"]:
        if node["id"] == node_id:
            return node
    raise KeyError(f"no node {node_id} in the workflow")


def nodes_of_type(workflow: dict, node_type: str) -> list[dict]:
    return [n for n in workflow["nodes"] if n["type"] == node_type]


def _index(node: dict, object_info: dict, name: str) -> int:
    names = widget_names(object_info[node["type"]])
    if name not in names:
        raise KeyError(f"{node['type']} (node {node['id']}) has no widget {name!r}; widgets: {names}")
    return names.index(name)


def get_widget(node: dict, object_info: dict, name: str):
    return node["widgets_values"][_index(node, object_info, name)]


def set_widget(node: dict, object_info: dict, name: str, value) -> None:
    node["widgets_values"][_index(node, object_info, name)] = value


def set_widgets(workflow: dict, object_info: dict, node_type: str, **values) -> int:
    """Set widgets by name on every node of ``node_type``; returns how many nodes matched."""
    nodes = nodes_of_type(workflow, node_type)
    for node in nodes:
        for name, value in values.items():
            set_widget(node, object_info, name, value)
    return len(nodes)


class WorkflowError(ValueError):
    """The workflow does not fit the host's node definitions."""


def check_widgets(workflow: dict, object_info: dict) -> list[str]:
    """Problems with widget layouts: unknown node types, too few values, seed control values out of place."""
    problems = []
    for node in workflow["nodes"]:
        ntype = node["type"]
        if ntype in FRONTEND_ONLY:
            continue
        if ntype not in object_info:
            problems.append(f"node {node['id']}: type {ntype!r} is not registered")
            continue
        names = widget_names(object_info[ntype])
        values = node.get("widgets_values") or []
        if isinstance(values, dict):  # newer frontends may save a name -> value map
            missing = [n for n in names if n != CONTROL and n not in values]
            if missing:
                problems.append(f"node {node['id']} ({ntype}): widgets_values lacks {missing}")
            continue
        if len(values) < len(names):
            problems.append(f"node {node['id']} ({ntype}): {len(values)} widget values for {len(names)} widgets {names}")
            continue
        for i, name in enumerate(names):
            if name == CONTROL and values[i] not in ("fixed", "increment", "decrement", "randomize"):
                problems.append(f"node {node['id']} ({ntype}): value {values[i]!r} where {CONTROL} belongs (after {names[i - 1]})")
    return problems


def ui_to_api(workflow: dict, object_info: dict) -> dict:
    """Convert a UI-format workflow to the API prompt the server runs.

    Muted (mode 2) and bypassed (mode 4) nodes are not supported and raise;
    frontend-only nodes are dropped and links through reroutes are followed.
    """
    problems = check_widgets(workflow, object_info)
    if problems:
        raise WorkflowError("; ".join(problems))
    nodes = {n["id"]: n for n in workflow["nodes"]}
    links = {}
    for link in workflow.get("links") or []:
        if isinstance(link, dict):
            lid, src, src_slot, dst, dst_slot = (link[k] for k in ("id", "origin_id", "origin_slot", "target_id", "target_slot"))
        else:
            lid, src, src_slot, dst, dst_slot = link[:5]
        links[lid] = (src, src_slot, dst, dst_slot)

    def source_of(link_id: int) -> tuple[int, int]:
        src, slot, _, _ = links[link_id]
        seen = set()
        while nodes[src]["type"] == "Reroute":
            if src in seen:
                raise WorkflowError(f"reroute loop at node {src}")
            seen.add(src)
            upstream = (nodes[src].get("inputs") or [{}])[0].get("link")
            if upstream is None:
                raise WorkflowError(f"reroute node {src} has no input")
            src, slot, _, _ = links[upstream]
        return src, slot

    prompt = {}
    for node in workflow["nodes"]:
        ntype = node["type"]
        if ntype in FRONTEND_ONLY:
            continue
        if node.get("mode", 0) not in (0,):
            raise WorkflowError(f"node {node['id']} ({ntype}) is muted or bypassed (mode {node['mode']}); not supported here")
        info = object_info[ntype]
        inputs = {}
        values = node.get("widgets_values") or []
        if isinstance(values, dict):
            inputs.update({k: v for k, v in values.items() if k != CONTROL})
        else:
            for name, value in zip(widget_names(info), values, strict=False):
                if name != CONTROL:
                    inputs[name] = value
        for slot in node.get("inputs") or []:
            if slot.get("link") is None:
                continue
            src, src_slot = source_of(slot["link"])
            if nodes[src]["type"] in FRONTEND_ONLY:
                raise WorkflowError(f"node {node['id']} input {slot['name']!r} comes from frontend-only node {src}")
            name = (slot.get("widget") or {}).get("name") or slot["name"]
            inputs[name] = [str(src), int(src_slot)]
        prompt[str(node["id"])] = {"class_type": ntype, "inputs": inputs}
    return prompt


def workflow_files(folder: str) -> list[str]:
    return sorted(os.path.join(folder, f) for f in os.listdir(folder) if f.endswith(".json"))


def copy_workflow(workflow: dict) -> dict:
    return copy.deepcopy(workflow)
