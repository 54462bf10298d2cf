"""The client against a hand-driven ROUTER socket (a real ZeroMQ peer speaking the protocol): handshake, credit,
heartbeats, liveness, incoming mesh validation, restart detection and errors a person can act on."""

from __future__ import annotations

import time

import numpy as np
import pytest
import zmq

from shared import protocol as P
from shared.client import CONNECTED, CONNECTING, DISCONNECTED, Client, ClientError

KEY = b"s" * 32


class Peer:
    """A minimal backend: a ROUTER that decodes what the client sends and answers what the test says."""

    def __init__(self) -> None:
        self.ctx = zmq.Context.instance()
        self.sock = self.ctx.socket(zmq.ROUTER)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.port = self.sock.bind_to_random_port("tcp://127.0.0.1")
        self.address = f"tcp://127.0.0.1:{self.port}"
        self.dec = P.Decoder(KEY, kinds=P.CLIENT_KINDS)
        self.routing = None

    def recv(self, kind=None, timeout=5.0) -> P.Message:
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            if self.sock.poll(50):
                frames = self.sock.recv_multipart()
                self.routing = frames[0]
                m = self.dec.decode(frames[1:])
                if kind is None or m.kind == kind:
                    return m
        raise TimeoutError(kind)

    def send(self, kind, fields=None, arrays=None) -> int:
        frames = P.encode(kind, fields or {}, arrays, key=KEY)
        self.sock.send_multipart([self.routing, *frames])
        return sum(len(f) if isinstance(f, bytes) else memoryview(f).nbytes for f in frames)

    def welcome(self, backend_id="b1") -> None:
        self.send(P.WELCOME, {"protocol": P.PROTOCOL_VERSION, "backend_id": backend_id, "profile": "tiny",
                              "device": "cpu", "capabilities": {"diagnostic": {"available": True}}})

    def close(self) -> None:
        self.sock.close(0)


def _poll_until(c: Client, pred, timeout=5.0) -> list[P.Message]:
    got = []
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        got += c.poll(20)
        if pred(got):
            return got
    raise TimeoutError([m.kind for m in got])


@pytest.fixture
def peer():
    p = Peer()
    yield p
    p.close()


@pytest.fixture
def client(peer):
    c = Client(peer.address, KEY, heartbeat_s=0.2, timeout_s=1.5, auto_reconnect=False, name="t")
    c.connect()
    hello = None
    end = time.monotonic() + 10
    while hello is None and time.monotonic() < end:  # the hello goes out once TCP is up, driven by poll()
        c.poll(20)
        if peer.sock.poll(0):
            hello = peer.recv(P.HELLO)
    assert hello is not None
    assert hello.fields["client"] == c.identity and hello.fields["protocol"] == P.PROTOCOL_VERSION
    assert hello.fields["credit"] == c.credit_bytes
    peer.welcome()
    _poll_until(c, lambda g: c.state == CONNECTED)
    yield c
    c.close()


def test_handshake_sets_state_and_welcome(client):
    assert client.state == CONNECTED and client.backend_id == "b1"
    assert client.welcome["profile"] == "tiny"


def test_requests_are_signed_and_carry_meshes(client, peer):
    v = np.array([[0, 0, 0], [1, 0, 0], [0, 1, 0]], np.float64)  # converted to float32 on the way
    rid = client.submit("diagnostic", {"steps": 2}, [{"name": "tri", "vertices": v, "faces": [[0, 1, 2]],
                                                      "matrix_world": np.eye(4)}])
    m = peer.recv(P.SUBMIT)
    assert m.id == rid and m.fields["workflow"] == "diagnostic" and m.fields["params"] == {"steps": 2}
    assert m.fields["meshes"] == [{"name": "tri", "matrix_world": np.eye(4).reshape(-1).tolist()}]
    assert m.arrays["mesh0.vertices"].dtype == np.float32 and m.arrays["mesh0.faces"].dtype == np.uint32
    client.cancel("j1")
    assert peer.recv(P.CANCEL).fields == {"job": "j1"}
    client.fetch("j1")
    assert peer.recv(P.FETCH).fields == {"job": "j1"}


