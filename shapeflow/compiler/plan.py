"""Plan: the graph's nodes in execution order, split into phases.

    setup    once per run (model, data)
    rollout  once per step: the rollout and every node computed from it alone
    update   per minibatch: nodes that need the current policy's forward pass, and
             everything downstream of them (the objective)
"""

from __future__ import annotations

from dataclasses import dataclass

import networkx as nx

PHASES = ("setup", "rollout", "update")


@dataclass(frozen=True)
class Plan:
    order: tuple[str, ...]  # all nodes, topologically sorted, ties in source order
    phases: dict[str, tuple[str, ...]]  # phase -> its nodes in execution order
    needs: tuple[str, ...]
    objective: str | None

    def to_data(self) -> dict:
        return {"phases": {p: list(n) for p, n in self.phases.items()}, "needs": list(self.needs),
                "objective": self.objective}


def plan(graph: nx.DiGraph) -> Plan:
    order = tuple(nx.lexicographical_topological_sort(graph, key=lambda n: graph.nodes[n]["order"]))
    phases = {p: tuple(n for n in order if graph.nodes[n]["phase"] == p) for p in PHASES}
    objective = next((n for n in order if graph.nodes[n]["kind"] == "objective"), None)
    return Plan(order, phases, tuple(graph.graph["needs"]), objective)
