"""``python -m backend bench transport``: how fast a mesh gets from the backend into the client, on loopback.

For meshes of 100k and 1M faces (vertices float32, faces uint32, colours uint8, normals float32: ~25 MB for 1M
faces) it measures, in the same run:

* floor: a plain in-process numpy copy of the same arrays;
* Stepstone: a real backend subprocess streams the mesh (``diagnostic`` workflow, ``faces`` option) to a real
  :class:`shared.client.Client`; the time runs from the moment the pipeline made the mesh (``info.t_created``)
  until the client holds the decoded, authenticated arrays (hand-off to the I/O thread, HMAC, ZeroMQ,
  zero-copy decode). The client-side mesh validation (what Blender runs before ``foreach_set``) is timed apart;
* bare ZeroMQ (for reference): one raw PUSH/PULL message of the same size between two processes, no protocol;
* HTTP + base64 GLB: the route a popular 3D-generation add-on uses: export GLB (trimesh), base64 into JSON,
  serve over HTTP on loopback (``http.server``), download (``urllib``), decode base64, load the GLB (trimesh).

It prints seconds, MB/s and the ratios (goal: within 3x of the floor, at least 20x faster than HTTP + base64).
"""

from __future__ import annotations

import argparse
import base64
import io
import json
import os
import statistics
import tempfile
import threading
import time
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np


def _mesh(faces: int):
    from backend.pipelines.diagnostic import torus_mesh

    v, f, n, c = torus_mesh(0.5, faces)
    return {"vertices": v, "faces": f, "colors": c, "normals": n}


def _nbytes(arrays: dict) -> int:
    return sum(a.nbytes for a in arrays.values())


def bench_floor(arrays: dict, repeats: int) -> float:
    """Median seconds for a numpy copy of every array."""
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        copies = [np.array(a, copy=True) for a in arrays.values()]
        times.append(time.perf_counter() - t)
        del copies
    return statistics.median(times)


def bench_stepstone(faces_list: list[int], repeats: int, workdir: Path) -> dict[int, dict]:
    """Median delivery seconds per size through a real backend subprocess and client."""
    from backend.selftest import BackendProcess
    from shared import protocol as P
    from shared.mesh import validate_mesh

    out: dict[int, dict] = {}
    with BackendProcess(workdir, profile="tiny", device="cpu") as backend:
        client = backend.client(name="bench", validate_meshes=False, credit_bytes=256 * 1024 * 1024)
        try:
            for faces in faces_list:
                # meshes spaced out so none coalesces; the first one of each size is a warm-up
                client.submit("diagnostic", {"faces": faces, "steps": repeats + 1, "delay": 0.4})
                lat, val, nbytes = [], [], 0
                end = time.monotonic() + 300
                finished = False
                while not finished and time.monotonic() < end:
                    for m in client.poll(100, time_budget_s=1.0):
                        now = time.time()
                        if m.kind == P.MESH and not m.fields["final"]:
                            if m.fields["info"]["step"] > 1:
                                lat.append(now - m.fields["info"]["t_created"])
                                t = time.perf_counter()
                                a = m.arrays
                                validate_mesh(a["vertices"], a["faces"], a.get("colors"), a.get("normals"))
                                val.append(time.perf_counter() - t)
                            nbytes = sum(a.nbytes for a in m.arrays.values())
                        elif m.kind in (P.FAILED, P.REJECTED, P.ERROR):
                            raise RuntimeError(f"backend said {m.kind}: {m.fields}")
                        elif m.kind == P.DONE:
                            finished = True
                if not lat:
                    raise RuntimeError("no mesh arrived from the backend")
                out[faces] = {"seconds": statistics.median(lat), "validate_s": statistics.median(val),
                              "bytes": nbytes, "n": len(lat)}
        finally:
            client.close()
    return out


_BARE_SENDER = """
import sys, time, zmq, numpy as np
port, nbytes, repeats = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
ctx = zmq.Context(); s = ctx.socket(zmq.PUSH); s.connect(f"tcp://127.0.0.1:{port}")
a = np.ones(nbytes, np.uint8)
for i in range(repeats + 1):
    time.sleep(0.3)
    s.send_multipart([repr(time.time()).encode(), memoryview(a)], copy=False)
s.close(linger=30000); ctx.term()
"""


def bench_bare_zmq(nbytes: int, repeats: int) -> float:
    """Median seconds for one raw ZeroMQ message of ``nbytes`` between two processes (no protocol, no threads):
    what the OS and ZeroMQ cost on this machine right now."""
    import subprocess
    import sys

    import zmq

    ctx = zmq.Context()
    pull = ctx.socket(zmq.PULL)
    port = pull.bind_to_random_port("tcp://127.0.0.1")
    proc = subprocess.Popen([sys.executable, "-c", _BARE_SENDER, str(port), str(nbytes), str(repeats)])
    lat = []
    try:
        for i in range(repeats + 1):
            if not pull.poll(60_000):
                raise RuntimeError("the bare ZeroMQ sender did not send")
            frames = pull.recv_multipart(copy=False)
            now = time.time()
            arr = np.frombuffer(frames[1].buffer, np.uint8)
            assert arr.nbytes == nbytes
            if i:
                lat.append(now - float(frames[0].bytes))
    finally:
        proc.wait(60)
        pull.close(0)
        ctx.term()
    return statistics.median(lat)


