"""SGLang general plug-in: makes ``--disaggregation-transfer-backend kvd`` resolve to kvd.

Registered as entry point ``kvd = kvd.sglang.plugin:register`` in group
``sglang.srt.plugins``; SGLang calls it in its CLI, its Engine and every scheduler process
(``sglang.srt.plugins.load_plugins``). It
  1. adds ``kvd`` to the ``--disaggregation-transfer-backend`` choices,
  2. adds ``KVD = "kvd"`` to ``TransferBackend``,
  3. wraps ``get_kv_class`` (SGLang's HookRegistry propagates the wrapper to prefill.py,
     decode.py and disagg_service.py) so that backend KVD yields kvd's classes.
Idempotent.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

log = logging.getLogger("kvd.sglang")

BACKEND = "kvd"
_TARGET = "sglang.srt.disaggregation.utils.get_kv_class"


def add_backend_member(enum_cls: Any, name: str = "KVD", value: str = BACKEND) -> Any:
    """Add ``name = value`` to an existing Enum class (once); returns the member."""
    existing = enum_cls._value2member_map_.get(value)
    if existing is not None:
        return existing
    member = object.__new__(enum_cls)
    member._name_ = name
    member._value_ = value
    member.__objclass__ = enum_cls
    type.__setattr__(enum_cls, name, member)
    enum_cls._member_map_[name] = member
    enum_cls._member_names_.append(name)
    enum_cls._value2member_map_[value] = member
    return member


def kvd_classes() -> dict[Any, Any]:
    from sglang.srt.disaggregation.utils import KVClassType

    from kvd.sglang.conn import KvdKVBootstrapServer, KvdKVManager, KvdKVReceiver, KvdKVSender

    return {KVClassType.MANAGER: KvdKVManager, KVClassType.SENDER: KvdKVSender,
            KVClassType.RECEIVER: KvdKVReceiver, KVClassType.BOOTSTRAP_SERVER: KvdKVBootstrapServer}


def _around_get_kv_class(original: Callable[..., Any], transfer_backend: Any, class_type: Any) -> Any:
    from sglang.srt.disaggregation.utils import KVClassType

    if getattr(transfer_backend, "value", transfer_backend) == BACKEND and class_type != KVClassType.KVARGS:
        return kvd_classes().get(class_type)
    return original(transfer_backend, class_type)


def register() -> None:
    """The entry point SGLang calls."""
    from kvd.sglang import check_sglang_version

    check_sglang_version()
    from sglang.srt.arg_groups import choices
    from sglang.srt.disaggregation.utils import TransferBackend
    from sglang.srt.plugins.hook_registry import HookRegistry, HookType

    if BACKEND not in choices.DISAGG_TRANSFER_BACKEND_CHOICES:
        choices.add_disagg_transfer_backend_choices([BACKEND])
    add_backend_member(TransferBackend)
    # Idempotent by kvd's own hook, not by the target: another plug-in's hook on get_kv_class
    # (or a mere read of the registry's defaultdict) made the target known, and kvd's wrapper was
    # then never registered, so ``--disaggregation-transfer-backend kvd`` resolved to nothing.
    hooks = HookRegistry._hooks.get(_TARGET, ())
    if not any(entry[1] is _around_get_kv_class for entry in hooks):
        HookRegistry.register(_TARGET, _around_get_kv_class, HookType.AROUND)
    log.info("kvd transfer backend registered with SGLang")


__all__ = ["BACKEND", "add_backend_member", "kvd_classes", "register"]
