"""Peer trust: CurveZMQ keys, the authorized-keys directory, ZAP, and a key bound to its address.

Each daemon has a CurveZMQ keypair (``kvd keygen``). The peers it trusts are the public
certificates in ``peer.authorized_keys`` (one ``*.key`` file per peer, like ssh's
authorized_keys); each names, in its metadata, the peer address (``src``) that key may speak
as. The ROUTER is a CURVE server whose ZAP handler (pyzmq's :class:`AsyncioAuthenticator`)
admits only allow-listed keys; every DEALER is a CURVE client that knows its server's key
from the same directory, so both ends are authenticated and the channel is encrypted. ZMQ
gives each received message the key it came with (``User-Id``); :meth:`PeerAuth.admit`
refuses a message whose ``src`` is not an address bound to that key. The old shared token is
checked too when set (migration), compared as bytes: it never crashes on what a peer sends.

With ``peer.insecure`` (demos, tests) none of this runs: the daemon warns at start and
``kvctl status`` says so. Without keys and without ``peer.insecure`` the daemon refuses to start.

This module never accepts a key that is not in the directory, never lets a key speak for an
address it is not bound to, and never logs or shows a secret key.
"""

from __future__ import annotations

import contextlib
import hmac
import os
import stat
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import structlog
import zmq
import zmq.auth
from zmq.auth.asyncio import AsyncioAuthenticator

log = structlog.get_logger("kvd.trust")

PUBLIC_SUFFIX = ".key"
SECRET_SUFFIX = ".key_secret"
#: ZAP domain of the peer ROUTER.
ZAP_DOMAIN = b"kvd"
#: Seconds between rescans of the authorized-keys directory when an unknown key or address shows up.
RESCAN_S = 1.0
#: Largest certificate file read (a certificate is ~300 bytes).
MAX_CERT_BYTES = 64 << 10
#: The hub's marker for a message this daemon sent to itself (no ZMQ, no key).
LOCAL = "<local>"


class TrustError(Exception):
    """The daemon cannot start with this trust configuration (the message says what to do)."""


def keygen(directory: str | os.PathLike[str], address: str = "", name: str = "kvd",
           force: bool = False) -> tuple[Path, Path]:
    """Create ``<name>.key`` (public, 0644) and ``<name>.key_secret`` (0600) in ``directory``.

    ``address`` (``tcp://host:port``, this daemon's peer address) is written into the public
    certificate: peers bind the key to it. Refuses to overwrite a key unless ``force``."""
    folder = Path(directory)
    folder.mkdir(parents=True, exist_ok=True, mode=0o755)
    public, secret = folder / f"{name}{PUBLIC_SUFFIX}", folder / f"{name}{SECRET_SUFFIX}"
    if not force and (public.exists() or secret.exists()):
        raise FileExistsError(f"{public} or {secret} exists already (use --force to replace it)")
    old = os.umask(0o077)  # the secret never exists readable by others, not even for a moment
    try:
        made_public, made_secret = zmq.auth.create_certificates(
            str(folder), name, metadata={"address": address} if address else None)
    finally:
        os.umask(old)
    if address:  # pyzmq writes metadata into the secret certificate only; peers read the public one
        text = Path(made_public).read_text(encoding="utf-8")
        Path(made_public).write_text(text.replace("metadata\n", f'metadata\n    address = "{address}"\n', 1),
                                     encoding="utf-8")
    os.chmod(made_secret, 0o600)
    os.chmod(made_public, 0o644)
    return Path(made_public), Path(made_secret)


def certificate_metadata(path: str | os.PathLike[str]) -> dict[str, str]:
    """The ``metadata`` section of a ZPL certificate file (pyzmq writes ``key = "value"`` lines)."""
    out: dict[str, str] = {}
    section = ""
    with open(path, encoding="utf-8", errors="replace") as f:
        for line in f.read(MAX_CERT_BYTES).splitlines():
            if not line.strip() or line.lstrip().startswith("#"):
                continue
            if not line[0].isspace():
                section = line.strip()
                continue
            if section == "metadata" and "=" in line:
                key, _, value = line.strip().partition("=")
                out[key.strip()] = value.strip().strip('"')
    return out


