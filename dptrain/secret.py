"""The run key: the one secret every private random choice of a run derives from.

Threat model.  The code, the recipe, ``run.json``, the ledger and the released model are
public (``run.json`` holds no un-noised statistic of private records: those are in the run
directory's ``private/``, see :mod:`dptrain.rundir`); the training data, the run key and
everything computed from private records without noise are secret.  Poisson coins, Gaussian noise, data
splits and audit canaries are all computed from the key, so an adversary who knows everything
but the key cannot replay a run: retraining on ``D`` and on ``D + z`` with the same recipe
gives models that differ by fresh noise, not bit for bit.

Key.  256 bits from the operating system's CSPRNG (:func:`secrets.token_bytes`), one per
run, written once to ``<run dir>/secret.key`` (mode 0600, created 0600 before any byte is
written, atomically renamed into place) and read back on ``--resume`` so that the resumed run
continues the same streams.  It never appears in ``recipe.yaml``, ``run.json``, metrics,
logs, checkpoints or federated messages; ``key_id`` (a PRF output of the key) may.

Sub-keys.  ``key.prf(purpose)`` is AES-256 keyed with ``HMAC-SHA256(key, "dptrain/" +
purpose)``: independent pseudorandom functions per purpose ("coins", "noise", "split/...",
"canaries", ...; ``key.chacha(purpose)`` keys ChaCha20 with the same sub-key scheme, for
noise computed on the GPU: :mod:`dptrain.device_noise`).  :class:`Prf` evaluates ``AES_k(x)`` on 128-bit inputs ``x = hi * 2^64 +
lo`` (big-endian blocks), vectorized: one call encrypts millions of blocks.  The privacy
guarantee holds against adversaries for whom AES-256 is indistinguishable from a random
function (computational DP); without the key, the outputs are unpredictable.

Used once.  Step ``t``'s coins and noise are functions of the key and ``t`` only, so a run that
restarted from step 0 with a kept key (its ledger and checkpoints deleted) would repeat the
first attempt's coins and noise: two released models sharing their noise, whose difference
cancels it.  So the key file records, before the first step draws anything, that the key is
used (:meth:`RunKey.mark_used`: a ``used`` line, the file rewritten atomically, still 0600);
a run refuses to start from step 0 with a used key (:meth:`RunKey.refuse_restart`) and names
the fix: resume from the run's checkpoints, or a new run directory (a fresh key).

Reproducible mode.  ``privacy.insecure_seed: N`` derives the key from ``N`` (SHA-256), so a
run can be repeated exactly.  Such a run has **no** guarantee against anyone who knows ``N``;
every report of it says so.  Nothing is written to ``secret.key`` then (the seed is the key).
"""

from __future__ import annotations

import hashlib
import hmac
import os
import secrets
import stat
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

from accountants.ledger import fsync_dir

from .errors import UserError

if TYPE_CHECKING:
    from .chacha import ChaCha20

KEY_FILE = "secret.key"
KEY_BYTES = 32
_MAGIC = b"dptrain-run-key-v1\n"
_USED = b"used\n"  # the line mark_used appends: the key has drawn a step's coins and noise

__all__ = [
    "KEY_FILE",
    "Prf",
    "RunKey",
    "RunKeyError",
    "below",
    "id64",
    "record_keys",
    "run_key",
    "threshold",
]


class RunKeyError(UserError, RuntimeError):
    """A run key that is missing, unreadable or exposed; the message names the fix."""


