"""The embedded job store: SQLite in the service folder; survives restarts, and a job that was running when the
service stopped is marked ``interrupted`` on the next start (never silently lost)."""

from __future__ import annotations

import json
import re
import sqlite3
import threading
import time
import uuid

JOB_ID = re.compile(r"^[0-9a-f]{32}$")
TERMINAL = ("succeeded", "failed", "cancelled", "interrupted")

_SCHEMA = """
CREATE TABLE IF NOT EXISTS jobs (
    id TEXT PRIMARY KEY,
    kind TEXT NOT NULL,
    state TEXT NOT NULL,
    created REAL NOT NULL,
    updated REAL NOT NULL,
    params TEXT NOT NULL,
    progress TEXT NOT NULL DEFAULT '{}',
    result TEXT,
    error TEXT
)
"""


def valid_job_id(job_id: str) -> bool:
    return isinstance(job_id, str) and bool(JOB_ID.match(job_id))


class JobStore:
    def __init__(self, path: str):
        self.path = path
        self.lock = threading.Lock()
        self.db = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
        self.db.execute("PRAGMA journal_mode=WAL")
        self.db.execute("PRAGMA synchronous=FULL")
        self.db.execute(_SCHEMA)

    def close(self) -> None:
        with self.lock:
            self.db.close()

    def mark_interrupted(self) -> int:
        """On start: jobs left queued or running by a stopped service become ``interrupted``."""
        with self.lock:
            cur = self.db.execute(
                "UPDATE jobs SET state='interrupted', updated=?, error=? WHERE state IN ('queued','running')",
                (time.time(), "the service stopped while this job was queued or running; POST .../resume"),
            )
            return cur.rowcount

    def create(self, kind: str, params: dict) -> str:
        job_id = uuid.uuid4().hex
        now = time.time()
        with self.lock:
            self.db.execute("INSERT INTO jobs (id, kind, state, created, updated, params) VALUES (?,?,?,?,?,?)",
                            (job_id, kind, "queued", now, now, json.dumps(params)))
        return job_id

    def update(self, job_id: str, **fields) -> None:
        cols, vals = [], []
        for k, v in fields.items():
            if k not in ("state", "progress", "result", "error"):
                raise KeyError(k)
            cols.append(f"{k}=?")
            vals.append(json.dumps(v) if k in ("progress", "result") and v is not None else v)
        with self.lock:
            self.db.execute(f"UPDATE jobs SET {', '.join(cols)}, updated=? WHERE id=?", (*vals, time.time(), job_id))

    def get(self, job_id: str) -> dict | None:
        with self.lock:
            row = self.db.execute("SELECT id, kind, state, created, updated, params, progress, result, error "
                                  "FROM jobs WHERE id=?", (job_id,)).fetchone()
        if row is None:
            return None
        keys = ("id", "kind", "state", "created", "updated", "params", "progress", "result", "error")
        job = dict(zip(keys, row, strict=True))
        for k in ("params", "progress", "result"):
            job[k] = json.loads(job[k]) if job[k] else None
        return job

    def counts(self) -> dict:
        with self.lock:
            return dict(self.db.execute("SELECT state, COUNT(*) FROM jobs GROUP BY state").fetchall())
