"""The claim queue of a run with several workers: two claimers, leases, groups, nothing twice."""

from __future__ import annotations

import threading
import time
from pathlib import Path

from imagegen.store import RunStore


def _store(tmp_path: Path, groups: dict[str, int]) -> RunStore:
    """A run with jobs j000.. whose group is given by `groups` (group -> how many jobs)."""
    store = RunStore.open(tmp_path / "run")
    jobs, queue, n = [], [], 0
    for grp, count in groups.items():
        for _ in range(count):
            jid = f"j{n:03d}"
            jobs.append({"id": jid, "index": n})
            queue.append((jid, n, grp))
            n += 1
    store.sync_plan(jobs)
    store.queue_jobs(queue)
    return store


def _peer(tmp_path: Path) -> RunStore:
    """A second connection, as a worker process opens it (no run lock)."""
    return RunStore.open(tmp_path / "run", create=False, lock=False)


def test_two_claimers_never_get_the_same_job_and_keep_groups_apart(tmp_path):
    store = _store(tmp_path, {"A": 4, "B": 4})
    peer = _peer(tmp_path)
    a = store.claim("w0", 2, lease=60)
    b = peer.claim("w1", 2, lease=60)
    assert a == ["j000", "j001"]
    assert b == ["j004", "j005"]  # group A is held by w0: w1 starts on B (no LoRA switch for either)
    assert store.claim("w0", 5, lease=60, prefer_group="A") == ["j002", "j003"]
    assert peer.claim("w1", 5, lease=60, prefer_group="B") == ["j006", "j007"]
    assert store.claim("w0", 5, lease=60) == []  # everything is claimed under live leases
    assert store.queued() == {"waiting": 0, "claimed": 8}
    peer.close()
    store.close()


def test_expired_lease_returns_jobs_and_finished_ones_never_come_back(tmp_path):
    store = _store(tmp_path, {"A": 3})
    peer = _peer(tmp_path)
    assert store.claim("dead", 3, lease=0.2) == ["j000", "j001", "j002"]
    store.mark_done("j000", file=store.images / "x.png", sha256="0" * 64, thumb=None, seconds=1.0)  # died after recording one
    store.mark_failed("j001", "boom")  # and failing one during this run
    assert peer.claim("w1", 3, lease=60) == []  # the lease still runs
    time.sleep(0.3)
    assert peer.claim("w1", 3, lease=60) == ["j002"]  # done and failed-in-this-run jobs are not handed out again
    peer.release(["j002"], "w1")
    assert store.queued() == {"waiting": 0, "claimed": 0}
    peer.close()
    store.close()


def test_renew_keeps_the_lease_and_unclaim_hands_jobs_back_at_once(tmp_path):
    store = _store(tmp_path, {"A": 2})
    store.register_worker("w0", pid=1, device="cpu")
    assert store.claim("w0", 2, lease=0.3) == ["j000", "j001"]
    for _ in range(3):
        time.sleep(0.15)
        assert store.renew("w0", lease=0.3, rendered=1, seconds=2.0) == 2
    peer = _peer(tmp_path)
    assert peer.claim("w1", 2, lease=60) == []
    assert store.unclaim_worker("w0") == 2
    assert peer.claim("w1", 2, lease=60) == ["j000", "j001"]
    (w,) = store.workers()
    assert (w["name"], w["device"], w["rendered"], w["rate"]) == ("w0", "cpu", 1, 0.5)
    peer.close()
    store.close()


def test_concurrent_claimers_each_job_exactly_once(tmp_path):
    store = _store(tmp_path, {"A": 30, "B": 20, "C": 10})
    store.close()
    got: dict[str, list[str]] = {}

    def claimer(name: str) -> None:
        s = _peer(tmp_path)
        mine = got.setdefault(name, [])
        while ids := s.claim(name, 3, lease=60):
            mine += ids
            s.release(ids, name)
        s.close()

    threads = [threading.Thread(target=claimer, args=(f"w{i}",)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    every = [i for ids in got.values() for i in ids]
    assert sorted(every) == [f"j{n:03d}" for n in range(60)]  # all, none twice


def test_status_reads_a_manifest_from_before_claims(tmp_path):
    import sqlite3

    store = RunStore.open(tmp_path / "run")
    store.close()
    con = sqlite3.connect(tmp_path / "run" / "manifest.sqlite")
    con.executescript("DROP TABLE claims; DROP TABLE workers; DELETE FROM _migrations WHERE name = '005_claims';")
    con.close()
    with RunStore.open(tmp_path / "run", create=False, lock=False) as old:
        assert old.status()["workers"] == []
