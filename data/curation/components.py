"""Connected components of an edge list in a Beam pipeline, without collecting the graph.

Alternating large-star and small-star rounds (Kiveris, Lattanzi, Mirrokni, Rastogi, Vassilvitskii,
"Connected Components in MapReduce and Beyond", SoCC 2014), each one group-by over the edges:
  large-star  every node links its larger neighbours to the smallest node of its neighbourhood
  small-star  every node links its smaller-or-equal neighbours and itself to the smallest of them
Both preserve connectivity, and once every component is a star around its smallest node they
change nothing, so running more rounds than needed is harmless (each costs a shuffle of the
remaining edges, a few per duplicate). Beam graphs cannot loop until a condition holds, so the
rounds are unrolled; the final step checks that every component converged and reports the nodes
that did not, which the caller must treat as an error (raise `rounds`).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator

import apache_beam as beam


def _both_directions(edge: tuple[int, int]) -> Iterator[tuple[int, int]]:
    u, v = edge
    if u != v:
        yield u, v
        yield v, u


def _large_star(node_neighbours: tuple[int, Iterable[int]]) -> Iterator[tuple[int, int]]:
    node, neighbours = node_neighbours
    neighbours = set(neighbours)
    smallest = min(min(neighbours), node)
    for neighbour in neighbours:
        if neighbour > node:
            yield neighbour, smallest


def _small_star(node_neighbours: tuple[int, Iterable[int]]) -> Iterator[tuple[int, int]]:
    node, neighbours = node_neighbours
    smaller = {neighbour for neighbour in neighbours if neighbour < node}
    # Without smaller neighbours there is nothing to emit: its larger neighbours re-emit its edges.
    smallest = min(smaller, default=node)
    for member in smaller | {node}:
        if member != smallest:
            yield member, smallest


class _Labels(beam.DoFn):
    """(node, neighbours) of the converged star forest -> (node, its component's smallest node)
    for every non-root node; tagged 'unconverged': 1 per node that is not a leaf of a star."""

    def process(self, node_neighbours: tuple[int, Iterable[int]]) -> Iterator:
        node, neighbours = node_neighbours
        neighbours = set(neighbours)
        smallest = min(neighbours)
        if smallest < node:
            if len(neighbours) != 1:
                yield beam.pvalue.TaggedOutput("unconverged", 1)
            yield node, smallest


def _round(edges: beam.PCollection, name: str, step) -> beam.PCollection:
    return (
        edges
        | f"{name}: both directions" >> beam.FlatMap(_both_directions)
        | f"{name}: neighbours" >> beam.GroupByKey()
        | f"{name}: relink" >> beam.FlatMap(step)
    )


class ConnectedComponents(beam.PTransform):
    """Edges (u, v) of ints -> (labels, unconverged).

    labels: (node, smallest node of its component) for every node of an edge that is not the
      smallest of its component (nodes outside any edge are their own components).
    unconverged: a single int, the nodes left unconverged after `rounds` rounds (0 on success).
    """

    def __init__(self, rounds: int):
        super().__init__()
        self.rounds = rounds

    def expand(self, edges: beam.PCollection) -> tuple[beam.PCollection, beam.PCollection]:
        for index in range(self.rounds):
            edges = _round(edges, f"large-star {index}", _large_star)
            edges = _round(edges, f"small-star {index}", _small_star)
        labels = (
            edges
            | "final: both directions" >> beam.FlatMap(_both_directions)
            | "final: neighbours" >> beam.GroupByKey()
            | "final: labels" >> beam.ParDo(_Labels()).with_outputs("unconverged", main="labels")
        )
        unconverged = labels.unconverged | "unconverged nodes" >> beam.CombineGlobally(sum)
        return labels.labels, unconverged
