"""The project's own networks: mapper M, diffusion prior, SVR, CISP; each saves and loads through io.py."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from backend.errors import InputError, ModelUnavailable
from backend.models.cisp import CISP
from backend.models.mapper import Mapper, MapperConfig
from backend.models.prior import DiffusionPrior
from backend.models.svr import SVRModel


@pytest.fixture(autouse=True)
def _one_thread(_torch_threads):
    """One intra-op thread: on 2 shared, busy cores, 2 OpenMP threads spin-wait and run ~40x slower."""
    torch.set_num_threads(1)
    yield



def _same_state(a: nn.Module, b: nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


@pytest.mark.parametrize("cls", [Mapper, DiffusionPrior, SVRModel, CISP], ids=lambda c: c.__name__)
def test_save_load_roundtrip(cls, tmp_path):
    model = cls.tiny()
    model.save(tmp_path / "m")
    meta = json.loads((tmp_path / "m" / "config.json").read_text())
    assert meta["format"] == 1 and meta["config"]
    again = cls.load(tmp_path / "m")
    assert type(again.config) is type(model.config) and again.config == model.config
    assert _same_state(model, again)
    assert not again.training


def test_load_errors_are_actionable(tmp_path):
    with pytest.raises(ModelUnavailable, match="config.json is missing.*train mapper"):
        Mapper.load(tmp_path / "none", fetch_hint="Run `python -m backend train mapper`.")
    Mapper.tiny().save(tmp_path / "m")
    with pytest.raises(ModelUnavailable, match="'mapper' model, expected 'prior'"):
        DiffusionPrior.load(tmp_path / "m")
    cfg = json.loads((tmp_path / "m" / "config.json").read_text())
    cfg["config"]["hidden"] = 64
    (tmp_path / "m" / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ModelUnavailable, match="do not match its config.json"):
        Mapper.load(tmp_path / "m")


def test_tiny_models_are_deterministic():
    assert _same_state(Mapper.tiny(), Mapper.tiny())
    assert _same_state(CISP.tiny(), CISP.tiny())


def test_mapper_matches_iss_sec_3_3_1():
    m = Mapper(MapperConfig(in_dim=64, out_dim=16, hidden=128))
    linears = [x for x in m.net if isinstance(x, nn.Linear)]
    acts = [x for x in m.net if isinstance(x, nn.LeakyReLU)]
    assert len(linears) == 12 and len(acts) == 11
    assert all(a.negative_slope == 0.02 for a in acts)
    w = torch.cat([l.weight.flatten() for l in linears[1:-1]])
    he_std = (2.0 / (1 + 0.02 ** 2) / 128) ** 0.5  # He init for LeakyReLU(0.02), fan-in 128
    assert abs(w.std().item() - he_std) < 0.01 and abs(w.mean().item()) < 0.005
    assert all(torch.count_nonzero(l.bias) == 0 for l in linears)
    # the signal keeps its scale through the 12 layers (ISS's N(0, 0.02) init shrinks it ~10x per layer)
    x = torch.randn(256, 64)
    with torch.no_grad():
        assert 0.1 < m(x).std().item() / x.std().item() < 10
        iss = Mapper(MapperConfig(in_dim=64, out_dim=16, hidden=128, init="normal"))
        w_iss = torch.cat([l.weight.flatten() for l in iss.net if isinstance(l, nn.Linear)])
        assert abs(w_iss.std().item() - 0.02) < 0.002
        assert iss(x).std().item() / x.std().item() < 1e-6
    assert m(torch.randn(5, 64)).shape == (5, 16)
    with pytest.raises(InputError, match="expects 64-d CLIP features"):
        m(torch.randn(5, 32))


def test_mapper_regression_loss_learns():
    torch.manual_seed(0)
    m = Mapper.tiny()
    m.train()
    f, z = torch.randn(8, 32), torch.randn(8, 16) * 0.1
    opt = torch.optim.Adam(m.parameters(), lr=1e-3)
    first = m.regression_loss(f, z).item()
    for _ in range(30):
        loss = m.regression_loss(f, z)
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < first


def test_prior_loss_learns_and_samples_unit_norm():
    torch.manual_seed(0)
    p = DiffusionPrior.tiny()
    p.train()
    text = torch.nn.functional.normalize(torch.randn(4, 32), dim=-1)
    image = torch.nn.functional.normalize(text + 0.1 * torch.randn(4, 32), dim=-1)
    opt = torch.optim.Adam(p.parameters(), lr=3e-3)
    g = torch.Generator().manual_seed(0)
    losses = []
    for _ in range(40):
        loss = p.loss(text, image, generator=g)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert sum(losses[-10:]) < sum(losses[:10])
    p.eval()
    a = p.sample(text, generator=torch.Generator().manual_seed(1), steps=4)
    b = p.sample(text, generator=torch.Generator().manual_seed(1), steps=4, guidance_scale=2.0)
    assert a.shape == (4, 32) and torch.allclose(a.norm(dim=-1), torch.ones(4), atol=1e-5)
    assert torch.isfinite(b).all()
    assert p.scheduler.config.beta_schedule == "squaredcos_cap_v2"  # cosine schedule
    assert p.scheduler.config.prediction_type == "sample"  # predicts the clean embedding
    with pytest.raises(InputError):
        p.sample(torch.randn(2, 16))


def test_svr_encodes_images_and_decodes_points():
    s = SVRModel.tiny()
    z = s.encode(torch.rand(2, 3, 48, 48))
    assert z.shape == (2, s.latent_dim)
    logits, rgb = s.decode(torch.rand(2, 7, 3) - 0.5, z)
    assert logits.shape == (2, 7) and rgb.shape == (2, 7, 3)
    assert rgb.min() >= 0 and rgb.max() <= 1
    with pytest.raises(InputError):
        s.encode(torch.rand(2, 1, 32, 32))


def test_cisp_contrastive_and_conditioned_diffusion():
    torch.manual_seed(0)
    m = CISP.tiny()
    m.train()
    images = torch.rand(4, 3, 16, 16)
    voxels = (torch.rand(4, 8, 8, 8) > 0.5).float()
    e_i, e_v = m.encode_image(images), m.encode_voxels(voxels)
    assert e_i.shape == e_v.shape == (4, 16)
    opt = torch.optim.Adam(m.parameters(), lr=3e-3)
    first = m.contrastive_loss(images, voxels).item()
    for _ in range(15):
        loss = m.contrastive_loss(images, voxels)
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < first
    dl = m.diffusion_loss(voxels, m.encode_image(images).detach(), generator=torch.Generator().manual_seed(0))
    dl.backward()
    assert m.null_cond.grad is not None or m.denoiser.inp.weight.grad is not None
    m.eval()
    cond = m.encode_image(images[:2])
    v1 = m.sample(cond, guidance_scale=3.0, steps=3, generator=torch.Generator().manual_seed(0))
    v2 = m.sample(cond, guidance_scale=3.0, steps=3, generator=torch.Generator().manual_seed(0))
    assert v1.shape == (2, 8, 8, 8) and v1.min() >= 0 and v1.max() <= 1 and torch.equal(v1, v2)
    with pytest.raises(InputError):
        m.encode_voxels(torch.rand(1, 16, 16, 16))
