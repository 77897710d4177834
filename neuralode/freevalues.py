"""The values a plain-function field reads from outside its arguments, as a key of its compilation.

An eager `odeint` compiles a function field once and reuses the program, which holds the values the
function read from its closure and from the globals it names as constants. Without a key on them,
`k = 2.0` after a first solve of `lambda t, y, args: -k * y` (a notebook cell re-run) gave the old
solution again, silently. `free_values(f)` is that key: Python scalars and strings by value, tuples
by their items, nnx modules by the arrays of their state (training replaces them), the functions
`f` calls by what they read in turn (a helper reading a global), a bound method's object (or a
callable object) by its attributes, a partial's bound arguments by value, and every other object
(a JAX or NumPy array, a list) by identity. So rebinding a name compiles a new program; mutating
an object in place is not seen, as JAX does not see it (it captures arrays as constants).
"""
from __future__ import annotations

import functools
import types
from typing import Any

import equinox as eqx
import jax
from flax import nnx

_DEPTH = 3  # functions followed from f: f -> helper -> helper's helper


class Identity:
    """An object compared by identity (and kept alive, so its id is not reused)."""

    def __init__(self, obj: Any):
        self.obj = obj

    def __eq__(self, other) -> bool:
        return isinstance(other, Identity) and other.obj is self.obj

    def __hash__(self) -> int:
        return id(self.obj)


def free_values(f: Any) -> tuple:
    """A hashable fingerprint of what the function `f` reads from its closure and its globals
    (empty for anything that is not a Python function)."""
    return _function(f, _DEPTH, set())


def _function(f: Any, depth: int, seen: set) -> tuple:
    f = getattr(f, "__wrapped__", f)  # jax.jit, functools.wraps
    plain = (types.FunctionType, types.MethodType, functools.partial, eqx.Module)
    if not isinstance(f, plain) and isinstance(getattr(f, "__call__", None), types.MethodType):
        f = f.__call__  # an object with __call__ (an equinox module's arrays are arguments)
    if isinstance(f, types.MethodType):  # a bound method reads its object's attributes
        return (("self", _attributes(f.__self__, depth, seen)),) + _function(f.__func__, depth, seen)
    if isinstance(f, functools.partial):
        bound = (f.args, tuple(sorted(f.keywords.items())))
        return (("partial", _value(bound, depth, seen)),) + _function(f.func, depth, seen)
    if not isinstance(f, types.FunctionType) or depth == 0 or id(f) in seen:
        return ()
    seen.add(id(f))
    cells = tuple(zip(f.__code__.co_freevars, f.__closure__ or ()))
    closure = tuple((name, _value(cell.cell_contents, depth, seen)) for name, cell in cells
                    if _has_contents(cell))
    named = tuple((name, _value(f.__globals__[name], depth, seen))
                  for name in sorted(_global_names(f.__code__)) if name in f.__globals__)
    return closure + named


def _has_contents(cell) -> bool:
    try:
        cell.cell_contents
    except ValueError:  # an empty cell: a name assigned later in the enclosing function
        return False
    return True


def _global_names(code: types.CodeType) -> set[str]:
    """Names the code (and the lambdas and comprehensions inside it) may read as globals."""
    names = set(code.co_names)
    for const in code.co_consts:
        if isinstance(const, types.CodeType):
            names |= _global_names(const)
    return names


def _attributes(obj: Any, depth: int, seen: set):
    """An object by its attributes (an nnx module by its state), one level deep."""
    if isinstance(obj, nnx.Module) or not hasattr(obj, "__dict__"):
        return _value(obj, depth, seen)
    return (Identity(obj), tuple((name, _value(v, depth, seen)) for name, v in vars(obj).items()))


def _value(value: Any, depth: int, seen: set):
    if value is None or isinstance(value, (bool, int, float, complex, str, bytes)):
        return value
    if isinstance(value, (types.ModuleType, type)):
        return None
    if isinstance(value, nnx.Module):
        leaves = jax.tree.leaves(nnx.state(value))
        return ("module", Identity(value), tuple(Identity(x) for x in leaves))
    if isinstance(value, tuple):
        return ("tuple", tuple(_value(v, depth, seen) for v in value))
    if isinstance(getattr(value, "__wrapped__", value),
                  (types.FunctionType, types.MethodType, functools.partial)):
        return ("function", Identity(value), _function(value, depth - 1, seen))
    return Identity(value)
