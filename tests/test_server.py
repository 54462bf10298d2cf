"""The job server, against a real backend subprocess on real sockets: streaming, rejection of bad input, many jobs
with random cancels from two clients, flow control and coalescing, a crash (SIGKILL) noticed within the heartbeat
window, restart with results still fetchable, and a clean SIGTERM."""

from __future__ import annotations

import random
import signal
import time

import numpy as np
import pytest
import trimesh

from backend.selftest import BackendProcess, accepted_job, collect, is_terminal_for
from shared import protocol as P
from shared.client import CONNECTED, DISCONNECTED, Client


@pytest.fixture(scope="module")
def backend(tmp_path_factory):
    with BackendProcess(tmp_path_factory.mktemp("server-backend")) as b:
        yield b


@pytest.fixture
def client(backend):
    c = backend.client(name="test")
    yield c
    c.close()


def _run_job(c: Client, params: dict, timeout_s: float = 60) -> tuple[str, list[P.Message]]:
    ref = c.submit("diagnostic", params)
    msgs = collect(c, lambda m: m.kind == P.REJECTED and m.fields.get("ref") == ref
                   or (m.kind in P.TERMINAL_KINDS), timeout_s)
    job = accepted_job(msgs, ref)
    if not is_terminal_for(job)(msgs[-1]):
        msgs += collect(c, is_terminal_for(job), timeout_s)
    return job, msgs


def test_welcome_carries_profile_device_and_capabilities(client, backend):
    w = client.welcome
    assert w["protocol"] == P.PROTOCOL_VERSION
    assert w["profile"] == "tiny" and w["device"] == "cpu"
    assert w["capabilities"]["diagnostic"]["available"] is True
    for name in ("text-to-shape", "stylize", "gallery", "image-to-shape"):
        assert name in w["capabilities"]
    assert client.backend_id == w["backend_id"]


def test_diagnostic_job_streams_meshes_then_final_then_done(client, backend):
    job, msgs = _run_job(client, {"steps": 4, "resolution": 20, "delay": 0.1})
    kinds = [m.kind for m in msgs if m.fields.get("job") == job]
    assert kinds[0] == P.ACCEPTED
    assert kinds[-1] == P.DONE
    meshes = [m for m in msgs if m.kind == P.MESH]
    inter = [m for m in meshes if not m.fields["final"]]
    final = [m for m in meshes if m.fields["final"]]
    assert len(inter) >= 1 and len(final) == 1
    assert kinds.index(P.MESH) < kinds.index(P.DONE) and kinds[-2] == P.MESH  # final arrives before done
    seqs = [m.fields["seq"] for m in meshes]
    assert seqs == sorted(seqs) and len(set(seqs)) == len(seqs)
    progress = [m for m in msgs if m.kind == P.PROGRESS]
    assert progress and progress[-1].fields["total"] == 4
    f = final[0]
    assert f.fields["name"] == "diagnostic"
    assert f.arrays["vertices"].dtype == np.float32 and f.arrays["faces"].dtype == np.uint32
    assert f.arrays["colors"].dtype == np.uint8 and f.arrays["colors"].shape == (len(f.arrays["vertices"]), 3)
    mesh = trimesh.Trimesh(f.arrays["vertices"], f.arrays["faces"], process=False)
    assert mesh.is_watertight and mesh.volume > 0
    # the job folder holds the request, the events log and the final GLB
    d = backend.store / job
    assert (d / "request.json").is_file() and (d / "events.jsonl").is_file() and (d / "diagnostic.glb").is_file()
    done = msgs[-1]
    assert done.fields["results"] == ["diagnostic"]