def test_credit_is_given_back_for_consumed_messages(client, peer):
    n = peer.send(P.PROGRESS, {"job": "j", "stage": "s", "step": 1, "total": 2, "message": ""})
    n += peer.send(P.MESH, {"job": "j", "seq": 1, "final": False, "name": "r", "info": {}},
                   {"vertices": np.zeros((3, 3), np.float32), "faces": np.array([[0, 1, 2]], np.uint32)})
    got = _poll_until(client, lambda g: sum(m.kind in (P.PROGRESS, P.MESH) for m in g) == 2)
    assert [m.kind for m in got] == [P.PROGRESS, P.MESH]
    total = 0
    while total < n:
        total += peer.recv(P.CREDIT).fields["bytes"]
    assert total == n


def test_heartbeats_are_sent_and_silence_means_disconnected(client, peer):
    beats = 0
    end = time.monotonic() + 5
    while beats < 2 and time.monotonic() < end:  # the client sends them from poll(), as Blender's timer calls it
        client.poll(20)
        if peer.sock.poll(0):
            beats += peer.recv().kind == P.HEARTBEAT
    assert beats == 2
    t = time.monotonic()
    got = _poll_until(client, lambda g: any(m.kind == "disconnected" for m in g), timeout=10)
    assert time.monotonic() - t < 5
    assert client.state == DISCONNECTED and "heartbeat" in got[-1].fields["reason"]
    with pytest.raises(ClientError, match="not connected"):
        client.submit("diagnostic", {})


def test_bad_meshes_from_the_backend_are_dropped_with_an_error(client, peer):
    peer.send(P.MESH, {"job": "j", "seq": 1, "final": True, "name": "r", "info": {}},
              {"vertices": np.zeros((3, 3), np.float32), "faces": np.array([[0, 1, 9]], np.uint32)})
    peer.send(P.MESH, {"job": "j", "seq": 2, "final": True, "name": "r", "info": {}},
              {"vertices": np.array([[np.nan, 0, 0], [1, 0, 0], [0, 1, 0]], np.float32),
               "faces": np.array([[0, 1, 2]], np.uint32)})
    got = _poll_until(client, lambda g: len(g) >= 2)
    assert [m.kind for m in got] == [P.ERROR, P.ERROR]
    assert "past the last" in got[0].fields["message"] and "NaN" in got[1].fields["message"]


def test_forged_messages_from_the_backend_are_dropped(client, peer):
    frames = P.encode(P.DONE, {"job": "j"}, key=b"x" * 32)
    peer.sock.send_multipart([peer.routing, *frames])
    peer.send(P.PONG, {})
    got = _poll_until(client, lambda g: any(m.kind == P.PONG for m in g))
    assert [m.kind for m in got] == [P.PONG] and client.dropped == 1


def test_forgotten_session_says_hello_again_and_restart_is_detected(client, peer):
    peer.send(P.ERROR, {"code": "no_session", "message": "say hello first"})
    _poll_until(client, lambda g: client.state == CONNECTING)
    end = time.monotonic() + 5
    while not peer.sock.poll(0) and time.monotonic() < end:
        client.poll(20)
    peer.recv(P.HELLO)
    peer.welcome(backend_id="b2")
    got = _poll_until(client, lambda g: any(m.kind == P.WELCOME for m in g))
    assert [m.kind for m in got] == ["backend_restarted", P.WELCOME]
    assert got[0].fields == {"old": "b1", "new": "b2"} and client.backend_id == "b2"


def test_backend_bye_disconnects_at_once(client, peer):
    peer.send(P.BYE, {"reason": "signal SIGTERM"})
    got = _poll_until(client, lambda g: any(m.kind == "disconnected" for m in g), timeout=2)
    assert "shut down" in got[-1].fields["reason"] and "SIGTERM" in got[-1].fields["reason"]


def test_no_backend_is_reported_after_the_timeout(peer):
    c = Client("tcp://127.0.0.1:1", KEY, timeout_s=0.5, auto_reconnect=False)
    c.connect()
    got = _poll_until(c, lambda g: bool(g), timeout=5)
    assert got[0].kind == "disconnected" and "did not answer" in got[0].fields["reason"]
    c.close()


def test_poll_returns_within_its_budget(client, peer):
    for i in range(200):
        peer.send(P.PROGRESS, {"job": "j", "stage": "s", "step": i, "total": 200, "message": ""})
    time.sleep(0.3)
    first = client.poll(0, time_budget_s=0.0)  # a zero budget still makes progress, one message at a time
    assert len(first) >= 1
    rest = _poll_until(client, lambda g: len(first) + len(g) >= 200)
    steps = [m.fields["step"] for m in first + rest if m.kind == P.PROGRESS]
    assert steps == list(range(200))
