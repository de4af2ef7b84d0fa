#!/usr/bin/env python3
"""The import graph of a Rust crate's modules, and its cycles.

Usage: .ci/import-cycles.py [SRC_DIR] [--max N] [--verbose] [--with-tests]

A node is a source file (a module with its inline submodules, tests included). An edge
A -> B means A names something in B: a `use` of, or a path through, `crate::...`,
`super::...` or `self::...` that lands in B (the longest prefix of the path that is a
module file). Declaring a child (`mod x;`) is not a use. Unit tests (`#[cfg(test)]` modules,
files and uses) are left out unless `--with-tests`: a test may open a whole `Image` to check
a driver without the driver depending on it. The strongly connected components
(Tarjan) are the cycles; the script prints the largest ones and exits 1 when one has more
than N files (default: no limit, just report).
"""

import os
import re
import signal
import sys


def strip(text):
    """Source text with comments, string and char literals blanked (lengths kept)."""
    out = []
    i, n = 0, len(text)
    while i < n:
        c = text[i]
        if text.startswith("//", i):
            j = text.find("\n", i)
            j = n if j < 0 else j
            out.append(" " * (j - i))
            i = j
        elif text.startswith("/*", i):
            depth, j = 1, i + 2
            while j < n and depth:
                if text.startswith("/*", j):
                    depth, j = depth + 1, j + 2
                elif text.startswith("*/", j):
                    depth, j = depth - 1, j + 2
                else:
                    j += 1
            out.append(re.sub(r"[^\n]", " ", text[i:j]))
            i = j
        elif c == "r" and re.match(r'r#*"', text[i:i + 64]) and (i == 0 or not (text[i - 1].isalnum() or text[i - 1] == "_")):
            m = re.match(r'r(#*)"', text[i:])
            end = text.find('"' + m.group(1), i + len(m.group(0)))
            j = n if end < 0 else end + 1 + len(m.group(1))
            out.append(re.sub(r"[^\n]", " ", text[i:j]))
            i = j
        elif c == '"':
            j = i + 1
            while j < n and text[j] != '"':
                j += 2 if text[j] == "\\" else 1
            j += 1
            out.append(re.sub(r"[^\n]", " ", text[i:j]))
            i = j
        elif c == "'":
            m = re.match(r"'(\\.[^']*|[^'\\])'", text[i:])
            if m:
                out.append(" " * len(m.group(0)))
                i += len(m.group(0))
            else:  # a lifetime
                out.append(c)
                i += 1
        else:
            out.append(c)
            i += 1
    return "".join(out)


def modules(src):
    """{module path tuple: file} for every file under src."""
    mods = {}
    for root, _, files in os.walk(src):
        for f in files:
            if not f.endswith(".rs"):
                continue
            rel = os.path.relpath(os.path.join(root, f), src)
            parts = rel[:-3].split(os.sep)
            if parts[-1] in ("mod", "lib", "main"):
                parts = parts[:-1]
            mods[tuple(parts)] = rel
    return mods


def expand_use(tree):
    """`a::{b, c::{d, e}}` -> ['a::b', 'a::c::d', 'a::c::e']."""
    tree = re.sub(r"\s+", "", re.sub(r"\s+as\s+\w+", "", tree))
    depth = 0
    for i, ch in enumerate(tree):
        if ch == "{":
            if depth == 0:
                prefix, inner = tree[:i], tree[i + 1:tree.rindex("}")]
                parts, d, start = [], 0, 0
                for k, c2 in enumerate(inner):
                    if c2 == "{":
                        d += 1
                    elif c2 == "}":
                        d -= 1
                    elif c2 == "," and d == 0:
                        parts.append(inner[start:k])
                        start = k + 1
                parts.append(inner[start:])
                res = []
                for p in parts:
                    if p:
                        res.extend(prefix + e for e in expand_use(p))
                return res
            depth += 1
    return [tree]


PATH = re.compile(r"(?<![\w:])((?:crate|super|self)(?:::(?:super|r#\w+|\w+))+)")


def refs(text, children):
    """(offset, path) for every crate/super/self path, or a path through a child module
    (`raw::Driver`, which is `self::raw::Driver`), `use` trees expanded."""
    found = []
    rel = re.compile(r"(crate|super|self)\b" + "".join(f"|{c}::" for c in children))
    for m in re.finditer(r"\buse\s+([^;]*);", text):
        for p in expand_use(m.group(1)):
            if rel.match(p):
                found.append((m.start(), p if re.match(r"(crate|super|self)\b", p) else "self::" + p))
    uses = [(m.start(), m.end()) for m in re.finditer(r"\buse\s+[^;]*;", text)]
    pats = [(PATH, "")]
    if children:
        pats.append((re.compile(r"(?<![\w:])((?:" + "|".join(children) + r")(?:::\w+)+)"), "self::"))
    for pat, pre in pats:
        for m in pat.finditer(text):
            if any(a <= m.start() < b for a, b in uses):
                continue
            found.append((m.start(), pre + m.group(1)))
    return found


def inline_modules(text):
    """[(start, end, name)] of `mod name { ... }` blocks."""
    blocks = []
    for m in re.finditer(r"\bmod\s+(\w+)\s*\{", text):
        depth, j = 1, m.end()
        while j < len(text) and depth:
            if text[j] == "{":
                depth += 1
            elif text[j] == "}":
                depth -= 1
            j += 1
        blocks.append((m.start(), j, m.group(1)))
    return blocks


