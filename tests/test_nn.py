"""Shared networks: shapes for every conditioning mode, dependence on t and cond, padding, the ICNN."""
import pytest
import torch

from bench.api import BenchError
from bench.nn import MLP, ScoreMLP, UNet, crop_to, pad_to, timestep_embedding
from bench.nn.icnn import ICNN, input_gradient


def _randomise(net):
    # the output convolutions are zero-initialised (DDPM); give every weight a value so
    # dependence tests see the whole network
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in net.parameters():
            p.copy_(0.2 * torch.randn(p.shape, generator=g))
    return net


def test_timestep_embedding():
    e = timestep_embedding(torch.tensor([0.0, 0.5]), 8)
    assert e.shape == (2, 8)
    assert torch.allclose(e[0], torch.tensor([1.0] * 4 + [0.0] * 4))
    freqs = torch.exp(-torch.log(torch.tensor(10000.0)) * torch.arange(4) / 4)
    assert torch.allclose(e[1, :4], torch.cos(500.0 * freqs), atol=1e-5)
    assert timestep_embedding(torch.rand(3), 7).shape == (3, 7)


@pytest.mark.parametrize("mode", ["none", "concat", "embed"])
@pytest.mark.parametrize("time_conditional", [True, False])
def test_unet_shapes_and_dependence(mode, time_conditional):
    torch.manual_seed(0)
    cc = 0 if mode == "none" else 3
    net = _randomise(UNet(1, 2, base=16, mults=(1, 2), num_res_blocks=1, attention_resolutions=(8,),
                          cond_mode=mode, cond_channels=cc, time_conditional=time_conditional,
                          image_size=16)).eval()
    x = torch.randn(3, 1, 16, 16)
    t = torch.tensor([0.1, 0.5, 0.9])
    c = torch.randn(3, cc, 16, 16) if cc else None
    y = net(x, t if time_conditional else None, c)
    assert y.shape == (3, 2, 16, 16) and y.dtype == torch.float32
    if time_conditional:
        assert not torch.allclose(y, net(x, t.flip(0), c), atol=1e-3)
        # a scalar t broadcasts
        assert torch.allclose(net(x, torch.tensor(0.3), c), net(x, torch.full((3,), 0.3), c), atol=1e-5)
    else:
        assert torch.equal(y, net(x, t, c))  # t is ignored
    if cc:
        assert not torch.allclose(y, net(x, t if time_conditional else None, torch.randn(3, cc, 16, 16)), atol=1e-3)
        with pytest.raises(BenchError):
            net(x, t, None)
    # channels_last input gives the same result
    y_cl = net(x.to(memory_format=torch.channels_last), t if time_conditional else None,
               None if c is None else c.to(memory_format=torch.channels_last))
    assert torch.allclose(y, y_cl, atol=1e-4)


def test_unet_default_size_and_errors():
    net = UNet(1, 1, base=16)  # mults (1, 2, 2), attention at 16 for 32x32
    assert any(type(m).__name__ == "AttnBlock" for m in net.modules())
    out = net(torch.randn(2, 1, 32, 32), torch.rand(2))
    assert out.shape == (2, 1, 32, 32)
    assert torch.count_nonzero(out) == 0  # zero-initialised output layer (DDPM)
    with pytest.raises(BenchError):
        net(torch.randn(2, 1, 30, 30), torch.rand(2))
    with pytest.raises(BenchError):
        net(torch.randn(2, 1, 32, 32))  # time-conditional without t
    with pytest.raises(BenchError):
        UNet(1, 1, cond_mode="film")
    # gradients reach the first layer after one step of training
    net = _randomise(UNet(1, 1, base=16, mults=(1, 2), image_size=16))
    net(torch.randn(2, 1, 16, 16), torch.rand(2)).pow(2).mean().backward()
    assert net.conv_in.weight.grad.abs().sum() > 0


def test_pad_crop_roundtrip():
    x = torch.rand(2, 1, 28, 28) * 2 - 1
    p = pad_to(x)
    assert p.shape == (2, 1, 32, 32)
    assert torch.equal(p[..., :2, :], torch.full((2, 1, 2, 32), -1.0))
    assert torch.equal(p[..., 2:30, 2:30], x)
    assert torch.equal(crop_to(p, 28, 28), x)
    with pytest.raises(BenchError):
        pad_to(torch.zeros(1, 1, 40, 40))


def test_mlps():
    m = MLP(3, 5, hidden=8, depth=2)
    assert m(torch.randn(4, 3)).shape == (4, 5)
    assert sum(isinstance(l, torch.nn.Linear) for l in m.modules()) == 3
    s = _randomise(ScoreMLP(2, cond_dim=3, hidden=16, depth=2, time_dim=8))
    x, c, t = torch.randn(4, 2), torch.randn(4, 3), torch.rand(4)
    y = s(x, t, c)
    assert y.shape == (4, 2)
    assert not torch.allclose(y, s(x, t, torch.randn(4, 3)), atol=1e-3)
    assert not torch.allclose(y, s(x, t.flip(0), c), atol=1e-3)
    assert ScoreMLP(2)(x, 0.5).shape == (4, 2)