@pytest.mark.parametrize(
    "meshes, params, workflow, needle",
    [
        ([{"name": "nan", "vertices": [[0, 0, 0], [1, 0, float("nan")], [0, 1, 0]], "faces": [[0, 1, 2]]}], {},
         "diagnostic", "NaN"),
        ([{"name": "oob", "vertices": [[0, 0, 0], [1, 0, 0], [0, 1, 0]], "faces": [[0, 1, 7]]}], {},
         "diagnostic", "past the last"),
        ([{"name": "quads", "vertices": np.zeros((4, 3)), "faces": np.array([[0, 1, 2, 3]])}], {},
         "diagnostic", "triangulate"),
        ([{"name": "empty", "vertices": np.zeros((0, 3)), "faces": np.zeros((0, 3))}], {}, "diagnostic", "empty"),
        (None, {"steps": "many"}, "diagnostic", "integer"),
        (None, {"steps": 10**9}, "diagnostic", "between"),
        (None, {"stepz": 3}, "diagnostic", "unknown option"),
        (None, {}, "teleport", "unknown workflow"),
    ],
)
def test_bad_requests_are_rejected_with_a_clear_message(client, meshes, params, workflow, needle):
    ref = client.submit(workflow, params, meshes)
    m = collect(client, lambda m: m.fields.get("ref") == ref and m.kind in (P.ACCEPTED, P.REJECTED), 20)[-1]
    assert m.kind == P.REJECTED
    assert m.fields["code"] == "bad_input"
    assert needle in m.fields["message"], m.fields["message"]
    client.ping()  # still serving
    assert collect(client, lambda m: m.kind == P.PONG, 10)


def test_two_clients_twenty_jobs_random_cancels_each_end_exactly_once(backend):
    rng = random.Random(1234)
    a, b = backend.client(name="a"), backend.client(name="b")
    try:
        refs: dict[str, Client] = {}
        for i in range(20):
            c = a if i % 2 == 0 else b
            params = {"steps": rng.randint(2, 5), "resolution": 12, "delay": rng.choice([0.0, 0.02, 0.05])}
            refs[c.submit("diagnostic", params)] = c
        jobs: dict[str, Client] = {}
        terminal: dict[str, list[str]] = {}
        after_terminal: list[str] = []
        errors: list[dict] = []
        cancelled_asked: set[str] = set()
        end = time.monotonic() + 120
        while time.monotonic() < end and (len(jobs) < 20 or any(j not in terminal for j in jobs)):
            for c in (a, b):
                for m in c.poll(5, 0.05):
                    job = m.fields.get("job")
                    if m.kind == P.ACCEPTED:
                        assert m.fields["ref"] in refs and refs[m.fields["ref"]] is c
                        jobs[job] = c
                        if rng.random() < 0.4:  # cancel some while queued...
                            c.cancel(job)
                            cancelled_asked.add(job)
                    elif m.kind == P.REJECTED:
                        pytest.fail(f"rejected: {m.fields}")
                    elif m.kind in P.TERMINAL_KINDS:
                        terminal.setdefault(job, []).append(m.kind)
                    elif m.kind == P.ERROR:
                        errors.append(m.fields)
                    elif job in terminal:
                        after_terminal.append(m.kind)
                    if m.kind == P.MESH and job not in cancelled_asked and rng.random() < 0.3:
                        (a if jobs.get(job) is a else b).cancel(job)  # ...and some while running
                        cancelled_asked.add(job)
        assert len(jobs) == 20
        assert set(terminal) == set(jobs), "every job reaches a terminal state"
        assert all(len(v) == 1 for v in terminal.values()), terminal  # exactly one
        assert not after_terminal
        states = [v[0] for v in terminal.values()]
        assert "cancelled" in states and "done" in states
        assert all(jobs[j] is not None for j in terminal)
        for e in errors:  # the only errors allowed: cancelling a job that had just finished
            assert e["code"] == "already_finished", e
        # a cancel of a finished job is answered, and does not produce a second terminal event
        done_job = next(j for j, v in terminal.items() if v == ["done"])
        jobs[done_job].cancel(done_job)
        m = collect(jobs[done_job], lambda m: m.kind in (P.ERROR,) + tuple(P.TERMINAL_KINDS), 10)[-1]
        assert m.kind == P.ERROR and m.fields["code"] == "already_finished"
        # the store agrees with what the clients saw
        a.list_jobs()
        listed = {j["job"]: j["state"] for j in collect(a, lambda m: m.kind == P.JOBS, 10)[-1].fields["jobs"]}
        for j, v in terminal.items():
            assert listed[j] == v[0]
    finally:
        a.close()
        b.close()


