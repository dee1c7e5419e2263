#!/usr/bin/env python3
"""The crate's module graph, from every `crate::<module>` path in src/ (use lines and
inline paths; `#[cfg(test)]` modules and tests.rs files skipped), and its cycles.

Top-level modules are the nodes; src/jobs/<kind>/ counts as `jobs`. Exits 1 if the
graph has a cycle, printing each strongly connected component and the edges in it
with one file that makes each edge. `--dot` prints the graph in Graphviz syntax.
"""
import os
import re
import sys

SRC = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "src")
PATH = re.compile(r"\bcrate::(\w+)")


def module_of(rel):
    parts = rel[:-3].split(os.sep)
    if parts[0] in ("lib", "main"):
        return None
    return parts[0]


def strip_tests(text):
    # Drop `#[cfg(test)] mod x { ... }` blocks (brace-matched) and comments.
    out, i = [], 0
    for m in re.finditer(r"#\[cfg\(test\)\]\s*mod\s+\w+\s*\{", text):
        if m.start() < i:
            continue
        out.append(text[i:m.start()])
        depth, j = 1, m.end()
        while j < len(text) and depth:
            depth += {"{": 1, "}": -1}.get(text[j], 0)
            j += 1
        i = j
    out.append(text[i:])
    return re.sub(r"//[^\n]*", "", "".join(out))


def graph():
    edges = {}
    for root, _, files in os.walk(SRC):
        for f in files:
            if not f.endswith(".rs") or f == "tests.rs":
                continue
            path = os.path.join(root, f)
            rel = os.path.relpath(path, SRC)
            src = module_of(rel)
            if src is None:
                continue
            text = strip_tests(open(path, encoding="utf-8").read())
            for dst in PATH.findall(text):
                is_module = os.path.exists(os.path.join(SRC, dst + ".rs")) or os.path.isdir(
                    os.path.join(SRC, dst)
                )
                if dst != src and is_module:
                    edges.setdefault((src, dst), rel)
    return edges


def sccs(nodes, adj):
    index, low, stack, on, out, n = {}, {}, [], set(), [], [0]

    def visit(v):
        index[v] = low[v] = n[0]
        n[0] += 1
        stack.append(v)
        on.add(v)
        for w in adj.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            out.append(sorted(comp))

    for v in sorted(nodes):
        if v not in index:
            visit(v)
    return out


def main():
    edges = graph()
    adj, nodes = {}, set()
    for a, b in edges:
        adj.setdefault(a, set()).add(b)
        nodes |= {a, b}
    if "--dot" in sys.argv:
        print("digraph modules {")
        for a, b in sorted(edges):
            print(f'  "{a}" -> "{b}";')
        print("}")
        return 0
    for a in sorted(adj):
        print(f"{a:10} -> {', '.join(sorted(adj[a]))}")
    cycles = [c for c in sccs(nodes, adj) if len(c) > 1]
    if not cycles:
        print("no import cycles")
        return 0
    for comp in cycles:
        print("CYCLE among: " + ", ".join(comp))
        for (a, b), rel in sorted(edges.items()):
            if a in comp and b in comp:
                print(f"  {a} -> {b}   ({rel})")
    return 1


if __name__ == "__main__":
    sys.exit(main())
