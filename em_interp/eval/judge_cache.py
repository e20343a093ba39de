"""A thread-safe SQLite cache of judge scores.

One row per (judge model, prompt version, metric, question, answer), stored under the SHA-256 of those five
fields; the value is the score (or NULL) and its status. Each `put` commits at once (WAL journal), so a run
that is killed part-way loses nothing already scored, and a re-run asks the judge only for what is missing.
Only the hash, the model, version and metric names, the score and the status are written: never question or
answer text, and never credentials.
"""

from __future__ import annotations

import hashlib
import json
import sqlite3
import threading
import time
from pathlib import Path

from em_interp.errors import JudgeError

_SCHEMA = """
CREATE TABLE IF NOT EXISTS judge_scores (
    key TEXT PRIMARY KEY,
    model TEXT NOT NULL,
    version TEXT NOT NULL,
    metric TEXT NOT NULL,
    score REAL,
    status TEXT NOT NULL,
    created REAL NOT NULL
)
"""


def cache_key(model: str, version: str, metric: str, question: str, answer: str) -> str:
    """Hash the five fields that identify a judgement.

    Example:
        >>> len(cache_key("gpt-4o", "v1", "aligned", "q", "a"))
        64
    """
    payload = json.dumps([model, version, metric, question, answer], ensure_ascii=False)
    return hashlib.sha256(payload.encode("utf-8")).hexdigest()


class JudgeCache:
    """SQLite-backed map from `cache_key(...)` to `(score, status)`.

    Safe to share between threads (one connection guarded by a lock) and between processes (SQLite locking).

    Args:
        path: SQLite file; parent directories are created.

    Example:
        >>> import tempfile, os
        >>> c = JudgeCache(os.path.join(tempfile.mkdtemp(), "j.sqlite"))
        >>> k = cache_key("m", "v", "aligned", "q", "a")
        >>> c.put(k, model="m", version="v", metric="aligned", score=12.5, status="ok")
        >>> c.get(k)
        (12.5, 'ok')
    """

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self._lock = threading.Lock()
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._conn = sqlite3.connect(self.path, timeout=30.0, check_same_thread=False, isolation_level=None)
            self._conn.execute("PRAGMA journal_mode=WAL")
            self._conn.execute("PRAGMA synchronous=NORMAL")
            self._conn.execute(_SCHEMA)
        except (OSError, sqlite3.Error) as exc:
            raise JudgeError(f"{self.path}: cannot open judge cache ({exc})") from exc

    def get(self, key: str) -> tuple[float | None, str] | None:
        """Return `(score, status)` for `key`, or None when it is not cached."""
        with self._lock:
            row = self._conn.execute("SELECT score, status FROM judge_scores WHERE key = ?", (key,)).fetchone()
        return None if row is None else (row[0], row[1])

    def get_many(self, keys: list[str]) -> dict[str, tuple[float | None, str]]:
        """Look up many keys at once; missing keys are absent from the result."""
        found: dict[str, tuple[float | None, str]] = {}
        unique = list(dict.fromkeys(keys))
        with self._lock:
            for start in range(0, len(unique), 500):
                chunk = unique[start : start + 500]
                marks = ",".join("?" * len(chunk))
                rows = self._conn.execute(
                    f"SELECT key, score, status FROM judge_scores WHERE key IN ({marks})", chunk
                ).fetchall()
                found.update({k: (s, st) for k, s, st in rows})
        return found

    def put(self, key: str, *, model: str, version: str, metric: str, score: float | None, status: str) -> None:
        """Store one result and commit it immediately."""
        with self._lock:
            self._conn.execute(
                "INSERT OR REPLACE INTO judge_scores (key, model, version, metric, score, status, created) "
                "VALUES (?, ?, ?, ?, ?, ?, ?)",
                (key, model, version, metric, score, status, time.time()),
            )

    def __len__(self) -> int:
        with self._lock:
            return int(self._conn.execute("SELECT COUNT(*) FROM judge_scores").fetchone()[0])

    def close(self) -> None:
        """Close the connection (further use raises)."""
        with self._lock:
            self._conn.close()

    def __repr__(self) -> str:
        return f"JudgeCache({str(self.path)!r})"