@dataclass(frozen=True)
class PeerKey:
    """One authorized peer: its public key (z85) and the addresses it may speak as."""

    public: bytes
    addresses: frozenset[str]
    path: str


class KeyRing:
    """The authorized-keys directory, read at start and rescanned (at most once a second) as keys
    are looked up, so adding a node needs no restart and deleting its key revokes it."""

    def __init__(self, directory: str, clock: Callable[[], float] = time.monotonic) -> None:
        self.directory = directory
        self._clock = clock
        self._by_key: dict[bytes, PeerKey] = {}
        self._by_address: dict[str, bytes] = {}
        self._scanned = float("-inf")
        self._stamp: tuple[object, ...] | None = None
        self.problems: list[str] = []

    def __len__(self) -> int:
        return len(self._by_key)

    def load(self) -> None:
        by_key: dict[bytes, PeerKey] = {}
        by_address: dict[str, bytes] = {}
        problems: list[str] = []
        found: list[tuple[str, bytes, frozenset[str]]] = []  # (file, key, addresses) of each certificate
        try:
            names = sorted(os.listdir(self.directory))
        except OSError as exc:
            names = []
            problems.append(f"cannot read {self.directory}: {exc.strerror}")
        for name in names:
            if not name.endswith(PUBLIC_SUFFIX):
                continue
            path = os.path.join(self.directory, name)
            try:
                st = os.stat(path)
                if not stat.S_ISREG(st.st_mode):  # a FIFO would block the loop, a device read forever
                    raise ValueError("not a regular file")
                if st.st_size > MAX_CERT_BYTES:
                    raise ValueError(f"{st.st_size} bytes, more than a certificate ({MAX_CERT_BYTES})")
                public, _ = zmq.auth.load_certificate(path)
                meta = certificate_metadata(path)
            except (OSError, ValueError) as exc:
                problems.append(f"{name}: {exc}")
                continue
            addresses = frozenset(a.strip() for a in meta.get("address", "").split(",") if a.strip())
            if not addresses:
                problems.append(f"{name}: no address in its metadata (kvd keygen --address tcp://host:port)")
                continue
            found.append((name, public, addresses))
        # An address two keys claim is trusted for neither: which file sorts first must not decide
        # (a node's stale key left behind when its address went to a new node would win as often
        # as not, and speak as the new node, locking its real key out).
        claims: dict[str, set[bytes]] = {}
        for _, public, addresses in found:
            for addr in addresses:
                claims.setdefault(addr, set()).add(public)
        contested = {addr for addr, keys in claims.items() if len(keys) > 1}
        for addr in sorted(contested):
            names_of = [n for n, _, addresses in found if addr in addresses]
            problems.append(f"address {addr} is bound to {len(claims[addr])} different keys ({', '.join(names_of)}): "
                            "none is trusted for it until one file is removed")
        for name, public, addresses in found:
            mine = addresses - contested
            if not mine:
                continue
            old = by_key.get(public)
            by_key[public] = PeerKey(public, mine | (old.addresses if old else frozenset()), old.path if old else
                                     os.path.join(self.directory, name))
            for addr in mine:
                by_address[addr] = public
        for problem in problems:
            if problem not in self.problems:
                log.warning("authorized_key_skipped", directory=self.directory, problem=problem)
        self._by_key, self._by_address, self.problems = by_key, by_address, problems

    def rescan(self) -> None:
        """Reload if the directory changed; at most once per RESCAN_S."""
        now = self._clock()
        if now - self._scanned < RESCAN_S:
            return
        self._scanned = now
        stamp = self.stamp()
        if stamp != self._stamp:
            self._stamp = stamp
            self.load()

    def stamp(self) -> tuple[object, ...] | None:
        """What a change of the directory changes: its own times and each key file's identity,
        size and modification time. A file rewritten in place (a rotated key copied over the
        old one, a file emptied to revoke it) leaves the directory's mtime and its entry count
        as they were, so those alone missed it and the old key stayed trusted."""
        try:
            st = os.stat(self.directory)
            files: list[tuple[str, int, int, int, int]] = []
            for name in sorted(os.listdir(self.directory)):
                if name.endswith(PUBLIC_SUFFIX):
                    with contextlib.suppress(OSError):  # gone meanwhile: the next scan sees that
                        f = os.stat(os.path.join(self.directory, name))
                        files.append((name, f.st_ino, f.st_size, f.st_mtime_ns, f.st_ctime_ns))
        except OSError:
            return None
        return (st.st_mtime_ns, st.st_ino, tuple(files))

    def get(self, public: bytes) -> PeerKey | None:
        # Rescanned on hits too (at most once per RESCAN_S, a stat when nothing changed): a key
        # deleted from the directory is how an operator revokes a node.
        self.rescan()
        return self._by_key.get(public)

    def key_for(self, address: str) -> bytes | None:
        self.rescan()
        return self._by_address.get(address)