def test_slow_client_gets_coalesced_intermediates_but_every_final(backend):
    """A client that does not read while a job streams 40 meshes holds at most its credit window in flight;
    the queued intermediates coalesce (newest wins), and the final mesh and done still arrive."""
    slow = backend.client(name="slow", credit_bytes=64 * 1024)
    try:
        ref = slow.submit("diagnostic", {"steps": 40, "resolution": 28})
        time.sleep(4.0)  # not reading (like a busy Blender); the job finishes meanwhile
        msgs = collect(slow, lambda m: m.kind in P.TERMINAL_KINDS, 60)
        job = accepted_job(msgs, ref)
        assert msgs[-1].kind == P.DONE and msgs[-1].fields["job"] == job
        inter = [m for m in msgs if m.kind == P.MESH and not m.fields["final"]]
        final = [m for m in msgs if m.kind == P.MESH and m.fields["final"]]
        assert len(final) == 1
        assert 1 <= len(inter) < 40
        steps = [m.fields["info"]["step"] for m in inter]
        assert steps == sorted(steps)
        progress = [m for m in msgs if m.kind == P.PROGRESS]
        assert progress and len(progress) < 40 and progress[-1].fields["step"] == 40  # newest progress kept
        assert slow.state == CONNECTED
    finally:
        slow.close()


def test_fetch_of_a_running_job_subscribes_a_second_client(backend):
    a, b = backend.client(name="owner"), backend.client(name="watcher")
    try:
        ref = a.submit("diagnostic", {"steps": 30, "resolution": 12, "delay": 0.05})
        msgs = collect(a, lambda m: m.kind == P.MESH, 30)
        job = accepted_job(msgs, ref)
        b.fetch(job)
        got = collect(b, is_terminal_for(job), 60)
        res = [m for m in got if m.kind == P.RESULT][0]
        assert res.fields["summary"]["state"] in ("running", "queued")
        assert any(m.kind == P.MESH and m.fields["final"] for m in got)
        assert got[-1].kind == P.DONE
        collect(a, is_terminal_for(job), 30)
    finally:
        a.close()
        b.close()


def test_crash_restart_and_results_from_disk(tmp_path):
    """SIGKILL mid-job: the client notices within its heartbeat window; the restarted backend has a new id,
    reports the in-flight job failed with the reason, and still serves the finished job's result from disk."""
    work = tmp_path / "crash"
    b1 = BackendProcess(work, heartbeat_s=0.5).start()
    c = b1.client(name="crash", heartbeat_s=0.5, timeout_s=4.0)
    try:
        finished, msgs = _run_job(c, {"steps": 3, "resolution": 24})
        streamed = [m for m in msgs if m.kind == P.MESH and m.fields["final"]][0]
        v0 = np.array(streamed.arrays["vertices"])
        f0 = np.array(streamed.arrays["faces"])
        c0 = np.array(streamed.arrays["colors"])
        old_id = c.backend_id

        ref = c.submit("diagnostic", {"steps": 500, "resolution": 12, "delay": 0.05})
        msgs = collect(c, lambda m: m.kind == P.MESH, 30)
        inflight = accepted_job(msgs, ref)
        b1.kill()
        t_kill = time.monotonic()
        msgs = collect(c, lambda m: m.kind == "disconnected", 30)
        noticed = time.monotonic() - t_kill
        assert c.state == DISCONNECTED and "heartbeat" in msgs[-1].fields["reason"]
        assert noticed < c.timeout_s + 2.0, noticed  # within the heartbeat window (plus scheduling slack)

        b2 = BackendProcess(work, heartbeat_s=0.5).start()  # same store, same connection-file path
        try:
            msgs = collect(c, lambda m: m.kind == P.WELCOME, 60)  # the client re-reads the connection file
            restarted = [m for m in msgs if m.kind == "backend_restarted"]
            assert restarted and restarted[0].fields == {"old": old_id, "new": c.backend_id}
            assert c.backend_id != old_id and c.state == CONNECTED
            c.list_jobs()
            listed = {j["job"]: j for j in collect(c, lambda m: m.kind == P.JOBS, 10)[-1].fields["jobs"]}
            assert listed[finished]["state"] == "done"
            assert listed[inflight]["state"] == "failed"
            assert listed[inflight]["error"]["code"] == "backend_restarted"
            assert old_id in listed[inflight]["error"]["message"]
            c.fetch(finished)
            msgs = collect(c, lambda m: m.kind == P.MESH and m.fields.get("replay"), 30)
            res = [m for m in msgs if m.kind == P.RESULT][0]
            assert res.fields["summary"]["state"] == "done"
            got = msgs[-1]
            np.testing.assert_array_equal(got.arrays["faces"], f0)
            np.testing.assert_allclose(got.arrays["vertices"], v0, atol=1e-6)
            np.testing.assert_array_equal(got.arrays["colors"][:, :3], c0)
            c.fetch(inflight)
            res = collect(c, lambda m: m.kind == P.RESULT, 10)[-1]
            assert res.fields["summary"]["state"] == "failed"

            # SIGTERM: clean exit, connection file removed, the client is told at once
            b2.proc.send_signal(signal.SIGTERM)
            msgs = collect(c, lambda m: m.kind == "disconnected", 30)
            assert "shut down" in msgs[-1].fields["reason"]
            assert b2.wait(30) == 0
            assert not b2.connection_file.exists()
        finally:
            b2.kill()
    finally:
        c.close()
        b1.kill()


