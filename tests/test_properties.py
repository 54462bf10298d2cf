"""Property-based fuzzing (hypothesis) of the two doors: the protocol decoder and the job-parameter parser. Whatever
bytes or JSON arrive, they raise only their own clear error (ProtocolError / StepstoneError) or yield values
within the limits."""

from __future__ import annotations

import json
import math

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from backend.errors import StepstoneError
from backend.intake import MAX_INT, parse_params
from backend.jobs import JobManager, JobStore
from shared import protocol as P

KEY = b"p" * 32
SETTINGS = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])

numbers = st.one_of(st.integers(), st.just(10**400), st.just(-(2**70)), st.floats(allow_nan=True,
                                                                                   allow_infinity=True))
scalars = st.one_of(st.none(), st.booleans(), numbers, st.text(max_size=30))
json_values = st.recursive(scalars, lambda kids: st.one_of(st.lists(kids, max_size=5),
                                                           st.dictionaries(st.text(max_size=10), kids, max_size=5)),
                           max_leaves=40)


def _finite(obj) -> bool:
    stack = [obj]
    while stack:
        o = stack.pop()
        if isinstance(o, dict):
            stack.extend(o.values())
        elif isinstance(o, list):
            stack.extend(o)
        elif isinstance(o, float) and not math.isfinite(o):
            return False
        elif isinstance(o, int) and not isinstance(o, bool) and abs(o) >= 10**19:
            return False
    return True


@SETTINGS
@given(st.lists(st.binary(max_size=300), max_size=6))
def test_decoder_refuses_arbitrary_frames_with_a_protocol_error(frames):
    try:
        P.Decoder(KEY).decode(frames)
    except P.ProtocolError as exc:
        assert exc.code and exc.message
    else:  # only a correctly signed header passes, and random bytes are not one
        pytest.fail("random frames were accepted")


metas = st.lists(st.fixed_dictionaries({"name": st.one_of(st.text(max_size=5), scalars),
                                        "dtype": st.sampled_from(["float32", "uint8", "object", "int64", "x"]),
                                        "shape": st.one_of(st.lists(numbers, max_size=5), scalars),
                                        "nbytes": numbers}), max_size=3)


@SETTINGS
@given(kind=st.one_of(st.sampled_from(sorted(P.ALL_KINDS)), scalars), fields=json_values, arrays=metas,
       ts=st.one_of(st.just("now"), numbers, scalars), frames=st.lists(st.binary(max_size=64), max_size=3),
       mid=st.one_of(st.text(min_size=1, max_size=70), scalars))
def test_decoder_on_signed_arbitrary_headers_yields_bounded_values_or_a_protocol_error(kind, fields, arrays, ts,
                                                                                       frames, mid):
    import time

    header = {"v": P.PROTOCOL_VERSION, "kind": kind, "id": mid, "ts": time.time() if ts == "now" else ts,
              "fields": fields, "arrays": arrays}
    h = json.dumps(header).encode()
    try:
        msg = P.Decoder(KEY).decode([P.sign(KEY, h), h, *frames])
    except P.ProtocolError as exc:
        assert exc.code
        return
    assert isinstance(msg.fields, dict) and _finite(msg.fields)
    assert all(a.nbytes == len(f) for a, f in zip(msg.arrays.values(), frames))


@SETTINGS
@given(st.one_of(json_values, st.dictionaries(st.text(max_size=12), json_values, max_size=8)))
def test_parameter_parser_bounds_or_refuses(params):
    try:
        out = parse_params("diagnostic", params)
    except StepstoneError as exc:
        assert exc.message
        return
    assert isinstance(out, dict) and _finite(out)
    assert all(abs(v) <= MAX_INT for v in out.values() if isinstance(v, int))


@pytest.fixture(scope="module")
def manager(tmp_path_factory):
    m = JobManager(JobStore(tmp_path_factory.mktemp("prop-store")), profile=None, device="cpu", backend_id="p",
                   emit=lambda *a: None)
    yield m
    m.shutdown(timeout_s=5)


param_keys = st.sampled_from(["steps", "resolution", "delay", "faces", "seed", "prompt", "variants", "iterations",
                              "views", "render_resolution", "n_samples", "tau", "count", "subjects", "preset",
                              "config", "strength", "image_png", "quality", "method"])


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow,
                                                                  HealthCheck.function_scoped_fixture])
@given(workflow=st.sampled_from(["diagnostic", "text-to-shape", "stylize", "gallery", "image-to-shape"]),
       params=st.dictionaries(param_keys, json_values, max_size=6))
def test_every_workflow_validates_arbitrary_params_into_a_job_or_a_clear_error(manager, workflow, params):
    try:
        out = manager.validate(workflow, params, [])
    except StepstoneError as exc:
        assert exc.code != "internal" and exc.message
        return
    assert isinstance(out, dict)
