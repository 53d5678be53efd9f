#!/usr/bin/env python3
"""Reports import cycles between the modules of src/.

    scripts/module-cycles.py [--graph] [SRC_DIR]   # default: src/ beside this script's folder
                                                   # --graph: print every edge too

Two graphs are checked:
  - top-level modules (a file `src/x.rs` or a folder `src/x/`): x -> y when code anywhere
    under x names `crate::y`;
  - within each folder, its submodules (`src/x/a.rs`, `src/x/b/`, and the folder's own
    `mod.rs`): a -> b when a names `crate::x::b` or `super::b`, a -> mod.rs when it names an
    item of `crate::x` itself.

Paths are read from `use crate::{...}` trees and from inline `crate::a::b` / `super::b`
paths (`super` inside an inline `mod tests { ... }` is the file's own module); comments and
string literals are skipped. Only these paths count: a method called on a type from another
file is seen where that type is named, and a `mod.rs` naming its children relatively
(`admin::get_user` in `http/mod.rs`, wiring them into a router) is not read. Neither is a
`mod.rs`'s `pub use` (the folder's facade re-exporting its children), nor a visibility
(`pub(in crate::x)`). Test code counts like any other.

Exits 1 when there is a cycle, printing each strongly connected group and one cycle in it.
"""

import re
import sys
from pathlib import Path

IDENT = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


def strip_comments_and_strings(text):
    """The source with comments and string/char literals blanked (newlines kept)."""
    out = []
    i, n = 0, len(text)
    while i < n:
        c = text[i]
        if text.startswith("//", i):
            j = text.find("\n", i)
            i = n if j < 0 else j
        elif text.startswith("/*", i):
            depth, i = 1, i + 2
            while i < n and depth:
                if text.startswith("/*", i):
                    depth, i = depth + 1, i + 2
                elif text.startswith("*/", i):
                    depth, i = depth - 1, i + 2
                else:
                    out.append("\n" if text[i] == "\n" else "")
                    i += 1
        elif c == "r" and re.match(r'r#*"', text[i:i + 10]) and not (
            i and (text[i - 1].isalnum() or text[i - 1] == "_")
        ):
            hashes = re.match(r"r(#*)\"", text[i:]).group(1)
            end = text.find('"' + hashes, i + 2 + len(hashes))
            end = n if end < 0 else end + 1 + len(hashes)
            out.append('""' + "\n" * text.count("\n", i, end))
            i = end
        elif c == '"':
            j = i + 1
            while j < n and text[j] != '"':
                j += 2 if text[j] == "\\" else 1
            out.append('""' + "\n" * text.count("\n", i, j))
            i = j + 1
        elif c == "'" and re.match(r"'(\\.[^']*|[^\\'])'", text[i:i + 12]):
            # A char literal ('a', '\n', '\u{..}'); a lifetime ('a) has no closing quote.
            m = re.match(r"'(\\.[^']*|[^\\'])'", text[i:])
            out.append("' '")
            i += m.end()
        else:
            out.append(c)
            i += 1
    return "".join(out)


def parse_tree(text, i):
    """Parses a use tree at text[i:] (after `crate::`); returns (paths, end)."""

    def skip_ws(k):
        while k < len(text) and text[k].isspace():
            k += 1
        return k

    i = skip_ws(i)
    if i < len(text) and text[i] == "{":
        paths, i = [], i + 1
        while True:
            i = skip_ws(i)
            if i >= len(text) or text[i] == "}":
                return paths, i + 1
            sub, i = parse_tree(text, i)
            paths.extend(sub)
            i = skip_ws(i)
            if i < len(text) and text[i] == ",":
                i += 1
    if i < len(text) and text[i] == "*":
        return [[]], i + 1
    m = IDENT.match(text, i)
    if not m:
        return [[]], i
    head, i = m.group(0), m.end()
    j = skip_ws(i)
    if text.startswith("::", j):
        rest, i = parse_tree(text, j + 2)
        return [[head] + r for r in rest], i
    return [[head]], i


def module_of(path, src):
    """`src/a/b.rs` -> ['a', 'b']; `src/a/mod.rs` -> ['a']; `src/lib.rs` -> []."""
    parts = list(path.relative_to(src).with_suffix("").parts)
    if parts[-1] == "mod" or (len(parts) == 1 and parts[0] in ("lib", "main")):
        parts = parts[:-1]
    return parts


def inline_module_spans(text):
    """The (start, end) offsets of every inline `mod name { ... }` body."""
    spans = []
    for m in re.finditer(r"\bmod\s+[A-Za-z_][A-Za-z0-9_]*\s*\{", text):
        depth, i = 1, m.end()
        while i < len(text) and depth:
            depth += {"{": 1, "}": -1}.get(text[i], 0)
            i += 1
        spans.append((m.end(), i))
    return spans