def test_sigterm_fails_the_running_job_and_tells_the_client(tmp_path):
    b = BackendProcess(tmp_path / "term").start()
    c = b.client(name="term")
    try:
        ref = c.submit("diagnostic", {"steps": 500, "resolution": 12, "delay": 0.05})
        msgs = collect(c, lambda m: m.kind == P.MESH, 30)
        job = accepted_job(msgs, ref)
        b.proc.send_signal(signal.SIGINT)
        msgs = collect(c, lambda m: m.kind == "disconnected", 30)
        failed = [m for m in msgs if m.kind == P.FAILED and m.fields["job"] == job]
        assert failed and failed[0].fields["code"] == "backend_shutdown"
        assert b.wait(30) == 0
    finally:
        c.close()
        b.kill()


def test_remote_binding_needs_the_flag(tmp_path):
    import subprocess
    import sys

    from backend.selftest import ROOT

    r = subprocess.run([sys.executable, "-m", "backend", "serve", "--host", "0.0.0.0", "--connection-file",
                        str(tmp_path / "c.json"), "--store", str(tmp_path / "jobs")],
                       cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert r.returncode == 2
    assert "--allow-remote" in r.stdout and "CurveZMQ" in r.stdout
    assert not (tmp_path / "c.json").exists()


def test_remote_backend_encrypts_with_curve(tmp_path):
    import zmq

    if not zmq.has("curve"):
        pytest.skip("libzmq without CurveZMQ")
    b = BackendProcess(tmp_path / "remote", extra_args=["--host", "0.0.0.0", "--allow-remote",
                                                         "--advertise", "127.0.0.1"]).start()
    try:
        from shared.connection import read_connection_file

        info = read_connection_file(b.connection_file)
        assert info["curve_server_key"] and len(info["curve_server_key"]) == 40
        c = b.client(name="curve")  # from the connection file: CurveZMQ with the server's public key
        try:
            c.ping()
            assert collect(c, lambda m: m.kind == P.PONG, 20)
        finally:
            c.close()
        # the right HMAC key but no CurveZMQ: the handshake never completes
        plain = Client(info["address"], info["key"], timeout_s=2.0, auto_reconnect=False)
        plain.connect()
        msgs = collect(plain, lambda m: m.kind in ("disconnected", P.WELCOME), 20)
        assert msgs[-1].kind == "disconnected" and plain.state == DISCONNECTED
        plain.close()
    finally:
        b.terminate()
        b.kill()
