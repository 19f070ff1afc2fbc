"""What kvd's SGLang bootstrap server accepts: checks of its HTTP requests, no I/O, no SGLang import.

SGLang's ``CommonKVBootstrapServer`` (0.5.23) stores the first ``PUT /route`` body's sizes as
they come and counts every PUT as one more rank. Anyone who reaches the port can send one, and
an engine rank may send its own twice (a retried PUT whose first answer was lost), so:
``attn_tp_size: "2"`` made every later ``GET /route`` a 500 (``_is_ready`` multiplied a
string), a size of 0 made it ready with no rank at all, a huge one never ready, and a repeated
PUT counted one rank twice (ready before the others registered). Malformed ``GET /route``,
``/query_dp_ranks`` and ``/register_dp_rank`` requests were 500s with a traceback each.
kvd's server (:class:`kvd.sglang.conn.KvdKVBootstrapServer`) refuses such requests with a 400
and changes nothing, and counts a rank once however often it registers.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from kvd.core.layout import MAX_TP_SIZE

#: (size, rank) field pairs of a rank's registration.
PARALLEL = (("attn_tp_size", "attn_tp_rank"), ("attn_cp_size", "attn_cp_rank"), ("attn_dp_size", "attn_dp_rank"),
            ("pp_size", "pp_rank"), ("system_dp_size", "system_dp_rank"))
#: The sizes the server keeps from the first registration, by the attribute it keeps them in.
KEPT = {"attn_tp_size": "attn_tp_size", "attn_cp_size": "attn_cp_size", "pp_size": "pp_size"}
#: Most bootstrap rooms one /query_dp_ranks may name.
MAX_QUERY_ROOMS = 65_536
MAX_PAGE_SIZE = 1 << 20
_HOST_CHARS = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789.-_:[]%")


def _int(value: object) -> int | None:
    """``value`` if it is an integer (not a bool), else None."""
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def route_put_problem(data: object, kept: Mapping[str, Any]) -> str:
    """"" if ``data`` is a rank registration this server may store; else why not. ``kept``: the
    sizes already stored from earlier registrations (None where none yet)."""
    if not isinstance(data, dict):
        return "the body must be a JSON object"
    for size, rank in PARALLEL:
        n, r = _int(data.get(size)), _int(data.get(rank))
        if n is None or not 1 <= n <= MAX_TP_SIZE:
            return f"{size} must be an integer in 1..{MAX_TP_SIZE}"
        if r is None or not 0 <= r < n:
            return f"{rank} must be an integer in 0..{size}-1"
    port, page = _int(data.get("rank_port")), _int(data.get("page_size"))
    if port is None or not 1 <= port <= 65535:
        return "rank_port must be an integer in 1..65535"
    if page is None or not 1 <= page <= MAX_PAGE_SIZE:
        return f"page_size must be an integer in 1..{MAX_PAGE_SIZE}"
    ip = data.get("rank_ip")
    if not isinstance(ip, str) or not 0 < len(ip) <= 255 or not set(ip) <= _HOST_CHARS:
        return "rank_ip must be a host name or address"
    dtype = data.get("kv_cache_dtype")
    if dtype is not None and (not isinstance(dtype, str) or len(dtype) > 64):
        return "kv_cache_dtype must be a short string"
    for field, attr in KEPT.items():
        if kept.get(attr) is not None and kept[attr] != data[field]:
            return f"{field} {data[field]} differs from the {kept[attr]} registered before"
    return ""


def route_get_problem(query: Mapping[str, str]) -> str:
    """"" if a ``GET /route`` query names integer ranks (-1: the whole topology); else why not."""
    for key in ("prefill_dp_rank", "prefill_cp_rank", "target_tp_rank", "target_pp_rank"):
        text = query.get(key)
        if text is None or not text.lstrip("-").isdigit() or len(text) > 8 or int(text) < -1:
            return f"{key} must be an integer >= -1"
    return ""


def dp_query_problem(data: object) -> str:
    """"" if a ``/query_dp_ranks`` body is ``{"bootstrap_rooms": [int, ...]}``; else why not."""
    rooms = data.get("bootstrap_rooms") if isinstance(data, dict) else None
    if not isinstance(rooms, list) or len(rooms) > MAX_QUERY_ROOMS or any(_int(r) is None for r in rooms):
        return f"bootstrap_rooms must be a list of at most {MAX_QUERY_ROOMS} integers"
    return ""


def dp_register_problem(data: object) -> str:
    """"" if a ``/register_dp_rank`` body is ``{"bootstrap_room": int, "dp_rank": int >= 0}``."""
    if not isinstance(data, dict):
        return "the body must be a JSON object"
    dp_rank = _int(data.get("dp_rank"))
    if _int(data.get("bootstrap_room")) is None or dp_rank is None or not 0 <= dp_rank < MAX_TP_SIZE:
        return "bootstrap_room and dp_rank must be integers (dp_rank >= 0)"
    return ""


__all__ = ["dp_query_problem", "dp_register_problem", "route_get_problem", "route_put_problem"]
