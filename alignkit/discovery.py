"""What ``alignkit plugins`` lists, read from the plugins' sources instead of importing them.

Importing a plugin imports torch (and often Lightning and transformers): seconds. The listing needs only each entry
point's kind (algorithm, reward, task, other) and the hooks its class implements, and both can be read from the
source with :mod:`ast`: the class's bases are followed through the modules' imports (``from alignkit import
Algorithm`` → ``alignkit.plugin.Algorithm``; alignkit's lazy ``_EXPORTS`` table included) up to alignkit's base
classes, and a hook is a method named ``alignkit_*`` decorated with ``hookimpl`` (the first definition along the
method resolution order wins, as for the imported class).

Whatever the source cannot answer for certain sends that one entry point to the import (:func:`describe_loaded`):
a target that is not a plain ``module:Class``, a class built dynamically or decorated (``@dataclass`` aside), a
base that cannot be followed (a call, a star import, a class from a package without Python source), a class-level
``alignkit_*`` that is not a plain method, a hook under another decorator than ``hookimpl``, a module-level import
of a package that is not installed (the import then reports the plugin as ``broken``, as before), or a syntax
error. A plugin whose import fails for another reason (an exception raised while its module runs) is listed from its
source; ``alignkit plugins --check`` imports every plugin and lists such a one as ``broken``.
"""

from __future__ import annotations

import ast
import importlib.util
from collections.abc import Callable
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

#: kind → the class whose subclasses have it, checked in this order (``alignkit.manager.plugin_kind``).
KIND_BASES = (("algorithm", "alignkit.plugin.Algorithm"), ("reward", "alignkit.plugin.Reward"),
              ("task", "alignkit.task.Task"))
#: Bases known to add no ``alignkit_*`` hook and no alignkit base class: the class walk stops there.
OPAQUE_BASES = frozenset({"object", "builtins.object", "abc.ABC", "typing.Generic", "typing.Protocol",
                          "torch.nn.Module", "torch.nn.modules.module.Module"})
#: Decorator names that mark a hook implementation (``alignkit.plugin.hookimpl``, a pluggy HookimplMarker).
HOOKIMPL_NAMES = frozenset({"hookimpl"})


class Unanswered(Exception):
    """The source cannot tell for certain: import the plugin instead."""


@dataclass(frozen=True)
class PluginInfo:
    """One entry point of the ``alignkit`` group, as listed by ``alignkit plugins``."""

    name: str
    kind: str  # algorithm | reward | task | command | other | broken
    target: str  # "module:Class"
    distribution: str
    version: str
    hooks: tuple[str, ...]


def discover(load: bool = True) -> list[PluginInfo]:
    """Every entry point of the ``alignkit`` group, sorted by name. ``load``: import each one (one that fails to
    import is listed with kind ``broken`` and its error in place of the hooks); ``load=False``: read kind and hooks
    from the source (:func:`describe_source`), importing only the plugins whose source cannot answer."""
    from importlib.metadata import entry_points

    forget()  # sources read by an earlier call in this process may have changed since
    infos = []
    for ep in sorted(entry_points(group="alignkit"), key=lambda e: e.name):
        kind, hooks = describe_loaded(ep.load) if load else describe(ep.value, ep.load)
        dist = ep.dist
        infos.append(PluginInfo(name=ep.name, kind=kind, target=ep.value, distribution=dist.name if dist else "?",
                                version=dist.version if dist else "?", hooks=hooks))
    return infos


def discover_commands(group: str) -> list[PluginInfo]:
    """The commands plugins add to the CLI (entry points of ``group``), kind ``command``, listed without importing
    them (``alignkit <name> --help`` loads one)."""
    from importlib.metadata import entry_points

    infos = []
    for ep in sorted(entry_points(group=group), key=lambda e: e.name):
        dist = ep.dist
        infos.append(PluginInfo(name=ep.name, kind="command", target=ep.value, distribution=dist.name if dist else "?",
                                version=dist.version if dist else "?", hooks=()))
    return infos


def describe_loaded(load: Callable[[], Any]) -> tuple[str, tuple[str, ...]]:
    """Kind and hooks of the object ``load()`` imports; kind ``broken`` and the error when that fails."""
    try:
        obj = load()
        from alignkit.manager import implemented_hooks, plugin_kind

        return plugin_kind(obj), implemented_hooks(obj)
    except Exception as exc:  # one broken outside package must not hide the others: list it as broken
        return "broken", (f"{type(exc).__name__}: {exc}",)


def describe(target: str, load: Callable[[], Any]) -> tuple[str, tuple[str, ...]]:
    """Kind and hooks of ``target`` from its source, or by importing it when the source cannot answer."""
    try:
        return describe_source(target)
    except Unanswered:
        return describe_loaded(load)


