"""Two readings of the package's code, from its source alone (ast; nothing is imported or run).

import_graph(): every perpneg3d module -> the perpneg3d modules it imports (at module level or inside a
function), and its cycles (strongly connected components).

config_walk(): the walk a reader makes following the config from `perpneg3d.training.run.train`: read a
function top to bottom; at a call (in the order the code is written) that passes the config or a part of it
(cfg, cfg.resume, str(cfg.refine)) to a function of the package not read yet, go read that function with
those parameters bound, then come back. Inside, a name is bound when it is such a parameter, or is assigned
(alone, or pairwise: a, b = x, y) a bound name, an attribute of one (plan.cfg) or the result of a call given
one (cfg = refine_config(cfg, ...)); objects built from
the config (cameras, a run folder) are not followed further. A function is read once (later calls to it are
known); a leaf outside training/ (a function that follows the config no further: require, validate_prompt,
apply_threads) is a glance, not a stay. The walk is the sequence of modules read; a stay is a
run of one module in it; a climb back is a stay entered by returning from a call (the reader goes back up to
finish a caller in another module) when the caller still has code to read. Run this file to print both.
"""
from __future__ import annotations

import ast
from dataclasses import dataclass, field
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "perpneg3d"
TRAINING = "perpneg3d.training."


def module_name(path: Path) -> str:
    rel = path.relative_to(PACKAGE.parent).with_suffix("")
    parts = list(rel.parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def modules() -> dict[str, ast.Module]:
    return {module_name(p): ast.parse(p.read_text(), str(p)) for p in sorted(PACKAGE.rglob("*.py"))}


def _resolve(name: str, known: set[str]) -> str | None:
    """The package module an imported dotted name belongs to (a module itself or a name in one)."""
    while name:
        if name in known:
            return name
        name = name.rpartition(".")[0]
    return None


def import_graph() -> dict[str, set[str]]:
    mods = modules()
    known = set(mods)
    graph: dict[str, set[str]] = {m: set() for m in mods}
    for mod, tree in mods.items():
        for node in ast.walk(tree):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                names = [f"{node.module}.{a.name}" for a in node.names]
            for n in names:
                target = _resolve(n, known)
                if target and target != mod and target.startswith("perpneg3d"):
                    graph[mod].add(target)
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    out: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in sorted(graph.get(v, ())):
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
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


@dataclass
class Walk:
    events: list[tuple[str, str, bool]] = field(default_factory=list)  # (module, function, entered by a return)

    @property
    def stays(self) -> list[tuple[str, bool]]:
        out: list[tuple[str, bool]] = []
        for mod, _, back in self.events:
            if not out or out[-1][0] != mod:
                out.append((mod, back))
        return out

    def figures(self) -> dict:
        stays = self.stays
        rooms = {m for m, _ in stays}
        entries: dict[str, int] = {}
        for m, _ in stays:
            entries[m] = entries.get(m, 0) + 1
        return dict(stays=len(stays), rooms=len(rooms), climbs=sum(b for _, b in stays),
                    returns=len(stays) - len(rooms), entries=entries)


class _Reader:
    def __init__(self):
        self.mods = modules()
        self.known = set(self.mods)
        self.functions = {(m, n.name): n for m, tree in self.mods.items() for n in tree.body
                          if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))}
        self.read: set[tuple[str, str]] = set()
        self.walk = Walk()

    def names(self, mod: str, fn: ast.AST) -> dict[str, tuple[str, str | None]]:
        """Local name -> (package module, function name or None for a module), from the module's imports and
        the function's own."""
        out: dict[str, tuple[str, str | None]] = {}
        for scope in (self.mods[mod], fn):
            nodes = scope.body if scope is self.mods[mod] else list(ast.walk(scope))
            for node in nodes:
                if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                    for a in node.names:
                        full = f"{node.module}.{a.name}"
                        if full in self.known:
                            out[a.asname or a.name] = (full, None)
                        elif node.module in self.known:
                            out[a.asname or a.name] = (node.module, a.name)
                elif isinstance(node, ast.Import):
                    for a in node.names:
                        if a.name in self.known and a.asname:
                            out[a.asname] = (a.name, None)
        for (m, n) in self.functions:
            if m == mod:
                out.setdefault(n, (mod, n))
        return out

    def callee(self, call: ast.Call, names) -> tuple[str, str] | None:
        f = call.func
        target = None
        if isinstance(f, ast.Name) and f.id in names:
            target = names[f.id]
        elif isinstance(f, ast.Attribute) and isinstance(f.value, ast.Name) and f.value.id in names:
            mod, fn = names[f.value.id]
            if fn is None:
                target = (mod, f.attr)
        if target is None or target[1] is None:
            return None
        mod, fn = target
        while (mod, fn) not in self.functions:  # a name re-exported by another module: follow its import
            nxt = self.names(mod, self.mods[mod]).get(fn)
            if nxt is None or nxt == (mod, fn) or nxt[1] is None:
                return None
            mod, fn = nxt
        return mod, fn

    @staticmethod
    def mentions(node: ast.AST, tainted: set[str]) -> bool:
        """Whether the expression uses a name bound to the config (the config or a part of it)."""
        return any(isinstance(n, ast.Name) and n.id in tainted for n in ast.walk(node))

    @staticmethod
    def uses(node: ast.AST, tainted: set[str]) -> bool:
        """Whether the expression is a name bound to the config (or an attribute of one: plan.cfg), or a call
        given one."""
        while isinstance(node, ast.Attribute):
            node = node.value
        if isinstance(node, ast.Name):
            return node.id in tainted
        if isinstance(node, ast.Call):
            return any(isinstance(a, ast.Name) and a.id in tainted for a in [*node.args, *(k.value for k in node.keywords)])
        return False

    def tainted_names(self, fn: ast.FunctionDef, params: set[str]) -> set[str]:
        tainted = set(params)
        while True:
            before = len(tainted)
            for node in ast.walk(fn):
                value, targets = None, []
                if isinstance(node, ast.Assign):
                    value, targets = node.value, node.targets
                elif isinstance(node, (ast.AnnAssign, ast.AugAssign)) and node.value is not None:
                    value, targets = node.value, [node.target]
                elif isinstance(node, ast.NamedExpr):
                    value, targets = node.value, [node.target]
                elif isinstance(node, (ast.For, ast.comprehension)):
                    value, targets = node.iter, [node.target]
                elif isinstance(node, ast.withitem) and node.optional_vars is not None:
                    value, targets = node.context_expr, [node.optional_vars]
                for t in targets:
                    pairs = [(t, value)]
                    if isinstance(t, ast.Tuple) and isinstance(value, ast.Tuple) and len(t.elts) == len(value.elts):
                        pairs = list(zip(t.elts, value.elts))  # a, b = x, y: each name from its own value
                    tainted |= {n.id for n, v in pairs if isinstance(n, ast.Name) and v is not None
                                and self.uses(v, tainted)}
            if len(tainted) == before:
                return tainted

    def visit(self, mod: str, name: str, params: set[str]) -> None:
        self.read.add((mod, name))
        fn = self.functions[(mod, name)]
        self.walk.events.append((mod, name, False))
        names = self.names(mod, fn)
        tainted = self.tainted_names(fn, params)
        calls = sorted((n for n in ast.walk(fn) if isinstance(n, ast.Call)), key=lambda n: (n.lineno, n.col_offset))
        follow = []
        for call in calls:
            target = self.callee(call, names)
            if target is None or target in follow:
                continue
            args = list(call.args) + [k.value for k in call.keywords]
            if any(self.mentions(a, tainted) for a in args):
                follow.append((target, call))
        for i, (target, call) in enumerate(follow):
            if target in self.read:
                continue
            callee = self.functions[target]
            params_of = [a.arg for a in callee.args.posonlyargs + callee.args.args]
            passed = {p for p, a in zip(params_of, call.args) if self.mentions(a, tainted)}
            passed |= {k.arg for k in call.keywords if k.arg and self.mentions(k.value, tainted)}
            mark = len(self.walk.events)
            self.visit(*target, passed)
            if len(self.walk.events) == mark + 1 and not target[0].startswith(TRAINING):
                del self.walk.events[mark]  # a glance: a leaf helper outside training/ (require, validate_prompt)
                continue
            rest = any(t not in self.read for t, _ in follow[i + 1:]) or call.lineno < fn.end_lineno
            if rest and self.walk.events[-1][0] != mod:
                self.walk.events.append((mod, name, True))


def config_walk(module: str = "perpneg3d.training.run", function: str = "train", param: str = "cfg") -> Walk:
    reader = _Reader()
    reader.visit(module, function, {param})
    return reader.walk


if __name__ == "__main__":
    graph = import_graph()
    print("import cycles:", cycles(graph) or "none")
    lower = sorted(m for m, deps in graph.items() if not m.startswith("perpneg3d.training")
                   and any(d.startswith("perpneg3d.training") for d in deps))
    print("lower modules importing training/:", lower or "none")
    walk = config_walk()
    print("walk of cfg from train:", " -> ".join(f"{'^' if back else ''}{m.removeprefix('perpneg3d.')}"
                                                  for m, back in walk.stays))
    print(walk.figures())