class _GLBHandler(BaseHTTPRequestHandler):
    arrays: dict = {}

    def do_GET(self) -> None:  # noqa: N802 (http.server API)
        import trimesh

        a = self.server.arrays  # type: ignore[attr-defined]
        mesh = trimesh.Trimesh(a["vertices"], a["faces"], vertex_colors=a["colors"], vertex_normals=a["normals"],
                               process=False)
        glb = mesh.export(file_type="glb")
        body = json.dumps({"format": "glb", "data": base64.b64encode(glb).decode("ascii")}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args) -> None:  # quiet
        pass


def bench_http(arrays: dict, repeats: int) -> float:
    """Median seconds for export GLB + base64 + HTTP on loopback + decode + load."""
    import trimesh

    srv = ThreadingHTTPServer(("127.0.0.1", 0), _GLBHandler)
    srv.arrays = arrays  # type: ignore[attr-defined]
    th = threading.Thread(target=srv.serve_forever, daemon=True)
    th.start()
    url = f"http://127.0.0.1:{srv.server_address[1]}/mesh"
    times = []
    try:
        for _ in range(repeats):
            t = time.perf_counter()
            with urllib.request.urlopen(url, timeout=300) as resp:
                payload = json.loads(resp.read())
            glb = base64.b64decode(payload["data"])
            mesh = trimesh.load(io.BytesIO(glb), file_type="glb", force="mesh", process=False)
            v = np.asarray(mesh.vertices, np.float32)
            f = np.asarray(mesh.faces, np.uint32)
            times.append(time.perf_counter() - t)
            assert len(f) == len(arrays["faces"]) and len(v) == len(arrays["vertices"])
    finally:
        srv.shutdown()
        srv.server_close()
    return statistics.median(times)


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="python -m backend bench transport", description=__doc__.split("\n")[0])
    p.add_argument("--faces", default="100000,1000000", help="comma-separated face counts")
    p.add_argument("--repeats", type=int, default=5, help="meshes timed per size (median reported)")
    p.add_argument("--http-repeats", type=int, default=2)
    p.add_argument("--no-http", action="store_true", help="skip the HTTP + base64 GLB baseline")
    args = p.parse_args(argv)
    faces_list = [int(x) for x in args.faces.split(",") if x.strip()]
    print(f"transport benchmark: sizes {faces_list} faces, {args.repeats} meshes each (median), loopback")
    meshes = {n: _mesh(n) for n in faces_list}
    floor = {n: bench_floor(meshes[n], max(args.repeats, 5)) for n in faces_list}
    with tempfile.TemporaryDirectory(prefix="stepstone-bench-") as d:
        ours = bench_stepstone(faces_list, args.repeats, Path(d))
    bare = {n: bench_bare_zmq(ours[n]["bytes"], args.repeats) for n in faces_list}
    http = {} if args.no_http else {n: bench_http(meshes[n], args.http_repeats) for n in faces_list}
    print()
    hdr = f"{'faces':>9} {'MB':>7} | {'numpy copy':>11} | {'bare zmq':>9} | {'Stepstone':>10} {'MB/s':>7} " \
          f"{'x floor':>8} {'x bare':>7} | {'validate':>9} | {'HTTP+b64 GLB':>12} {'x Stepstone':>11}"
    print(hdr)
    print("-" * len(hdr))
    ok = True
    for n in faces_list:
        mb = ours[n]["bytes"] / 1e6
        s = ours[n]["seconds"]
        ratio_floor = s / floor[n] if floor[n] > 0 else float("inf")
        line = (f"{n:>9,} {mb:>7.1f} | {floor[n] * 1e3:>8.2f} ms | {bare[n] * 1e3:>6.2f} ms | {s * 1e3:>7.2f} ms "
                f"{mb / s:>7.0f} {ratio_floor:>7.1f}x {s / bare[n]:>6.1f}x | {ours[n]['validate_s'] * 1e3:>6.2f} ms |")
        if n in http:
            line += f" {http[n]:>10.3f} s {http[n] / s:>10.0f}x"
            ok &= http[n] / s >= 20
        print(line)
        ok &= ratio_floor <= 3
    print()
    try:
        print(f"load average during the run: {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs")
    except OSError:  # pragma: no cover - not on every platform
        pass
    print("goal: Stepstone within 3x of the numpy-copy floor and >= 20x faster than HTTP + base64 GLB: "
          + ("met" if ok else "NOT met on this run"))
    return 0