def absolute(mpath, text, blocks, off, p):
    """The path `p` (found at `off` in module `mpath`) from the crate root."""
    here = list(mpath) + [name for a, b, name in blocks if a <= off < b]
    segs = [s for s in p.split("::") if s]
    if segs[0] == "crate":
        cur, segs = [], segs[1:]
    else:
        cur = list(here)
        while segs and segs[0] in ("self", "super"):
            if segs.pop(0) == "super":
                cur = cur[:-1]
    return tuple(cur + [s.removeprefix("r#") for s in segs if s not in ("*", "self")])


TEST_ITEM = re.compile(r"#\[cfg\(test\)\]\s*(?:#\[[^\]]*\]\s*)*(?:pub(?:\([^)]*\))?\s+)?(mod\s+(\w+)\s*([;{])|use\s[^;]*;)")


def drop_tests(text):
    """`text` without its `#[cfg(test)]` modules and uses, and the names of test-only child
    files (`#[cfg(test)] mod tests;`)."""
    files, out = [], text
    for m in TEST_ITEM.finditer(text):
        end = m.end()
        if m.group(3) == ";":
            files.append(m.group(2))
        elif m.group(3) == "{":
            depth = 1
            while end < len(text) and depth:
                depth += {"{": 1, "}": -1}.get(text[end], 0)
                end += 1
        out = out[: m.start()] + re.sub(r"[^\n]", " ", out[m.start():end]) + out[end:]
    return out, files


def graph(src, with_tests=False):
    """{file: files it uses}. A path through a re-export (`crate::Result`, which lib.rs
    re-exports from error.rs) counts as a use of the module that defines the item."""
    mods = modules(src)
    paths, reexports, test_files = {}, {}, set()
    for mpath, f in mods.items():
        text = strip(open(os.path.join(src, f), encoding="utf-8").read())
        if not with_tests:
            text, tests = drop_tests(text)
            test_files.update(mpath + (t,) for t in tests)
        blocks = inline_modules(text)
        children = sorted(k[-1] for k in mods if len(k) == len(mpath) + 1 and k[:-1] == mpath)
        paths[f] = [absolute(mpath, text, blocks, off, p) for off, p in refs(text, children)]
        for m in re.finditer(r"\bpub(?:\([^)]*\))?\s+use\s+([^;]*);", text):
            for p in expand_use(m.group(1)):
                if re.match(r"(crate|super|self)\b", p) or p.split("::")[0] in children:
                    p = p if re.match(r"(crate|super|self)\b", p) else "self::" + p
                    full = absolute(mpath, text, blocks, m.start(), p)
                    reexports[(mpath, full[-1])] = full
        # A `#[macro_export]` macro lives at the crate root but belongs to its file.
        for m in re.finditer(r"#\[macro_export\][^\n]*\n(?:\s*#\[[^\n]*\n)*\s*macro_rules!\s*(\w+)", text):
            reexports[((), m.group(1))] = mpath + (m.group(1),)

    def resolve(full, depth=0):
        for k in range(len(full), -1, -1):
            t = tuple(full[:k])
            if t in mods:
                if k < len(full) and (t, full[k]) in reexports and depth < 8:
                    target = reexports[(t, full[k])]
                    if target != full[: k + 1]:
                        return resolve(target + tuple(full[k + 1:]), depth + 1)
                return mods[t]
        return None

    for t in test_files:
        for k in [k for k in mods if k[: len(t)] == t]:
            paths.pop(mods.pop(k), None)
    edges = {f: set() for f in mods.values()}
    for f, ps in paths.items():
        for full in ps:
            g = resolve(full)
            if g is not None and g != f:
                edges[f].add(g)
                if os.environ.get("WHY") == f"{f}>{g}":
                    print("  via", "::".join(full))
    return edges


def sccs(edges):
    index, low, stack, on, out = {}, {}, [], set(), []
    counter = [0]
    sys.setrecursionlimit(10000)

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in sorted(edges[v]):
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

    for v in sorted(edges):
        if v not in index:
            visit(v)
    return sorted(out, key=len, reverse=True)


def main():
    signal.signal(signal.SIGPIPE, signal.SIG_DFL)
    args = sys.argv[1:]
    limit = None
    verbose = "--verbose" in args
    if "--max" in args:
        limit = int(args[args.index("--max") + 1])
        del args[args.index("--max"):args.index("--max") + 2]
    with_tests = "--with-tests" in args
    args = [a for a in args if a not in ("--verbose", "--with-tests")]
    src = args[0] if args else os.path.join(os.path.dirname(__file__), "..", "crates", "vimg", "src")
    edges = graph(src, with_tests)
    comps = [c for c in sccs(edges) if len(c) > 1]
    print(f"{len(edges)} files, {sum(len(e) for e in edges.values())} edges; "
          f"largest cycle: {len(comps[0]) if comps else 1} files")
    for c in comps[: None if verbose else 5]:
        print(f"  {len(c)}: {' '.join(c)}")
        if verbose:
            for v in c:
                print(f"      {v} -> {' '.join(sorted(w for w in edges[v] if w in c))}")
    if limit is not None and comps and len(comps[0]) > limit:
        sys.exit(1)


if __name__ == "__main__":
    main()
