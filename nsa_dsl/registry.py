"""Python objects the custom ops (custom_ops) reach by a string key: an op
schema carries strings and tensors, not a CompiledPattern or an NSACache.
Held weakly: an object lives as long as its owner keeps it."""
from __future__ import annotations

import weakref

_OBJECTS: "weakref.WeakValueDictionary[str, object]" = weakref.WeakValueDictionary()


def register(obj, name: str) -> str:
    """The key `obj` is found by: `name` and the object's identity (two
    compiles of one pattern with other options are other objects)."""
    key = f"{name}:{id(obj)}"
    _OBJECTS[key] = obj
    return key


def lookup(key: str):
    obj = _OBJECTS.get(key)
    if obj is None:
        raise RuntimeError(f"nsa_dsl: no compiled pattern or cache {key!r} in this process (a graph that calls"
                           " an nsa_dsl op needs the CompiledPattern and NSACache it was traced with alive)")
    return obj
