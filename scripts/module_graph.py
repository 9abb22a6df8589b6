#!/usr/bin/env python3
"""The agent's module graph, from its imports: each module of lb-userspace/src and the
crate modules it names as `crate::x` (a `super::x` names the module's parent or a
sibling inside the same top module, and is not counted). Reads the working
tree, or a git revision: `scripts/module_graph.py [REV]`. Tests (`tests.rs`, `tests/`
directories, `#[cfg(test)]` blocks) are left out. Prints one line per module:

    module (lines) -> imported modules

and then the rule checks: which modules import `cli`, and the import cycles."""

import re
import subprocess
import sys
from collections import defaultdict

ROOT = "lb-userspace/src"


def files(rev):
    if rev:
        out = subprocess.run(["git", "ls-tree", "-r", "--name-only", rev, ROOT],
                             check=True, capture_output=True, text=True).stdout.split()
        for path in out:
            if path.endswith(".rs"):
                text = subprocess.run(["git", "show", f"{rev}:{path}"], check=True,
                                      capture_output=True, text=True).stdout
                yield path, text
    else:
        out = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard", ROOT],
                             check=True, capture_output=True, text=True).stdout.split()
        for path in out:
            if path.endswith(".rs"):
                with open(path, encoding="utf-8") as f:
                    yield path, f.read()


def module_of(path):
    rel = path[len(ROOT) + 1:-3]
    parts = rel.split("/")
    if parts[-1] in ("mod", "lib", "main"):
        parts = parts[:-1]
    return "::".join(parts) or "crate"


def without_tests(text):
    # A `#[cfg(test)] mod tests { ... }` block: dropped to its end.
    m = re.search(r"#\[cfg\(test\)\]\s*mod \w+\s*\{", text)
    return text[:m.start()] if m else text


def top(module):
    return module.split("::")[0]


def main():
    rev = sys.argv[1] if len(sys.argv) > 1 else None
    lines = {}
    edges = defaultdict(set)
    for path, text in files(rev):
        if path.endswith("/tests.rs") or "/tests/" in path or path.endswith("main.rs"):
            continue
        mod = module_of(path)
        lines[mod] = text.count("\n")
        body = without_tests(text)
        # `use crate::{a, b::c}` and paths like `crate::a::f(...)`.
        for m in re.finditer(r"crate::\{([^;]*?)\};", body, re.S):
            for name in re.findall(r"(?:^|[,{\s])(\w+)(?=::|\s*[,}]|\s*$)", m.group(1)):
                edges[mod].add(name)
        for name in re.findall(r"crate::(\w+)", body):
            edges[mod].add(name)
    mods = sorted(lines)
    known = {top(m) for m in mods}
    for mod in mods:
        deps = sorted(d for d in edges[mod] if d in known and d != top(mod))
        print(f"{mod} ({lines[mod]}) -> {', '.join(deps) if deps else '-'}")
    print()
    cli = sorted(m for m in mods if "cli" in edges[m] and top(m) not in ("cli", "crate"))
    print("import cli:", ", ".join(cli) if cli else "none")
    # Cycles between top-level modules.
    graph = defaultdict(set)
    for mod in mods:
        for d in edges[mod]:
            if d in known and d != top(mod):
                graph[top(mod)].add(d)
    cycles = sorted({tuple(sorted((a, b))) for a, bs in list(graph.items()) for b in bs if a in graph.get(b, ())})
    print("two-way imports:", ", ".join(f"{a} <-> {b}" for a, b in cycles) if cycles else "none")


if __name__ == "__main__":
    main()
