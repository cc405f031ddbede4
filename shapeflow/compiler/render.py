"""The graph of a spec as DOT, Mermaid or JSON (a by-product of the compiled graph)."""

from __future__ import annotations

import json

import networkx as nx

from shapeflow.compiler.plan import Plan
from shapeflow.dsl.ast import show_value

_PHASE_COLOURS = {"setup": "#e8e8e8", "rollout": "#dbeafe", "update": "#fde2cf"}


def _params_text(params: dict, limit: int = 4) -> str:
    items = [f"{k}={show_value(v)}" for k, v in params.items()]
    if len(items) > limit:
        items = items[:limit] + ["…"]
    return ", ".join(items)


def _title(graph: nx.DiGraph, n: str) -> list[str]:
    d = graph.nodes[n]
    label = d["label"]
    if d["op"] != "stage" and d["params"]:  # an operator with a constant operand: "0.1 ×", "× 2"
        consts = d["params"]
        label = f"{show_value(consts['left'])} {label}" if "left" in consts else f"{label} {show_value(consts['right'])}"
    if d["op"] == "alias":
        head = f"{d['binding']} (same value)"
    else:
        head = f"{d['binding']} = {label}" if d["binding"] else label
    lines = [head, d["type"]]
    if d["op"] == "stage" and d["params"]:
        lines.append(_params_text(d["params"]))
    return lines


def to_dot(graph: nx.DiGraph, plan: Plan) -> str:
    def q(s: str) -> str:
        return '"' + s.replace("\\", "\\\\").replace('"', '\\"') + '"'

    out = [f"digraph {q(graph.graph['name'])} {{", "  rankdir=TB;", '  node [shape=box, style="rounded,filled", fontname="Helvetica"];']
    for phase, nodes in plan.phases.items():
        if not nodes:
            continue
        out.append(f"  subgraph cluster_{phase} {{")
        out.append(f'    label={q(phase + " phase")}; style=dashed; color="#888888";')
        for n in nodes:
            label = "\\n".join(s.replace("\\", "\\\\").replace('"', '\\"') for s in _title(graph, n))
            out.append(f'    {q(n)} [label="{label}", fillcolor="{_PHASE_COLOURS[phase]}"];')
        out.append("  }")
    for a, b, d in graph.edges(data=True):
        out.append(f"  {q(a)} -> {q(b)} [label={q(d['arg'])}];")
    out.append("}")
    return "\n".join(out) + "\n"


def to_mermaid(graph: nx.DiGraph, plan: Plan) -> str:
    ids = {n: f"n{i}" for i, n in enumerate(plan.order)}

    def esc(s: str) -> str:
        return s.replace('"', "#quot;")

    out = ["flowchart TD"]
    for phase, nodes in plan.phases.items():
        if not nodes:
            continue
        out.append(f'  subgraph {phase}["{phase} phase"]')
        for n in nodes:
            out.append(f'    {ids[n]}["{esc("<br/>".join(_title(graph, n)))}"]')
        out.append("  end")
    for a, b, d in graph.edges(data=True):
        out.append(f"  {ids[a]} -->|{esc(d['arg'])}| {ids[b]}")
    return "\n".join(out) + "\n"


def to_json(graph: nx.DiGraph, plan: Plan) -> str:
    data = {
        "name": graph.graph["name"],
        "needs": graph.graph["needs"],
        "plan": plan.to_data(),
        "nodes": [{"id": n, **{k: v for k, v in graph.nodes[n].items() if k != "order"}} for n in plan.order],
        "edges": [{"from": a, "to": b, "arg": d["arg"]} for a, b, d in graph.edges(data=True)],
    }
    return json.dumps(data, indent=2, default=str) + "\n"


FORMATS = {"dot": to_dot, "mermaid": to_mermaid, "json": to_json}