def references(path, src):
    """The `crate::` paths a file names, as lists of segments from the crate root."""
    text = strip_comments_and_strings(path.read_text())
    module = module_of(path, src)
    is_mod_rs = path.name == "mod.rs"
    inline = inline_module_spans(text)
    found = []
    for m in re.finditer(r"(?<![A-Za-z0-9_$:])(crate|super)\s*::", text):
        line_start = text.rfind("\n", 0, m.start()) + 1
        line = text[line_start:m.start()]
        if is_mod_rs and re.search(r"\bpub(\([^)]*\))?\s+use\b", line):
            continue  # the facade's re-export
        if re.search(r"\bpub\s*\(\s*in\s+$", line):
            continue  # a visibility, `pub(in crate::a)`, names no item
        paths, _ = parse_tree(text, m.end())
        if m.group(1) == "crate":
            base = []
        elif any(start <= m.start() < end for start, end in inline):
            # In an inline module (`mod tests { use super::*; }`): the file's own module.
            base = list(module)
        else:
            # In `a/b.rs`, `super` is `a`; in `a/mod.rs`, the parent of `a`.
            base = list(module[:-1])
        for p in paths:
            b = list(base)
            while p[:1] == ["super"]:  # super::super::
                b, p = b[:-1], p[1:]
            full = b + p
            if full and full != list(module):  # `use super::*` in a test module: the file
                found.append(full)
    return module, found


def tarjan(nodes, edges):
    index, low, stack, on, groups, counter = {}, {}, [], set(), [], [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in sorted(edges.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            group = []
            while True:
                w = stack.pop()
                on.discard(w)
                group.append(w)
                if w == v:
                    break
            if len(group) > 1:
                groups.append(sorted(group))

    sys.setrecursionlimit(10000)
    for v in sorted(nodes):
        if v not in index:
            visit(v)
    return groups


def one_cycle(group, edges):
    """A shortest cycle through the group's first node, as a list of nodes."""
    start = group[0]
    members = set(group)
    frontier, seen = [[start]], {start}
    while frontier:
        nxt = []
        for path in frontier:
            for w in sorted(edges.get(path[-1], ())):
                if w == start:
                    return path + [start]
                if w in members and w not in seen:
                    seen.add(w)
                    nxt.append(path + [w])
        frontier = nxt
    return group


def report_group(group, edges):
    """Every edge inside a group whose members all reach each other: the ones to cut."""
    members = set(group)
    if len(group) > 2:
        print(f"    all of {', '.join(group)} reach each other; the edges among them:")
        for a in group:
            inside = sorted(members & edges.get(a, set()))
            print(f"      {a} -> {', '.join(inside)}")


def main():
    args = sys.argv[1:]
    graph = "--graph" in args
    args = [a for a in args if a != "--graph"]
    src = Path(args[0]) if args else Path(__file__).resolve().parent.parent / "src"
    files = sorted(src.rglob("*.rs"))
    if not files:
        print(f"no Rust files under {src}", file=sys.stderr)
        return 2
    modules = {tuple(module_of(f, src)) for f in files}
    # What names a module: every folder and file module, by its path.
    known = modules | {m[:k] for m in modules for k in range(1, len(m))}

    def resolve(path):
        """The longest known module a `crate::` path lands in."""
        for k in range(len(path), 0, -1):
            if tuple(path[:k]) in known:
                return tuple(path[:k])
        return ()

    top_edges, sub_edges, why = {}, {}, {}
    for f in files:
        module, paths = references(f, src)
        if not module:
            continue  # lib.rs / main.rs declare the modules
        for p in paths:
            target = resolve(p)
            if not target:
                continue
            if target[0] != module[0]:
                top_edges.setdefault(module[0], set()).add(target[0])
                why.setdefault((module[0], target[0]), f"{f.relative_to(src.parent)}: crate::{'::'.join(p)}")
            # Within the folder where the two paths part: which child of it each one is (the
            # folder's own items are its `mod.rs`).
            common = 0
            while common < min(len(module), len(target)) and module[common] == target[common]:
                common += 1
            if common == 0:
                continue
            folder = tuple(module[:common])
            a = module[common] if len(module) > common else "mod.rs"
            b = target[common] if len(target) > common else "mod.rs"
            if a != b:
                sub_edges.setdefault(folder, {}).setdefault(a, set()).add(b)
                why.setdefault((folder, a, b), f"{f.relative_to(src.parent)}: crate::{'::'.join(p)}")

    if graph:
        for a in sorted(top_edges):
            print(f"{a} -> {', '.join(sorted(top_edges[a]))}")
        for folder in sorted(sub_edges):
            for a in sorted(sub_edges[folder]):
                targets = ", ".join(sorted(sub_edges[folder][a]))
                print(f"{'::'.join(folder)}/{a} -> {targets}")
    failed = False
    top_nodes = {m[0] for m in modules if m}
    groups = tarjan(top_nodes, top_edges)
    if groups:
        failed = True
        for g in groups:
            cycle = one_cycle(g, top_edges)
            print(f"cycle between top-level modules: {' -> '.join(cycle)}")
            for a, b in zip(cycle, cycle[1:]):
                print(f"    {a} -> {b}  ({why[(a, b)]})")
            report_group(g, top_edges)
    for folder in sorted(sub_edges):
        edges = sub_edges[folder]
        nodes = set(edges) | {w for ws in edges.values() for w in ws}
        for g in tarjan(nodes, edges):
            failed = True
            cycle = one_cycle(g, edges)
            name = "::".join(folder)
            print(f"cycle in {name}/: {' -> '.join(cycle)}")
            for a, b in zip(cycle, cycle[1:]):
                print(f"    {a} -> {b}  ({why[(folder, a, b)]})")
            report_group(g, edges)
    folders = sorted({m[:k] for m in modules for k in range(1, len(m))})
    print(
        f"{len(top_nodes)} top-level modules, {len(folders)} folders, {len(files)} files: "
        + ("cycles found" if failed else "no cycles")
    )
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