def describe_source(target: str) -> tuple[str, tuple[str, ...]]:
    """Kind and hooks of the class ``"package.module:Class"`` read from the sources; :class:`Unanswered` when they
    cannot tell for certain (see the module docstring)."""
    module, _, name = target.partition(":")
    if not name.isidentifier() or not all(part.isidentifier() for part in module.split(".")):
        raise Unanswered(target)
    check_imports(module)
    mro = linearize(resolve(f"{module}.{name}"), ())
    classes = [parsed for parsed in (find_class(path) for path in mro) if parsed is not None]
    for defined_in, _ in classes:
        check_imports(defined_in)
    kind = next((kind for kind, base in KIND_BASES if base in mro), "other")
    seen: dict[str, bool] = {}
    for _, node in classes:  # the first definition along the MRO wins, as for getattr on the class
        for name, is_hook in class_hooks(node).items():
            seen.setdefault(name, is_hook)
    return kind, tuple(sorted(name for name, is_hook in seen.items() if is_hook))


# --------------------------------------------------------------------------------------------- reading modules


def forget() -> None:
    """Drop the parsed sources and the found packages (read again on next use)."""
    parse.cache_clear()
    symbols.cache_clear()
    installed.cache_clear()


@lru_cache(maxsize=None)
def parse(module: str) -> tuple[ast.Module, bool]:
    """The syntax tree of ``module`` and whether it is a package; :class:`Unanswered` without Python source."""
    from alignkit.help import module_source

    path = module_source(module)
    if path is None:
        raise Unanswered(module)
    try:
        return ast.parse(path.read_text(encoding="utf-8")), path.name == "__init__.py"
    except (OSError, UnicodeDecodeError, SyntaxError, ValueError) as exc:
        raise Unanswered(module) from exc


def absolute(module: str, is_package: bool, node: ast.ImportFrom) -> str:
    """The absolute module name of ``from <node.module> import ...`` written in ``module``."""
    if not node.level:
        return node.module or ""
    parts = module.split(".")
    base = parts if is_package else parts[:-1]
    base = base[: len(base) - (node.level - 1)]
    return ".".join([*base, *([node.module] if node.module else [])])


@lru_cache(maxsize=None)
def symbols(module: str) -> dict[str, str | ast.ClassDef | None]:
    """The names bound at the top level of ``module``: a class (its node), a dotted path (an import), or None
    (anything else: a function, an assignment, a name bound more than once)."""
    tree, is_package = parse(module)
    table: dict[str, str | ast.ClassDef | None] = {}

    def bind(name: str, value: str | ast.ClassDef | None) -> None:
        table[name] = None if name in table else value

    for node in tree.body:
        if isinstance(node, ast.ClassDef):
            bind(node.name, node)
        elif isinstance(node, ast.ImportFrom):
            source = absolute(module, is_package, node)
            for alias in node.names:
                if alias.name == "*":
                    raise Unanswered(f"{module}: from {source} import *")
                bind(alias.asname or alias.name, f"{source}.{alias.name}")
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.asname:
                    bind(alias.asname, alias.name)
                else:
                    top = alias.name.split(".")[0]
                    bind(top, top)
        elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            bind(node.name, None)
        elif isinstance(node, (ast.Assign, ast.AnnAssign, ast.AugAssign)):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            for target in targets:
                for leaf in ast.walk(target):
                    if isinstance(leaf, ast.Name):
                        bind(leaf.id, None)
                        if leaf.id == "_EXPORTS" and isinstance(node.value, ast.Dict):
                            exports(table, node.value)
    return table


def exports(table: dict[str, str | ast.ClassDef | None], mapping: ast.Dict) -> None:
    """alignkit's lazy namespace: ``_EXPORTS = {"Algorithm": "alignkit.plugin", ...}`` (public name → module)."""
    for key, value in zip(mapping.keys, mapping.values):
        if (isinstance(key, ast.Constant) and isinstance(key.value, str) and isinstance(value, ast.Constant)
                and isinstance(value.value, str)):
            table.setdefault(key.value, f"{value.value}.{key.value}")


def check_imports(module: str) -> None:
    """:class:`Unanswered` when ``module`` imports, at its top level, a package that is not installed (importing the
    plugin then fails: the import reports it as ``broken``)."""
    tree, is_package = parse(module)
    for node in tree.body:
        names = [alias.name for alias in node.names] if isinstance(node, ast.Import) else \
            [absolute(module, is_package, node)] if isinstance(node, ast.ImportFrom) else []
        for name in names:
            top = name.split(".")[0]
            if top and not installed(top):
                raise Unanswered(f"{module} imports {name}, which is not installed")


@lru_cache(maxsize=None)
def installed(top: str) -> bool:
    import sys

    if top in sys.builtin_module_names or top in sys.modules:
        return True
    try:
        return importlib.util.find_spec(top) is not None
    except (ImportError, ValueError):
        return False


# --------------------------------------------------------------------------------------------- following classes


def resolve(path: str, seen: tuple[str, ...] = ()) -> str:
    """The dotted path where the class named by ``path`` is defined (``alignkit.Algorithm`` →
    ``alignkit.plugin.Algorithm``), following imports; an opaque base is returned as it is."""
    if path in OPAQUE_BASES:
        return path
    if path in seen:
        raise Unanswered(f"import cycle at {path}")
    module, _, name = path.rpartition(".")
    if not module:
        raise Unanswered(path)
    try:
        table = symbols(module)
    except Unanswered:  # ``package.sub.Class`` written as an attribute chain: find the module part
        parent, _, attribute = module.rpartition(".")
        if not parent:
            raise
        return resolve(f"{resolve(f'{parent}.{attribute}', (*seen, path))}.{name}", (*seen, path))
    value = table.get(name, None) if name in table else submodule(module, name)
    if isinstance(value, ast.ClassDef):
        return path
    if isinstance(value, str):
        return resolve(value, (*seen, path))
    raise Unanswered(path)