def test_contrastive_distortion_keeps_background_and_varies_per_image():
    from bench.nn.contrastive import distort
    x = -torch.ones(4, 1, 28, 28)
    x[:, :, 10:18, 12:16] = 1.0  # a bar
    g = torch.Generator().manual_seed(0)
    y = distort(x, g, noise=0.0)
    assert y.shape == x.shape and y.min() >= -1 and y.max() <= 1
    assert (y[:, :, :3] == -1).all()  # borders stay background: shifts are small
    assert not torch.allclose(y[0], y[1])  # each image its own distortion
    assert torch.equal(distort(x, torch.Generator().manual_seed(0), noise=0.0), y)  # reproducible


def test_nt_xent_matches_its_definition_and_prefers_matching_views():
    import math

    from bench.nn.contrastive import nt_xent
    g = torch.Generator().manual_seed(0)
    z1, z2 = torch.randn(3, 4, generator=g), torch.randn(3, 4, generator=g)
    z = torch.nn.functional.normalize(torch.cat([z1, z2]), dim=1).tolist()
    total = 0.0  # -log( exp(s(i, partner) / T) / sum over k != i of exp(s(i, k) / T) ), averaged over 2N views
    for i in range(6):
        sim = [sum(a * b for a, b in zip(z[i], z[k])) / 0.5 for k in range(6)]
        total -= sim[(i + 3) % 6] - math.log(sum(math.exp(sim[k]) for k in range(6) if k != i))
    assert nt_xent(z1, z2, temperature=0.5).item() == pytest.approx(total / 6, rel=1e-5)
    z = torch.randn(16, 8, generator=g)
    assert nt_xent(z, z) < nt_xent(z, z.roll(1, 0))


@pytest.mark.slow
def test_contrastive_encoder_learns_invariance_without_labels_and_is_deterministic(one_thread):
    """64 random scribbles, no labels: after a short contrastive fit, a distorted view of each scribble finds
    its partner view (nearest by cosine in the learned space) far more often than at initialisation
    (measured: 0.08 at init, 0.33 / 0.86 after 60 / 120 steps)."""
    from bench.nn.contrastive import Encoder, distort, embed, train_encoder
    g = torch.Generator().manual_seed(0)
    x = -torch.ones(64, 1, 28, 28)
    for i in range(64):
        for _ in range(3):  # three random bars per scribble
            r, c = (int(v) for v in torch.randint(4, 20, (2,), generator=g))
            if torch.rand(1, generator=g) < 0.5:
                x[i, 0, r:r + 8, c:c + 2] = 1
            else:
                x[i, 0, r:r + 2, c:c + 8] = 1

    def retrieval(enc):
        gv = torch.Generator().manual_seed(1)
        a, b = embed(enc, distort(x, gv)), embed(enc, distort(x, gv))
        return ((a @ b.T).argmax(1) == torch.arange(64)).float().mean().item()

    torch.manual_seed(0)
    before = retrieval(Encoder().eval())
    after = retrieval(train_encoder(x, steps=120, batch=32, seed=0))
    assert before < 0.2 and after > 0.6, (before, after)
    a, b = train_encoder(x, steps=3, batch=8, seed=1), train_encoder(x, steps=3, batch=8, seed=1)
    assert torch.equal(embed(a, x), embed(b, x))


# -- the ICNN block (OT-ICNN's potentials; W2GAN and OTM use its input gradient) ------------------
@pytest.mark.usefixtures("one_thread")
def test_icnn_is_convex_and_its_gradient_is_autograd():
    torch.manual_seed(0)
    net = ICNN(3, hidden=16, depth=3)
    assert float(net.negativity().detach()) == 0.0  # constrained weights start non-negative
    a, b = torch.randn(256, 3) * 3, torch.randn(256, 3) * 3
    for t in (0.25, 0.5, 0.75):
        mid = net(t * a + (1 - t) * b)
        assert (mid <= t * net(a) + (1 - t) * net(b) + 1e-4).all()
    # a negative weight breaks the guarantee; negativity measures it and clamp_ removes it
    with torch.no_grad():
        net.convex[0].weight[0, 0] = -2.0
    assert float(net.negativity().detach()) == pytest.approx(4.0)
    net.clamp_()
    assert float(net.negativity().detach()) == 0.0 and float(net.convex[0].weight[0, 0].detach()) == 0.0
    x = torch.randn(5, 3)
    eps, e0 = 1e-3, torch.tensor([1.0, 0.0, 0.0])
    fd = (net(x + eps * e0) - net(x - eps * e0)) / (2 * eps)
    torch.testing.assert_close(net.gradient(x)[:, 0], fd, atol=1e-2, rtol=1e-2)
    quad = lambda z: 0.5 * z.pow(2).sum(1)  # noqa: E731
    torch.testing.assert_close(input_gradient(quad, x), x)
