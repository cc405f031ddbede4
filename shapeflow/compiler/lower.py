"""Lower a checked Program to a networkx DiGraph: a node per stage instance or operator, an
edge per data flow (labelled with the argument it feeds)."""

from __future__ import annotations

import networkx as nx

from shapeflow.compiler.check import Program


def lower(prog: Program) -> nx.DiGraph:
    g = nx.DiGraph(name=prog.name, needs=sorted(prog.needs), file=prog.file)
    for node in prog.nodes.values():
        g.add_node(
            node.id,
            op=node.op,
            stage=node.stage,
            label=node.label,
            params=node.params,
            type=str(node.type),
            phase=node.phase,
            needs=sorted(node.needs),
            binding=node.binding,
            kind=node.kind,
            line=node.span.line,
            file=node.span.file,
            order=node.order,
        )
    for node in prog.nodes.values():
        for arg, src in node.inputs:
            g.add_edge(src, node.id, arg=arg)
    return g
