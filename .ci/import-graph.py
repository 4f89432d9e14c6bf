#!/usr/bin/env python3
"""The crate:: imports of every module (file) of src/, outside comments and
tests; fails when they form a cycle or when anything but main.rs/lib.rs
imports `server` (start-up sits on top of everything else).

Usage: python3 .ci/import-graph.py [src] [--quiet]"""
import re, os, sys
args = [a for a in sys.argv[1:] if not a.startswith('--')]
root = args[0] if args else 'src'
quiet = '--quiet' in sys.argv
mods = {}
for d, _, files in os.walk(root):
    for f in files:
        if f.endswith('.rs'):
            rel = os.path.relpath(os.path.join(d, f), root)[:-3].split('/')
            if rel[-1] in ('mod', 'lib', 'main'): rel = rel[:-1]
            mods['::'.join(rel)] = os.path.join(d, f)
def resolve(path):
    parts = path.split('::')
    for n in range(len(parts), 0, -1):
        if '::'.join(parts[:n]) in mods: return '::'.join(parts[:n])
def expand(prefix, body):
    # use crate::a::{b, c::{d}} -> a::b, a::c::d (one level of nesting is enough here)
    out, depth, cur = [], 0, ''
    for ch in body + ',':
        if ch == '{': depth += 1
        if ch == '}': depth -= 1
        if ch == ',' and depth == 0:
            item = cur.strip(); cur = ''
            if not item: continue
            m = re.match(r'([a-z_:]+?)::\{(.*)\}$', item, re.S)
            out += expand(prefix + '::' + m.group(1), m.group(2)) if m else [prefix + '::' + item.split(' as ')[0]]
        else: cur += ch
    return out
edges = {}
for m, p in mods.items():
    text = open(p).read().split('#[cfg(test)]')[0]
    text = '\n'.join(l for l in text.split('\n') if not l.strip().startswith('//'))
    paths = []
    for body in re.findall(r'crate::\{(.*?)\};', text, re.S): paths += expand('', body)
    paths += re.findall(r'crate::([a-z_]+(?:::[a-z_]+)*)', text)
    paths += ['::'.join(x.strip(':').split('::')) for x in re.findall(r'crate::([a-z_:]+)::\{', text)]
    targets = {resolve(x.strip(':')) for x in paths} - {None, m, ''}
    edges[m] = targets
if not quiet:
    for m in sorted(edges): print(f"{m or '(lib)'}: {', '.join(sorted(edges[m])) or '-'}")
state, cycles = {}, []
def dfs(n, stack):
    state[n] = 1; stack.append(n)
    for t in sorted(edges.get(n, ())):
        if t.startswith(n + '::') or n == '': continue  # a module and its own children
        if state.get(t) == 1: cycles.append(stack[stack.index(t):] + [t])
        elif not state.get(t): dfs(t, stack)
    stack.pop(); state[n] = 2
for n in sorted(edges):
    if not state.get(n): dfs(n, [])
importers = sorted(m or '(lib)' for m, ts in edges.items() if 'server' in ts)
print("import cycles:", cycles or "none")
print("modules importing server:", importers or "none")
sys.exit(1 if cycles or importers else 0)