class Prf:
    """``AES-256_k`` as a pseudorandom function on 128-bit inputs ``hi * 2^64 + lo``.

    Outputs are read as two little-endian 64-bit words per block.
    """

    def __init__(self, key: bytes) -> None:
        if len(key) != 32:
            raise ValueError("a Prf key has 32 bytes")
        self._key = key

    def at(self, hi: int, lo: np.ndarray) -> np.ndarray:
        """``(n, 2)`` uint64 words of ``AES_k(hi * 2^64 + lo[i])`` for each ``lo[i]``."""
        lo = np.asarray(lo, dtype=np.uint64).reshape(-1)
        blocks = np.empty((lo.size, 2), dtype=">u8")
        blocks[:, 0] = _u64(hi)
        blocks[:, 1] = lo
        enc = Cipher(algorithms.AES(self._key), modes.ECB()).encryptor()
        return _encrypt_into(enc, blocks, lo.size)

    def run(self, hi: int, start: int, count: int, out: np.ndarray | None = None) -> np.ndarray:
        """``(count, 2)`` words of the blocks ``hi * 2^64 + start + j``, ``j < count`` (AES-CTR
        keystream: the same values :meth:`at` gives, computed faster).

        ``out``: a reused C-contiguous uint64 buffer of at least ``2 count + 2`` words to write
        into (the result is a view of it); by default a new one."""
        if not (0 <= start and start + count <= 2**64):
            raise ValueError("a counter run must stay within one 2^64 block range")
        nonce = _u64(hi).to_bytes(8, "big") + int(start).to_bytes(8, "big")
        enc = Cipher(algorithms.AES(self._key), modes.CTR(nonce)).encryptor()
        return _encrypt_into(enc, _zero_blocks(count), count, out)

    def words(self, hi: int, count: int) -> np.ndarray:
        """``count`` uint64 words from the blocks ``(hi, 0), (hi, 1), ...``."""
        return self.run(hi, 0, (count + 1) // 2).reshape(-1)[:count]


_ZERO_CACHE_BYTES = 1 << 24  # plaintext of counter runs up to 2^20 blocks is one shared buffer
_zeros = np.zeros(0, dtype=np.uint8)


def _zero_blocks(count: int) -> np.ndarray:
    """``count`` zero blocks (the CTR plaintext), read-only; runs of up to 2^20 blocks share one
    buffer (no page faults per run), longer ones get their own."""
    global _zeros
    nbytes = 16 * count
    if nbytes > _ZERO_CACHE_BYTES:
        return np.zeros(nbytes, dtype=np.uint8)
    if _zeros.size < nbytes:  # grows to the largest run seen (at most 16 MB)
        zeros = np.zeros(max(nbytes, 1 << 16), dtype=np.uint8)
        zeros.flags.writeable = False
        _zeros = zeros  # one assignment: a thread reading the old buffer keeps it
    return _zeros[:nbytes]


def _encrypt_into(
    enc: Any, blocks: np.ndarray, count: int, out: np.ndarray | None = None
) -> np.ndarray:
    """``enc`` applied to the ``count`` 16-byte ``blocks``, as ``(count, 2)`` little-endian words
    (``update_into`` a preallocated buffer, ``out`` if given: several times faster than
    ``update``)."""
    if out is None:
        out = np.empty(2 * count + 2, dtype="<u8")  # update_into wants 15 spare bytes
    elif out.dtype != np.dtype("<u8") or not out.flags.c_contiguous or out.size < 2 * count + 2:
        raise ValueError("out must be a C-contiguous uint64 buffer of 2 count + 2 words")
    done = enc.update_into(memoryview(blocks).cast("B"), memoryview(out.reshape(-1)).cast("B"))
    if done != 16 * count:  # pragma: no cover - ECB and CTR are not buffered
        raise RuntimeError("AES returned a partial block")
    return out.reshape(-1)[: 2 * count].reshape(count, 2)


def _u64(x: int) -> int:
    x = int(x)
    if not 0 <= x < 2**64:
        raise ValueError(f"counter {x} is outside [0, 2^64)")
    return x


class RunKey:
    """A run's 256-bit secret (see the module docstring)."""

    def __init__(self, key: bytes, *, insecure_seed: int | None = None) -> None:
        if len(key) != KEY_BYTES:
            raise ValueError(f"a run key has {KEY_BYTES} bytes, got {len(key)}")
        self._key = bytes(key)
        self.insecure_seed = insecure_seed
        self.used = False  # read from the key file: it has drawn a step's coins and noise

    @classmethod
    def generate(cls) -> RunKey:
        """A fresh key from the OS CSPRNG."""
        return cls(secrets.token_bytes(KEY_BYTES))

    @classmethod
    def from_insecure_seed(cls, seed: int) -> RunKey:
        """The reproducible key of ``privacy.insecure_seed: seed``: NOT secret."""
        digest = hashlib.sha256(b"dptrain insecure seed\0" + str(int(seed)).encode()).digest()
        return cls(digest, insecure_seed=int(seed))

    @property
    def secure(self) -> bool:
        return self.insecure_seed is None

    def derive(self, purpose: str) -> bytes:
        """The 32-byte sub-key of ``purpose`` (HMAC-SHA256 with a domain string)."""
        return hmac.new(self._key, b"dptrain/" + purpose.encode(), hashlib.sha256).digest()

    def prf(self, purpose: str) -> Prf:
        return Prf(self.derive(purpose))

    def chacha(self, purpose: str) -> ChaCha20:
        """ChaCha20 keyed with :meth:`derive` of ``purpose`` (torch words on any device;
        :mod:`dptrain.chacha`): the same sub-key scheme as :meth:`prf`, another cipher."""
        from .chacha import ChaCha20  # torch is imported only by those who need it

        return ChaCha20(self.derive(purpose))

    def child(self, purpose: str) -> RunKey:
        """An independent key for a sub-party (e.g. one simulated client)."""
        return RunKey(self.derive("child/" + purpose), insecure_seed=self.insecure_seed)

    @property
    def key_id(self) -> str:
        """A public identifier of the key (a PRF output: reveals nothing about the key)."""
        return self.derive("key-id")[:8].hex()

    def describe(self) -> str:
        if self.secure:
            return "secret run key (256 bits from the OS CSPRNG, in secret.key, mode 0600)"
        return (
            f"INSECURE: derived from privacy.insecure_seed={self.insecure_seed}; NO privacy "
            "guarantee against anyone who knows that seed"
        )

    def __repr__(self) -> str:  # never print the key
        return f"RunKey(key_id={self.key_id}, secure={self.secure})"

    # -- the key file -----------------------------------------------------------------------

    def _temp_file(self, path: Path, content: bytes) -> Path:
        """``content`` in a new file beside ``path``, created 0600 (O_EXCL), fsynced."""
        tmp = path.with_name(f".{path.name}.{secrets.token_hex(6)}.tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            os.fchmod(fd, 0o600)  # whatever the umask
            os.write(fd, content)
            os.fsync(fd)
        finally:
            os.close(fd)
        return tmp

    def write(self, path: str | Path) -> Path:
        """Write the key to ``path`` once, not marked used: a temporary file created 0600
        (O_EXCL) in the same directory, fsynced, then linked to ``path`` (refused if ``path``
        exists)."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self._temp_file(path, _MAGIC + self._key.hex().encode() + b"\n")
        try:
            try:
                os.link(tmp, path)  # atomic, and fails if the key already exists
            except FileExistsError:
                raise RunKeyError(f"{path} already exists: a run key is written once") from None
            except OSError:  # a filesystem without hard links
                if path.exists():
                    raise RunKeyError(f"{path} already exists: a run key is written once") from None
                os.replace(tmp, path)
        finally:
            if tmp.exists():
                os.unlink(tmp)
        fsync_dir(path.parent)
        return path

    def mark_used(self, path: str | Path) -> None:
        """Record in the key file at ``path`` (this key's) that the key has drawn a step's
        coins and noise, before it does: the file is rewritten with a ``used`` line
        (temporary 0600 file, fsync, rename, directory fsync).  Nothing for an insecure seed
        (no file) or a key already marked."""
        if not self.secure or self.used:
            return
        path = Path(path)
        if RunKey.read(path).key_id != self.key_id:
            raise RunKeyError(f"{path} holds another run key than this run's")
        tmp = self._temp_file(path, _MAGIC + self._key.hex().encode() + b"\n" + _USED)
        try:
            os.replace(tmp, path)
        finally:
            if tmp.exists():
                os.unlink(tmp)
        fsync_dir(path.parent)
        self.used = True

    def refuse_restart(self, path: str | Path, why: str) -> None:
        """Raise :class:`RunKeyError` if this key is used: a run would start over from step 0
        with it (``why``: what is missing), repeating the coins and noise it already drew."""
        if self.used:
            raise RunKeyError(
                f"{path} has already drawn coins and noise for a run, but {why}: starting over "
                "from step 0 with it would repeat that noise, and two models sharing their "
                "noise reveal what it hid. Fix: resume the run from its checkpoints (restore "
                "them), or start a new run in a fresh directory (or delete this secret.key "
                "with the rest of that run's files); never reuse the key"
            )

    @classmethod
    def read(cls, path: str | Path) -> RunKey:
        path = Path(path)
        if not path.exists():
            raise RunKeyError(
                f"{path} is missing: the run's Poisson coins and noise derive from it, so the "
                "run cannot continue without it. Fix: restore the file from your backup, or "
                "start a new run in a fresh directory"
            )
        mode = stat.S_IMODE(path.stat().st_mode)
        if mode & 0o077:
            raise RunKeyError(
                f"{path} is readable by other users (mode {mode:o}); it is the run's secret. "
                f"Fix: chmod 600 {path} (and consider the run's noise exposed if others read it)"
            )
        data = path.read_bytes()
        if not data.startswith(_MAGIC):
            raise RunKeyError(f"{path} is not a dptrain run key")
        body = data[len(_MAGIC) :]
        used = body.endswith(b"\n" + _USED)
        if used:
            body = body[: -len(_USED)]
        try:
            key = cls(bytes.fromhex(body.decode().strip()))
        except ValueError:
            raise RunKeyError(f"{path} is corrupted (not a hex key)") from None
        key.used = used
        return key


def run_key(directory: str | Path, insecure_seed: int | None, *, create: bool) -> RunKey:
    """The key of the run (or client state) in ``directory``: derived from ``insecure_seed``
    if given, else read from ``directory/secret.key``, created there first if ``create`` and
    absent."""
    if insecure_seed is not None:
        return RunKey.from_insecure_seed(insecure_seed)
    path = Path(directory) / KEY_FILE
    if create and not path.exists():
        key = RunKey.generate()
        try:
            key.write(path)
        except RunKeyError:  # written concurrently: use that one
            pass
        else:
            return key
    return RunKey.read(path)


# -- record identities -----------------------------------------------------------------------


def id64(record_id: str) -> int:
    """64 bits of SHA-256 of a record id (the PRF input that identifies the record)."""
    return int.from_bytes(hashlib.sha256(record_id.encode()).digest()[:8], "little")


def record_keys(ids: list[str]) -> np.ndarray:
    """``id64`` of every record id; two ids with the same 64 bits are an error naming them."""
    keys = np.fromiter((id64(r) for r in ids), dtype=np.uint64, count=len(ids))
    if len(keys) > 1:
        order = np.argsort(keys, kind="stable")
        same = np.flatnonzero(keys[order][1:] == keys[order][:-1])
        if same.size:
            a, b = int(order[same[0]]), int(order[same[0] + 1])
            raise ValueError(
                f"records {ids[a]!r} and {ids[b]!r} have the same 64-bit id hash, so they would "
                "share their Poisson coins. Fix: rename one of them"
            )
    return keys


def threshold(p: float) -> int:
    """``floor(p * 2^64)``: a uniform 64-bit word is below it with probability at most ``p``
    (exactly ``floor(p 2^64) / 2^64``); ``p >= 1`` gives ``2^64`` (always)."""
    from fractions import Fraction

    if p >= 1:
        return 2**64
    if p <= 0:
        return 0
    return int(Fraction(p) * 2**64)


def below(words: np.ndarray, p: float) -> np.ndarray:
    """``words < floor(p 2^64)`` elementwise: Bernoulli(<= p) decisions from uniform words."""
    t = threshold(p)
    if t >= 2**64:
        return np.ones(words.shape, dtype=bool)
    return words < np.uint64(t)
