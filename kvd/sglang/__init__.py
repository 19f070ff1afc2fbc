"""kvd as an SGLang PD-disaggregation transfer backend (``--disaggregation-transfer-backend kvd``).

Loaded through SGLang's own plug-in entry point (group ``sglang.srt.plugins``, see
:mod:`kvd.sglang.plugin`); no patch to SGLang. The classes follow SGLang's ``base/conn.py``
contract and live in :mod:`kvd.sglang.conn`; importing this package does not import SGLang.
"""

from __future__ import annotations

SGLANG_MIN = (0, 5, 23)
SGLANG_MAX_EXCLUSIVE = (0, 5, 24)
SUPPORTED = "sglang>=0.5.23,<0.5.24"


class UnsupportedSGLang(RuntimeError):
    """An SGLang version, model feature or option the kvd backend refuses; the message names it."""


def _version_tuple(text: str) -> tuple[int, ...]:
    out: list[int] = []
    for part in text.split("+")[0].split(".")[:3]:
        digits = "".join(ch for ch in part if ch.isdigit())
        out.append(int(digits or 0))
    return tuple(out)


def check_sglang_version(version: str | None = None) -> str:
    """Return SGLang's version, or raise UnsupportedSGLang outside the pinned range."""
    if version is None:
        from importlib.metadata import version as dist_version

        version = dist_version("sglang")
    v = _version_tuple(version)
    if not SGLANG_MIN <= v < SGLANG_MAX_EXCLUSIVE:
        raise UnsupportedSGLang(f"kvd's SGLang backend supports {SUPPORTED}, found sglang {version}: "
                                "the backend contract (base/conn.py) changes between releases")
    return version


__all__ = ["SUPPORTED", "UnsupportedSGLang", "check_sglang_version"]
