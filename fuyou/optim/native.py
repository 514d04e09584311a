"""The C++ core of the optimizer (fuyou._adam), imported once for every module that calls it: the
fused AdamW (fused.py) and the fp8 weight tiles' decode (codecs.py). It is optional: where it is
not built, `ext` is None and those modules run their torch references."""
from __future__ import annotations

from typing import Optional

try:
    from fuyou import _adam as ext

    IMPORT_ERROR: Optional[str] = None
except ImportError as exc:  # pragma: no cover - exercised when the build failed
    ext = None
    IMPORT_ERROR = str(exc)
