"""What differs between transformers releases on the patched path, read from the loaded classes
themselves rather than from a version number.

The KV cache argument: transformers up to 5.2x names it `past_key_values`; later releases name it
`cache` in the decoder layers, the text models and the outputs, and a layer that takes `cache` ignores
a `past_key_values` keyword (it lands in **kwargs). So every call the patched path makes passes the
cache under the name the callee's own signature declares.
"""
from __future__ import annotations

import functools
import inspect
import re
from typing import Callable

CACHE_NAMES = ("cache", "past_key_values")
# The oldest transformers release the patched path is tested with (pyproject.toml's floor; a test checks
# that they agree). Older releases differ in create_causal_mask and in Qwen2-VL's rotary tables.
MIN_TRANSFORMERS = (5, 17)


def check_release(version: str) -> None:
    """ValueError when a transformers version (its __version__ string) is older than the tested floor."""
    found = re.match(r"(\d+)\.(\d+)", version)
    if found is None or tuple(int(x) for x in found.groups()) < MIN_TRANSFORMERS:
        floor = ".".join(map(str, MIN_TRANSFORMERS))
        raise ValueError(f"transformers: pruning a transformers model needs transformers >= {floor} (the tested "
                         f"range), found {version}; pip install 'transformers>={floor}'")


@functools.lru_cache(maxsize=None)
def function_cache_parameter(function: Callable) -> str:
    """The keyword under which `function` takes the KV cache."""
    params = inspect.signature(function).parameters
    for name in CACHE_NAMES:
        if name in params:
            return name
    raise ValueError(f"model: {getattr(function, '__qualname__', function)} takes the KV cache under none of "
                     f"{', '.join(CACHE_NAMES)}; this transformers release is not supported with pruning")


def cache_parameter(module_or_class) -> str:
    """The keyword under which a module's (or class's) `forward` takes the KV cache."""
    cls = module_or_class if isinstance(module_or_class, type) else type(module_or_class)
    return function_cache_parameter(cls.forward)


def pop_cache(kwargs: dict, past_key_values=None):
    """The cache a caller passed under either name (removed from kwargs); ValueError when both are given."""
    cache = kwargs.pop("cache", None)
    if cache is not None and past_key_values is not None:
        raise ValueError("cache, past_key_values: the KV cache was given under both names; pass it once")
    return cache if cache is not None else past_key_values


@functools.lru_cache(maxsize=None)
def output_cache_field(output_class: type) -> str:
    """The field of a transformers output dataclass that holds the cache."""
    fields = getattr(output_class, "__dataclass_fields__", {})
    return next((name for name in CACHE_NAMES if name in fields), "past_key_values")


def output_cache(output):
    """The cache an output object of any release carries (None when it carries none)."""
    return getattr(output, output_cache_field(type(output)), None)