def token_matches(expected: str, offered: object) -> bool:
    """The migration token check: bytes compared in constant time; a token that is not a
    string (or any string a peer picks, non-ASCII included) is simply wrong, never a crash."""
    if not isinstance(offered, str):
        return False
    return hmac.compare_digest(offered.encode("utf-8", "surrogatepass"), expected.encode("utf-8", "surrogatepass"))


class _Authenticators:
    """One ZAP handler per ZMQ context (ZAP is per context); it admits a key any hub of that
    context trusts (several hubs share a context only in tests)."""

    def __init__(self) -> None:
        self._by_ctx: dict[int, tuple[AsyncioAuthenticator, list[PeerAuth]]] = {}

    def add(self, ctx: zmq.Context[Any], auth: PeerAuth) -> None:
        entry = self._by_ctx.get(id(ctx))
        if entry is None:
            authenticator = AsyncioAuthenticator(ctx)
            authenticator.start()
            entry = (authenticator, [])
            authenticator.configure_curve_callback(ZAP_DOMAIN.decode(), credentials_provider=_Provider(entry[1]))
            self._by_ctx[id(ctx)] = entry
        entry[1].append(auth)

    def remove(self, ctx: zmq.Context[Any], auth: PeerAuth) -> None:
        entry = self._by_ctx.get(id(ctx))
        if entry is None:
            return
        if auth in entry[1]:
            entry[1].remove(auth)
        if not entry[1]:
            entry[0].stop()
            del self._by_ctx[id(ctx)]


class _Provider:
    def __init__(self, auths: list[PeerAuth]) -> None:
        self.auths = auths

    def callback(self, domain: str, key: bytes) -> bool:
        return any(auth.knows(key) for auth in self.auths)


_AUTHENTICATORS = _Authenticators()


