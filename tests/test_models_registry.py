"""Profiles, capabilities, manifest, missing-weight messages and ``python -m backend models`` (no downloads)."""

from __future__ import annotations

import json

import pytest
import torch

from backend.errors import InputError, ModelUnavailable
from backend.models import cli as models_cli
from backend.models import registry
from backend.models.clip import ClipModel
from backend.models.mapper import Mapper
from backend.models.svr import SVRModel

WORKFLOWS = {"diagnostic", "text-to-shape", "stylize", "gallery", "image-to-shape"}


@pytest.fixture(autouse=True)
def _one_thread(_torch_threads):
    """One intra-op thread: on 2 shared, busy cores, 2 OpenMP threads spin-wait and run ~40x slower."""
    torch.set_num_threads(1)
    yield



@pytest.fixture(autouse=True)
def _fresh_cache(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("STEPSTONE_MODELS_DIR", str(tmp_path / "user-models"))
    monkeypatch.setenv("STEPSTONE_SD_MODEL", "stepstone-test/no-such-diffusion-model")
    monkeypatch.delenv("STEPSTONE_PROFILE", raising=False)
    registry.clear_cache()
    yield
    registry.clear_cache()


@pytest.fixture
def empty_starter(tmp_path, monkeypatch):
    d = tmp_path / "starter"
    d.mkdir()
    monkeypatch.setenv("STEPSTONE_STARTER_DIR", str(d))
    return d


@pytest.fixture
def partial_starter(empty_starter):
    """A starter folder with CLIP, SVR and mapper trained (here: tiny random ones), written as the trainers do."""
    clip = ClipModel.tiny()
    clip.save(empty_starter / "clip")
    SVRModel.tiny().save(empty_starter / "svr")
    mapper = Mapper.tiny()
    mapper.save(empty_starter / "mapper")
    for kind in ("clip", "svr", "mapper"):
        registry.write_manifest_entry(kind, f"python -m backend train {kind} --seed 0", seed=0, root=empty_starter)
    return empty_starter, mapper


def test_load_profile_default_env_and_unknown(monkeypatch):
    assert registry.load_profile(None).name == "starter"
    monkeypatch.setenv("STEPSTONE_PROFILE", "tiny")
    prof = registry.load_profile(None, device="cpu")
    assert prof.name == "tiny" and prof.device == "cpu"
    with pytest.raises(InputError, match="known profiles: starter, pretrained, tiny"):
        registry.load_profile("huge")


def test_tiny_capabilities_all_available():
    caps = registry.load_profile("tiny").capabilities()
    assert set(caps) == WORKFLOWS
    for wf, cap in caps.items():
        assert cap["available"], (wf, cap["reason"])
        for values in cap["options"].values():
            assert all(v["available"] for v in values.values())
    assert set(caps["stylize"]["options"]["mode"]) == {"texture", "shape", "sds"}
    assert set(caps["text-to-shape"]["options"]["quality"]) == {"fast", "refined"}
    json.dumps(caps)  # goes into `welcome` as JSON


def test_starter_without_weights_says_what_to_run(empty_starter):
    caps = registry.load_profile("starter").capabilities()
    assert caps["diagnostic"]["available"]
    for wf in WORKFLOWS - {"diagnostic"}:
        assert not caps[wf]["available"]
        assert "starter weights missing" in caps[wf]["reason"]
        assert "python -m backend train" in caps[wf]["reason"]


def test_capabilities_follow_the_files(partial_starter):
    prof = registry.load_profile("starter")
    caps = prof.capabilities()
    t2s = caps["text-to-shape"]
    assert t2s["available"] and t2s["reason"] == ""
    assert t2s["options"]["quality"]["fast"]["available"]
    refined = t2s["options"]["quality"]["refined"]
    assert not refined["available"] and "diffusion" in refined["reason"]
    assert "python -m backend models download diffusion" in refined["reason"]
    assert not t2s["options"]["diversity"]["prior"]["available"]
    mode = caps["stylize"]["options"]["mode"]
    assert mode["texture"]["available"] and mode["shape"]["available"] and not mode["sds"]["available"]
    assert caps["image-to-shape"]["available"]  # through the SVR encoder
    assert caps["image-to-shape"]["options"]["method"]["svr"]["available"]
    assert not caps["image-to-shape"]["options"]["method"]["cisp"]["available"]
    assert not caps["gallery"]["available"]


def test_starter_models_load_through_the_registry_and_are_cached(partial_starter):
    _, mapper = partial_starter
    prof = registry.load_profile("starter")
    loaded = prof.mapper()
    assert loaded is registry.load_profile("starter").mapper()  # the model cache
    f = torch.randn(3, mapper.config.in_dim)
    assert torch.allclose(loaded(f), mapper(f))
    clip = prof.clip()
    assert clip.embed_dim == loaded.config.in_dim


def test_missing_weight_is_a_clear_message(partial_starter):
    root, _ = partial_starter
    with pytest.raises(ModelUnavailable) as err:
        registry.load_profile("starter").prior()
    msg = err.value.message
    assert str(root / "prior" / "config.json") in msg
    assert "python -m backend train prior" in msg
    assert err.value.code == "model_unavailable"


def test_manifest_records_hashes_and_detects_tampering(partial_starter, capsys):
    root, _ = partial_starter
    manifest = json.loads((root / "manifest.json").read_text())
    entry = manifest["models"]["mapper"]
    assert entry["command"] == "python -m backend train mapper --seed 0" and entry["seed"] == 0
    assert set(entry["files"]) == {"config.json", "model.safetensors"}
    assert all(len(v["sha256"]) == 64 for v in entry["files"].values())
    assert registry.verify_manifest_entry("mapper", root)[0]

    weights = root / "mapper" / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF
    weights.write_bytes(bytes(data))
    ok, detail = registry.verify_manifest_entry("mapper", root)
    assert not ok and "sha256" in detail
    assert models_cli.main(["check"]) == 1
    out = capsys.readouterr().out
    assert "ok       clip" in out and "ok       svr" in out
    assert "MISSING  mapper" in out and "sha256" in out
    assert "MISSING  diffusion" in out and "python -m backend models download diffusion" in out


def test_models_check_tiny_loads_everything(capsys):
    assert models_cli.main(["check", "--profile", "tiny", "--load"]) == 0
    out = capsys.readouterr().out
    for kind in registry.KINDS:
        assert f"ok       {kind}" in out
    assert "loads" in out and "text-to-shape   available" in out


def test_models_list(empty_starter, capsys):
    assert models_cli.main(["list"]) == 0
    out = capsys.readouterr().out
    assert "starter:" in out and "pretrained:" in out and "tiny:" in out
    assert "(no public weights)" in out


def test_pretrained_offline_is_honest(capsys):
    prof = registry.load_profile("pretrained")
    comps = prof.components()
    assert not comps["svr"].public and not comps["mapper"].public
    if not comps["clip"].present:
        with pytest.raises(ModelUnavailable, match="python -m backend models download clip"):
            prof.clip()
        assert models_cli.main(["download", "clip"]) == 2
        err = capsys.readouterr().err
        assert "HF_HUB_OFFLINE=1" in err and "open_clip" in err and "python -m backend models download clip" in err
    caps = prof.capabilities()
    # issue 13: text to shape takes the Shap-E route (a public download), not the ISS models without public weights
    assert "no public weights" not in caps["text-to-shape"]["reason"]
    if not comps["shap-e"].present:
        assert "python -m backend models download shap-e" in caps["text-to-shape"]["reason"]
        assert "python -m backend models download shap-e-img2img" in caps["image-to-shape"]["reason"]
    assert models_cli.main(["download", "diffusion"]) == 2
    err = capsys.readouterr().err
    assert "stepstone-test/no-such-diffusion-model" in err and "models download diffusion" in err


def test_pretrained_uses_user_trained_parts(tmp_path):
    SVRModel.tiny().save(tmp_path / "user-models" / "pretrained" / "svr")
    prof = registry.load_profile("pretrained")
    assert prof.component("svr").present
    assert isinstance(prof.svr(), SVRModel)


def test_starter_uses_a_downloaded_diffusion_model(partial_starter, tmp_path, monkeypatch):
    from backend.models.diffusion import DiffusionBundle

    DiffusionBundle.tiny().save_pretrained(tmp_path / "sd")
    monkeypatch.setenv("STEPSTONE_SD_MODEL", str(tmp_path / "sd"))
    prof = registry.load_profile("starter")
    caps = prof.capabilities()
    assert caps["text-to-shape"]["options"]["quality"]["refined"]["available"]
    assert caps["stylize"]["options"]["mode"]["sds"]["available"]
    bundle = prof.diffusion()
    assert bundle.source == str(tmp_path / "sd") and bundle.vae is None
    assert prof.diffusion() is bundle