def submodule(module: str, name: str) -> str | None:
    """``module.name`` when it is a submodule of the package ``module`` (``from pkg import sub``), else None."""
    from alignkit.help import module_source

    _, is_package = parse(module)
    return f"{module}.{name}" if is_package and module_source(f"{module}.{name}") else None


def find_class(path: str) -> tuple[str, ast.ClassDef] | None:
    """The module and node of the class defined at ``path``; None for an opaque base."""
    if path in OPAQUE_BASES:
        return None
    module, _, name = path.rpartition(".")
    node = symbols(module).get(name)
    if not isinstance(node, ast.ClassDef):
        raise Unanswered(path)
    return module, node


def base_paths(module: str, node: ast.ClassDef) -> list[str]:
    """The dotted paths of a class's bases, each followed to where it is defined."""
    decorators = [dotted(d.func if isinstance(d, ast.Call) else d) for d in node.decorator_list]
    if any(d not in ("dataclass", "dataclasses.dataclass") for d in decorators) or any(
            k.arg != "metaclass" or dotted(k.value) not in ("ABCMeta", "abc.ABCMeta") for k in node.keywords):
        raise Unanswered(f"{module}.{node.name}: a class decorator or keyword that may change it")
    table = symbols(module)
    paths = []
    for base in node.bases:
        if isinstance(base, ast.Subscript):  # Generic[T], a parametrised base
            base = base.value
        name = dotted(base)
        if name is None:
            raise Unanswered(f"{module}.{node.name}: a base that is not a name")
        head, _, rest = name.partition(".")
        value = table.get(head)
        if isinstance(value, ast.ClassDef) and not rest:
            path = f"{module}.{head}"
        elif isinstance(value, str):
            path = resolve(f"{value}.{rest}" if rest else value)
        elif head in ("object",) and not rest:
            path = "object"
        else:
            raise Unanswered(f"{module}.{node.name}: base {name}")
        paths.append(path)
    return paths


def linearize(path: str, seen: tuple[str, ...]) -> list[str]:
    """The method resolution order (C3) of the class at ``path``, as dotted paths; opaque bases end a branch."""
    if path in seen:
        raise Unanswered(f"inheritance cycle at {path}")
    found = find_class(path)
    if found is None:
        return [path]
    bases = base_paths(*found)
    sequences = [linearize(base, (*seen, path)) for base in bases] + [list(bases)]
    order = [path]
    while any(sequences):
        sequences = [s for s in sequences if s]
        head = next((s[0] for s in sequences if not any(s[0] in other[1:] for other in sequences)), None)
        if head is None:
            raise Unanswered(f"{path}: no consistent method resolution order")
        order.append(head)
        sequences = [s[1:] if s[0] == head else s for s in sequences]
    return order


def class_hooks(node: ast.ClassDef) -> dict[str, bool]:
    """The ``alignkit_*`` names a class body defines: name → whether it is a hook implementation."""
    found: dict[str, bool] = {}
    for item in node.body:
        if isinstance(item, (ast.FunctionDef, ast.AsyncFunctionDef)):
            if item.name.startswith("alignkit_"):
                found[item.name] = is_hookimpl(item)
        elif any(name.startswith("alignkit_") for name in bound_names(item)):
            raise Unanswered(f"{node.name}: an alignkit_* attribute that is not a plain method")
    return found


def bound_names(node: ast.AST) -> list[str]:
    """Every name a statement binds, anywhere inside it (assignments, nested definitions, imports)."""
    names: list[str] = []
    for leaf in ast.walk(node):
        if isinstance(leaf, ast.Name) and isinstance(leaf.ctx, ast.Store):
            names.append(leaf.id)
        elif isinstance(leaf, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            names.append(leaf.name)
        elif isinstance(leaf, ast.alias):
            names.append(leaf.asname or leaf.name)
    return names


def is_hookimpl(function: ast.FunctionDef | ast.AsyncFunctionDef) -> bool:
    """Whether the method is marked ``@hookimpl`` (or ``@hookimpl(...)``) as its only or outermost decorator;
    :class:`Unanswered` for any other decorator (which may set the marker, or wrap a marked function)."""
    if not function.decorator_list:
        return False
    outer = function.decorator_list[0]
    name = dotted(outer.func if isinstance(outer, ast.Call) else outer)
    if name is not None and name.rpartition(".")[2] in HOOKIMPL_NAMES:
        return True
    raise Unanswered(f"{function.name}: decorated by something other than hookimpl")


def dotted(node: ast.expr) -> str | None:
    """``a.b.c`` for a name or an attribute chain, None for any other expression."""
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        inner = dotted(node.value)
        return f"{inner}.{node.attr}" if inner else None
    return None
