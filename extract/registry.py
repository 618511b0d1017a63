"""One name -> object registry for every concept the tool looks up by name (methods, eval tasks, datasets, encoders).

A defining module fills it with `REG.register("name")` as a class or function decorator, or as a plain call
`REG.register("name", obj)`; the package imports its defining modules by name in one list, so what is registered
never depends on source text or on installed files. One set of rules everywhere:
- a name or alias is registered once: a second, different object under it is refused (ValueError naming the holder);
  registering the very same object again does nothing, and a reloaded module's new definition (same module and
  qualified name) replaces the old one, so `importlib.reload` works;
- `get(name)` of an unknown name is a PipeError that lists the valid names, aliases included.

No torch here: every stage imports this module, and the command line's help must stay fast.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any, Generic, TypeVar

from .errors import PipeError

T = TypeVar("T")


def _definition(obj: Any) -> Any:
    """What identifies a definition across a module reload: (module, qualname) of a class or function, element-wise
    for tuples; other values are compared as they are."""
    if isinstance(obj, tuple):
        return tuple(_definition(x) for x in obj)
    module, qualname = getattr(obj, "__module__", None), getattr(obj, "__qualname__", None)
    return (module, qualname) if isinstance(module, str) and isinstance(qualname, str) else obj


def _describe(obj: Any) -> str:
    module, qualname = getattr(obj, "__module__", None), getattr(obj, "__qualname__", None)
    if isinstance(obj, tuple):
        return "(" + ", ".join(_describe(x) for x in obj) + ")"
    return f"{module}.{qualname}" if isinstance(module, str) and isinstance(qualname, str) else repr(obj)


class Registry(Generic[T]):
    """Names (and aliases) -> objects of one kind; `kind` is the word error messages use ("method", "dataset").
    `hint` is appended to an unknown name's list of valid ones (encoders: "or hf:<model id or path>"). With
    `name_attr`, registering sets that attribute of the object to its name (a class then knows what run dirs,
    results and messages call it)."""

    def __init__(self, kind: str, *, hint: str = "", name_attr: str | None = None) -> None:
        self.kind = kind
        self.hint = hint
        self.name_attr = name_attr
        self._items: dict[str, T] = {}
        self._aliases: dict[str, str] = {}  # alias -> name

    def register(self, name: str, obj: T | None = None, *, aliases: Iterable[str] = ()) -> Any:
        """Register `obj` under `name` (and `aliases`) and return it; without `obj`, a decorator that does so."""
        if obj is None:
            return lambda target: self.register(name, target, aliases=aliases)
        aliases = tuple(aliases)
        spellings = (name, *aliases)
        for s in spellings:
            if not isinstance(s, str) or not s or s != s.strip():
                raise ValueError(f"{self.kind} name {s!r}: a non-empty string without surrounding spaces")
        if len(set(spellings)) < len(spellings):
            raise ValueError(f"{self.kind} {name!r}: a name or alias given twice in {spellings}")
        replaced = None
        for s in spellings:
            held_name = self._aliases.get(s, s)
            if held_name not in self._items:
                continue
            held = self._items[held_name]
            if held is obj or _definition(held) == _definition(obj):
                replaced = held_name  # the same object again, or its reloaded definition
                continue
            as_alias = f" (an alias of {held_name!r})" if s != held_name else ""
            raise ValueError(f"{self.kind} {s!r}{as_alias} is already registered (by {_describe(held)})")
        if replaced is not None:
            self.unregister(replaced)
        self._items[name] = obj
        self._aliases.update(dict.fromkeys(aliases, name))
        if self.name_attr:
            setattr(obj, self.name_attr, name)
        return obj

    def unregister(self, name: str) -> T:
        """Remove a name and its aliases (a test's temporary entry); returns what was registered."""
        name = self._aliases.get(name, name)
        obj = self._items.pop(name)
        self._aliases = {a: n for a, n in self._aliases.items() if n != name}
        return obj

    def get(self, name: str) -> T:
        """The object registered under `name` or one of its aliases; an unknown name lists the valid ones."""
        key = self._aliases.get(name, name)
        if key not in self._items:
            valid = ", ".join(self.names(aliases=True))
            raise PipeError(f"unknown {self.kind} {name!r}; valid: {valid}" + (f", {self.hint}" if self.hint else ""))
        return self._items[key]

    def canonical(self, name: str) -> str:
        """The registered name an alias (or the name itself) stands for; unknown names as in `get`."""
        self.get(name)
        return self._aliases.get(name, name)

    def names(self, *, aliases: bool = False) -> list[str]:
        """Registered names, sorted; with `aliases`, every accepted spelling."""
        return sorted([*self._items, *self._aliases] if aliases else self._items)

    def items(self) -> list[tuple[str, T]]:
        """(name, object) pairs sorted by name, aliases left out (each object once per name)."""
        return sorted(self._items.items())

    def values(self) -> list[T]:
        return [obj for _, obj in self.items()]

    def __contains__(self, name: object) -> bool:
        return name in self._items or name in self._aliases

    def __repr__(self) -> str:
        return f"Registry({self.kind!r}, {self.names()})"
