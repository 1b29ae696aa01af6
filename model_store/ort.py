"""Import ONNX Runtime without dragging torch into the process.

The ``onnxruntime-training`` build (the one build FedMQ installs: it trains
and infers) imports torch from its package ``__init__`` whenever torch is
installed, which costs a second of start-up and several hundred MB in a
process that only runs ONNX graphs. Its check is ``importlib.util.find_spec``,
which answers "not installed" for a module mapped to ``None`` in
``sys.modules``; mapping torch so for the duration of the import keeps ORT's
optional torch helpers off and nothing else changes.
"""

from __future__ import annotations

import importlib
import sys
from types import ModuleType


def import_without_torch(name: str = "onnxruntime") -> ModuleType:
    """Import ``name`` (an ONNX Runtime module) so that it does not import torch."""
    if name in sys.modules or "torch" in sys.modules:
        return importlib.import_module(name)
    sys.modules["torch"] = None  # type: ignore[assignment]
    try:
        return importlib.import_module(name)
    finally:
        del sys.modules["torch"]