class PeerAuth:
    """This daemon's keys and its peers', and the checks the peer hub runs. Built by
    :meth:`from_config`; ``secure`` False = ``peer.insecure`` (token only, if any)."""

    def __init__(self, *, secure: bool, token: str = "", public: bytes = b"", secret: bytes = b"",
                 ring: KeyRing | None = None, count: Callable[[str], None] = lambda kind: None) -> None:
        self.secure = secure
        self.token = token
        self.public = public
        self._secret = secret
        self.ring = ring
        self.count = count
        self._ctx: zmq.Context[Any] | None = None

    @classmethod
    def from_config(cls, config: Any, count: Callable[[str], None] = lambda kind: None) -> PeerAuth:
        """Load the keypair and the authorized keys; TrustError when there is no keypair and
        ``peer.insecure`` is not set (secure by default)."""
        if config.peer_insecure:
            return cls(secure=False, token=config.auth_token, count=count)
        path = config.peer_key_file
        if not path or not os.path.exists(path):
            raise TrustError(
                f"no peer key at {path or '(peer.key_file is empty)'}: create one with `kvd keygen --dir "
                f"{os.path.dirname(path) or '/etc/kvd/keys'} --address tcp://<node.hostname>:<peer.port>` and "
                "put the public half (kvd.key) of every peer into peer.authorized_keys; or set "
                "peer.insecure = true on purpose (no authentication, no encryption)")
        try:
            public, secret = zmq.auth.load_certificate(path)
        except (OSError, ValueError) as exc:
            raise TrustError(f"cannot read the peer key {path}: {exc}") from None
        if not secret:
            raise TrustError(f"{path} holds no secret key: peer.key_file names the *.key_secret file")
        if os.stat(path).st_mode & 0o077:
            log.warning("peer_key_readable_by_others", path=path, hint="chmod 600 it")
        ring = KeyRing(config.peer_authorized_keys)
        ring.load()
        return cls(secure=True, token=config.auth_token, public=public, secret=secret, ring=ring, count=count)

    # --- sockets ----------------------------------------------------------------------------------
    def start(self, ctx: zmq.Context[Any]) -> None:
        """Run the ZAP handler on ``ctx`` (needs the running loop)."""
        if self.secure and self._ctx is None:
            self._ctx = ctx
            _AUTHENTICATORS.add(ctx, self)

    def stop(self) -> None:
        if self._ctx is not None:
            _AUTHENTICATORS.remove(self._ctx, self)
            self._ctx = None

    def setup_router(self, sock: zmq.Socket[Any]) -> None:
        """Make the ROUTER a CURVE server checked by ZAP (before it binds)."""
        if not self.secure:
            return
        sock.setsockopt(zmq.ZAP_DOMAIN, ZAP_DOMAIN)
        sock.setsockopt(zmq.CURVE_SERVER, 1)
        sock.setsockopt(zmq.CURVE_SECRETKEY, self._secret)
        sock.setsockopt(zmq.CURVE_PUBLICKEY, self.public)

    def setup_dealer(self, sock: zmq.Socket[Any], address: str) -> str:
        """Make a DEALER a CURVE client of the peer at ``address`` (before it connects); the
        problem when that peer's key is unknown ("" = ready)."""
        if not self.secure:
            return ""
        assert self.ring is not None
        server = self.ring.key_for(address)
        if server is None:
            return (f"no authorized key names address {address} (add its kvd.key to "
                    f"{self.ring.directory})")
        sock.setsockopt(zmq.CURVE_SERVERKEY, server)
        sock.setsockopt(zmq.CURVE_PUBLICKEY, self.public)
        sock.setsockopt(zmq.CURVE_SECRETKEY, self._secret)
        return ""

    def server_key(self, address: str) -> bytes | None:
        """The key a DEALER to ``address`` must expect now (None: none known, or not secure).
        The hub compares it with the one its cached socket was made with (a rescan at most once
        per RESCAN_S, a dict lookup otherwise)."""
        if not self.secure or self.ring is None:
            return None
        return self.ring.key_for(address)

    # --- checks -----------------------------------------------------------------------------------
    def knows(self, public: bytes) -> bool:
        """ZAP: is this client key allow-listed? (refusals are counted)"""
        known = self.ring is not None and self.ring.get(public) is not None
        if not known:
            self.count("peer_key_refused")
            log.warning("peer_key_refused", key=public[:8].decode("ascii", "replace") + "...")
        return known

    def admit(self, src: object, token: object, user_id: str | None) -> str:
        """"" if a message with this ``src`` and ``token``, received with key ``user_id``
        (:data:`LOCAL` for this daemon's own), may be handled; else the refusal's kind."""
        if user_id == LOCAL:
            return ""
        if self.token and not token_matches(self.token, token):
            return "auth"
        if not self.secure:
            return ""
        assert self.ring is not None
        peer = self.ring.get(user_id.encode("ascii", "replace")) if isinstance(user_id, str) else None
        if peer is None:
            return "peer_key_refused"  # removed from the directory since it connected
        if not isinstance(src, str) or src not in peer.addresses:
            return "peer_identity"
        return ""

    def describe(self) -> dict[str, Any]:
        """What ``kvctl status`` shows (never a secret)."""
        if not self.secure:
            return {"peer_auth": "insecure", "token": bool(self.token),
                    "warning": "peer.insecure: peers are neither authenticated nor encrypted"}
        assert self.ring is not None
        return {"peer_auth": "curve", "token": bool(self.token), "public_key": self.public.decode("ascii"),
                "authorized_keys": len(self.ring), "authorized_dir": self.ring.directory}


def user_id_of(frame: Any) -> str | None:
    """The ZAP user id (the peer's z85 public key under CURVE) of a received ``zmq.Frame``."""
    try:
        value = frame.get("User-Id")
    except (zmq.ZMQError, AttributeError, KeyError):
        return None
    return value if isinstance(value, str) and value else None


__all__ = ["LOCAL", "KeyRing", "PeerAuth", "PeerKey", "TrustError", "certificate_metadata", "keygen",
           "token_matches", "user_id_of"]
