"""Tests for vaelab.nets: shapes, IWAE preset sizes, decoder-bias initialisation, errors, gradients, float64.

Conv nets are built with few channels (``base_channels=4``) to keep the file fast; one test checks the default
widths' output shapes.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

import vaelab
from vaelab.likelihoods import BernoulliLikelihood
from vaelab.models import VAE
from vaelab.nets import (
    ACTIVATIONS,
    ARCHITECTURES,
    HIERARCHICAL_NETS,
    MLP,
    ConvDecoder,
    ConvEncoder,
    Gated,
    conv_pair,
    init_decoder_bias,
    iwae_1layer_pair,
    iwae_2layer_nets,
    mlp_pair,
)
from vaelab.priors import StandardNormal
from vaelab.tolerance import reduction_error_bound, rounding_gamma

# (architecture, data_shape, latent_dim, options): every builder, on every shape family it serves.
CASES = [
    ("mlp", (784,), 4, {"hidden": (16, 8)}),
    ("mlp", (3, 8, 8), 3, {"hidden": (16,), "activation": "gelu"}),
    ("mlp", (784,), 4, {"hidden": (16, 8), "activation": "gated"}),
    ("iwae-1layer", (1, 28, 28), 50, {}),
    ("conv", (1, 28, 28), 4, {"base_channels": 4}),
    ("conv", (3, 32, 32), 4, {"base_channels": 4}),
    ("conv", (2, 64, 64), 4, {"base_channels": 4, "activation": "elu"}),
]
CASE_IDS = [f"{name}-{'x'.join(map(str, shape))}" for name, shape, _, _ in CASES]


def _linear_params(n_in: int, n_out: int) -> int:
    return n_in * n_out + n_out  # weight + bias


def _count(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def _tiny_vae(name, data_shape, latent_dim, options) -> VAE:
    encoder, decoder = ARCHITECTURES[name](data_shape, latent_dim, **options)
    return VAE(
        prior=StandardNormal(latent_dim),
        encoder=encoder,
        decoder=decoder,
        likelihood=BernoulliLikelihood(data_shape),
    )


def test_registry_keys():
    assert set(ARCHITECTURES) == {"mlp", "iwae-1layer", "conv"}
    assert set(HIERARCHICAL_NETS) == {"iwae-2layer-nets"}
    assert set(ACTIVATIONS) == {"tanh", "relu", "elu", "gelu", "silu", "softplus"}


# --- MLP ----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("activation", sorted(ACTIVATIONS))
def test_mlp_flattens_input_and_uses_activation(activation):
    net = MLP(12, (5, 7), 3, activation)
    assert [type(m) for m in net.body] == [nn.Linear, ACTIVATIONS[activation]] * 2
    x = torch.randn(4, 3, 2, 2)
    out = net(x)
    assert out.shape == (4, 3)
    torch.testing.assert_close(out, net(x.reshape(4, 12)))


def test_gated_mlp_is_the_vampprior_papers_gated_unit():
    """Each hidden layer of a gated MLP computes (W x + c) * sigmoid(V x + d) from one Linear's two halves (float64;
    the two sides share the affine map and differ only in how sigmoid and the product round), with twice a plain
    layer's parameters."""
    torch.manual_seed(0)
    net = MLP(12, (5, 7), 3, "gated").double()
    x = torch.randn(4, 12, dtype=torch.float64)
    h = x
    # sigmoid (exp, add, divide) and one product on each side, each within an ulp or so: 8 roundings is generous
    rtol = 2 * rounding_gamma(8, torch.float64)
    for layer in net.body:
        assert type(layer) is Gated
        a = nn.functional.linear(h, layer.linear.weight, layer.linear.bias)
        n = a.shape[1] // 2
        got = layer(h)
        torch.testing.assert_close(got, a[:, :n] * torch.sigmoid(a[:, n:]), rtol=rtol, atol=0)
        h = got
    assert torch.equal(net(x), net.output_layer(h))
    assert _count(net) == 2 * _linear_params(12, 5) + 2 * _linear_params(5, 7) + _linear_params(7, 3)
    with pytest.raises(ValueError, match=r"unknown activation 'glu'.*'gated'"):
        MLP(12, (5,), 3, "glu")


def test_mlp_output_shape_and_no_hidden_layers():
    assert MLP(6, (4,), (2, 3, 5))(torch.randn(7, 6)).shape == (7, 2, 3, 5)
    affine = MLP(6, (), 2)
    assert len(affine.body) == 0
    x = torch.randn(3, 6)
    torch.testing.assert_close(affine(x), x @ affine.output_layer.weight.T + affine.output_layer.bias)


# --- shapes of every architecture ---------------------------------------------------------------------------
@pytest.mark.parametrize(("name", "data_shape", "latent_dim", "options"), CASES, ids=CASE_IDS)
def test_pair_shapes_on_batch_and_flattened_samples(name, data_shape, latent_dim, options):
    torch.manual_seed(0)
    encoder, decoder = ARCHITECTURES[name](data_shape, latent_dim, **options)
    b, k = 3, 2
    assert encoder(torch.rand(b, *data_shape)).shape == (b, 2 * latent_dim)
    assert decoder(torch.randn(b, latent_dim)).shape == (b, *data_shape)

    z = torch.randn(k, b, latent_dim)
    flat = decoder(z.reshape(k * b, latent_dim))  # as VAE.decode does for z [K, B, d]
    assert flat.shape == (k * b, *data_shape)
    # samples stay separate: row k*B + i of the flattened call is decoder(z[k])[i]
    torch.testing.assert_close(flat.reshape(k, b, *data_shape)[1], decoder(z[1]))
    assert decoder.out_shape == data_shape


@pytest.mark.parametrize(("data_shape", "grid"), [((1, 28, 28), (64, 7, 7)), ((3, 32, 32), (128, 4, 4))])
def test_conv_decoder_default_widths_give_the_exact_data_shape(data_shape, grid):
    encoder, decoder = conv_pair(data_shape, 8)
    assert decoder.grid == grid
    assert decoder(torch.randn(2, 8)).shape == (2, *data_shape)
    assert encoder(torch.rand(2, *data_shape)).shape == (2, 16)


def test_conv_64_default_widths():
    encoder, decoder = conv_pair((3, 64, 64), 8)
    assert decoder.grid == (256, 4, 4)
    assert [m.out_channels for m in encoder.body if isinstance(m, nn.Conv2d)] == [32, 64, 128, 256]
    assert decoder(torch.randn(1, 8)).shape == (1, 3, 64, 64)
    assert decoder.output_layer.bias.shape == (3,)


def test_vae_decode_handles_leading_sample_dims():
    model = _tiny_vae("conv", (1, 28, 28), 4, {"base_channels": 4})
    p = model.decode(torch.randn(5, 3, 4))
    assert p.batch_shape == (5, 3)
    assert p.event_shape == (1, 28, 28)


# --- the IWAE presets (Burda, Grosse & Salakhutdinov, 2016, sec. 5) -----------------------------------------
def test_iwae_1layer_parameter_count():
    encoder, decoder = iwae_1layer_pair((784,), 50)
    # 784-200-200-(2x50) and 50-200-200-784
    enc = _linear_params(784, 200) + _linear_params(200, 200) + _linear_params(200, 100)
    dec = _linear_params(50, 200) + _linear_params(200, 200) + _linear_params(200, 784)
    assert (enc, dec) == (217_300, 207_984)  # by hand: 157000 + 40200 + 20100; 10200 + 40200 + 157584
    assert (_count(encoder), _count(decoder)) == (enc, dec)
    assert all(isinstance(m, nn.Tanh) for m in encoder.body[1::2])
    assert all(isinstance(m, nn.Tanh) for m in decoder.body[1::2])


def test_iwae_2layer_nets_sizes_and_shapes():
    nets = iwae_2layer_nets((1, 28, 28))
    assert isinstance(nets, nn.ModuleDict)
    expected = {
        "q_z1_x": _linear_params(784, 200) + _linear_params(200, 200) + _linear_params(200, 200),
        "q_z2_z1": _linear_params(100, 100) + _linear_params(100, 100) + _linear_params(100, 100),
        "p_z1_z2": _linear_params(50, 100) + _linear_params(100, 100) + _linear_params(100, 200),
        "p_x_z1": _linear_params(100, 200) + _linear_params(200, 200) + _linear_params(200, 784),
    }
    assert expected == {"q_z1_x": 237_400, "q_z2_z1": 30_300, "p_z1_z2": 35_400, "p_x_z1": 217_984}
    assert {key: _count(net) for key, net in nets.items()} == expected

    x = torch.rand(3, 1, 28, 28)
    assert nets["q_z1_x"](x).shape == (3, 200)
    z1 = torch.randn(3, 100)
    assert nets["q_z2_z1"](z1).shape == (3, 100)
    assert nets["p_z1_z2"](torch.randn(6, 50)).shape == (6, 200)
    assert nets["p_x_z1"](z1).shape == (3, 1, 28, 28)


def test_iwae_2layer_nets_gradients_reach_every_parameter():
    torch.manual_seed(0)
    nets = iwae_2layer_nets((784,))
    x = torch.rand(2, 784)
    z1 = nets["q_z1_x"](x)[:, :100]
    z2 = nets["q_z2_z1"](z1)[:, :50]
    out = nets["p_x_z1"](nets["p_z1_z2"](z2)[:, :100])
    out.square().sum().backward()
    for name, param in nets.named_parameters():
        assert param.grad is not None and bool(param.grad.abs().sum() > 0), name


# --- init_decoder_bias --------------------------------------------------------------------------------------
def _pixel_mean(shape, generator):
    mean = torch.rand(shape, generator=generator)
    mean.view(-1)[:2] = torch.tensor([0.0, 1.0])  # always-off and always-on pixels: clamped, still finite
    return mean


@pytest.mark.parametrize("name", ["mlp", "iwae-1layer"])
def test_init_decoder_bias_linear_output(name):
    g = torch.Generator().manual_seed(0)
    _, decoder = ARCHITECTURES[name]((1, 28, 28), 50, **({"hidden": (8,)} if name == "mlp" else {}))
    mean = _pixel_mean((1, 28, 28), g)
    init_decoder_bias(decoder, mean)
    expected = torch.logit(mean.clamp(1e-3, 1 - 1e-3)).flatten()
    torch.testing.assert_close(decoder.output_layer.bias.detach(), expected)
    assert bool(torch.isfinite(decoder.output_layer.bias).all())
    # nothing follows output_layer: with its weights at 0 the decoder outputs exactly the mean's logits
    with torch.no_grad():
        decoder.output_layer.weight.zero_()
    out = decoder(torch.zeros(2, 50))
    torch.testing.assert_close(out, expected.reshape(1, 1, 28, 28).expand(2, -1, -1, -1))


def test_init_decoder_bias_conv_is_per_channel_logit_of_channel_mean():
    g = torch.Generator().manual_seed(1)
    _, decoder = conv_pair((3, 32, 32), 4, base_channels=4)
    mean = _pixel_mean((3, 32, 32), g) * torch.tensor([0.1, 0.5, 1.0])[:, None, None]
    init_decoder_bias(decoder, mean, likelihood="continuous-bernoulli")
    expected = torch.logit(mean.mean(dim=(1, 2)).clamp(1e-3, 1 - 1e-3))
    torch.testing.assert_close(decoder.output_layer.bias.detach(), expected)
    with torch.no_grad():
        decoder.output_layer.weight.zero_()
    out = decoder(torch.zeros(2, 4))
    torch.testing.assert_close(out, expected[None, :, None, None].expand(2, 3, 32, 32))


@pytest.mark.parametrize("likelihood", ["gaussian", "gaussian-learned"])
def test_init_decoder_bias_gaussian_is_the_mean(likelihood):
    _, decoder = mlp_pair((5,), 2, hidden=(4,))
    mean = torch.tensor([-2.0, 0.0, 0.5, 3.0, 10.0])
    init_decoder_bias(decoder, mean, likelihood=likelihood)
    torch.testing.assert_close(decoder.output_layer.bias.detach(), mean)


def test_init_decoder_bias_float64_decoder():
    _, decoder = mlp_pair((6,), 2, hidden=(4,))
    decoder.double()
    mean = torch.full((6,), 0.25)
    init_decoder_bias(decoder, mean)
    assert decoder.output_layer.bias.dtype == torch.float64
    torch.testing.assert_close(
        decoder.output_layer.bias.detach(), torch.full((6,), math.log(1 / 3), dtype=torch.float64)
    )


def test_init_decoder_bias_errors():
    _, decoder = mlp_pair((6,), 2, hidden=(4,))
    with pytest.raises(ValueError, match="unknown likelihood 'poisson'"):
        init_decoder_bias(decoder, torch.rand(6), likelihood="poisson")
    with pytest.raises(ValueError, match=r"decoder outputs \(6,\), but BernoulliLikelihood takes \(7,\)"):
        init_decoder_bias(decoder, torch.rand(7))
    with pytest.raises(ValueError, match=r"likelihood's data shape \(6,\), got \(7,\)"):
        init_decoder_bias(decoder, torch.rand(7), likelihood=BernoulliLikelihood((6,)))
    with pytest.raises(ValueError, match=r"in \[0, 1\]"):
        init_decoder_bias(decoder, torch.full((6,), 2.0))
    with pytest.raises(ValueError, match="NaN or inf"):
        init_decoder_bias(decoder, torch.full((6,), float("nan")))
    with pytest.raises(ValueError, match="no output_layer"):
        init_decoder_bias(nn.Linear(2, 6), torch.rand(6))


# --- errors -------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("name", "data_shape", "latent_dim", "options", "match"),
    [
        ("conv", (1, 30, 30), 4, {}, r"H = W in \[28, 32, 64\], got data_shape \(1, 30, 30\)"),
        ("conv", (1, 28, 32), 4, {}, r"got data_shape \(1, 28, 32\)"),
        ("conv", (28, 28), 4, {}, r"images \(C, H, W\)"),
        ("conv", (1, 28, 28), 0, {}, "latent_dim must be an int >= 1"),
        ("conv", (1, 28, 28), 4, {"activation": "swish"}, "unknown activation 'swish'"),
        ("iwae-1layer", (3, 32, 32), 50, {}, r"784-pixel data .* 3072 values"),
        ("iwae-1layer", (784,), 20, {}, "50 latent units, got latent_dim=20"),
        ("mlp", (), 4, {}, "non-empty shape"),
        ("mlp", (784,), 4, {"hidden": (16, 0)}, "hidden width"),
    ],
)
def test_builders_reject_unsupported_inputs(name, data_shape, latent_dim, options, match):
    with pytest.raises(ValueError, match=match):
        ARCHITECTURES[name](data_shape, latent_dim, **options)


def test_iwae_2layer_nets_rejects_other_data():
    with pytest.raises(ValueError, match=r"784-pixel data .* 100 values"):
        iwae_2layer_nets((10, 10))
    with pytest.raises(ValueError, match="50-unit z2 layer"):
        iwae_2layer_nets((784,), 32)


def test_nets_reject_wrong_input_shapes():
    with pytest.raises(ValueError, match=r"prod\(shape\) = 12, got shape \(4, 10\)"):
        MLP(12, (3,), 2)(torch.randn(4, 10))
    with pytest.raises(ValueError, match=r"ConvEncoder expects \[B, 1, 28, 28\], got \(2, 784\)"):
        ConvEncoder((1, 28, 28), 4, base_channels=2)(torch.rand(2, 784))
    with pytest.raises(ValueError, match=r"ConvDecoder expects z \[N, 4\], got shape \(2, 3, 4\)"):
        ConvDecoder((1, 28, 28), 4, base_channels=2)(torch.randn(2, 3, 4))


# --- a VAE from each architecture: finite ELBO, gradients everywhere, float64 -------------------------------
@pytest.mark.parametrize(("name", "data_shape", "latent_dim", "options"), CASES, ids=CASE_IDS)
def test_tiny_vae_elbo_is_finite_and_gradients_reach_every_parameter(name, data_shape, latent_dim, options):
    torch.manual_seed(0)
    model = _tiny_vae(name, data_shape, latent_dim, options)
    x = torch.bernoulli(torch.full((3, *data_shape), 0.3))
    elbo = vaelab.elbo(model, x)
    assert elbo.shape == (3,)
    assert bool(torch.isfinite(elbo).all())
    (-elbo.sum()).backward()
    for pname, param in model.named_parameters():
        assert param.grad is not None, pname
        assert bool(torch.isfinite(param.grad).all()), pname
        assert bool(param.grad.abs().sum() > 0), pname


@pytest.mark.parametrize(("name", "data_shape", "latent_dim", "options"), CASES, ids=CASE_IDS)
def test_float64_after_double(name, data_shape, latent_dim, options):
    torch.manual_seed(0)
    model = _tiny_vae(name, data_shape, latent_dim, options).double()
    x = torch.bernoulli(torch.full((2, *data_shape), 0.5, dtype=torch.float64))
    assert model.encoder(x).dtype == torch.float64
    elbo = vaelab.elbo(model, x)
    assert elbo.dtype == torch.float64
    assert bool(torch.isfinite(elbo).all())


@pytest.mark.parametrize(
    "decoder",
    [MLP(3, (4,), (2, 3), "softplus"), ConvDecoder((2, 28, 28), 3, base_channels=2, activation="tanh")],
    ids=["mlp", "conv"],
)
def test_decoder_gradcheck_float64(decoder):
    decoder = decoder.double()
    z = torch.randn(2, 3, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(decoder, (z,))


# --- tanh inside torch.compile: ATen's kernel, not inductor's ---------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_compiled_tanh_is_atens_kernel_with_the_same_values_and_gradients(fresh_dynamo, dtype):
    from torch._inductor.utils import run_and_get_code

    g = torch.Generator().manual_seed(0)
    from vaelab._fast import ATEN_TANH_MIN_VALUES

    rows = ATEN_TANH_MIN_VALUES // 33 + 1  # large enough for the ATen call
    layer = nn.Sequential(nn.Linear(7, 33), ACTIVATIONS["tanh"]()).to(dtype)
    x = 4 * torch.randn(rows, 7, generator=g, dtype=dtype)  # saturated values too
    upstream = torch.randn(rows, 33, generator=g, dtype=dtype)

    def value_and_grads(x):
        out = layer(x)
        return (out, *torch.autograd.grad((upstream * out).sum(), (x, layer[0].weight)))

    compiled = torch.compile(value_and_grads)
    leaf = x.clone().requires_grad_()
    got, code = run_and_get_code(compiled, leaf)
    assert any("vaelab.tanh" in c for c in code), "the compiled graph does not call ATen's tanh"
    expected = value_and_grads(x.clone().requires_grad_())
    torch.testing.assert_close(got[0], expected[0], rtol=0, atol=0)  # the same kernel on the same input
    # d/dx tanh = 1 - tanh^2, written out. Both sides compute g = upstream * (1 - y^2) from the same y (at most 3
    # roundings, |1 - y^2| <= 1) and then grad_x = g @ W (a sum over 33 outputs) and grad_W = g.T @ x (a sum over the
    # rows): each within gamma_(n+3) sum |upstream| |.| of the exact value, whatever the CPU's summation order.
    w = layer[0].weight.detach().double()
    magnitude = {"x": upstream.double().abs() @ w.abs(), "weight": upstream.double().abs().T @ x.double().abs()}
    terms = {"x": w.shape[0] + 3, "weight": rows + 3}
    for name, a, b in zip(("x", "weight"), got[1:], expected[1:], strict=True):
        bound = reduction_error_bound(magnitude[name], terms[name], dtype)
        excess = ((a - b).double().abs() - bound).max().item()
        assert excess <= 0, f"gradient of {name}: eager and compiled differ by more than rounding allows"


def test_compiled_tanh_of_few_values_stays_inductors(fresh_dynamo):
    from torch._inductor.utils import run_and_get_code

    layer = nn.Sequential(nn.Linear(7, 33), ACTIVATIONS["tanh"]())
    x = torch.randn(50, 7)
    got, code = run_and_get_code(torch.compile(layer), x)
    assert not any("vaelab.tanh" in c for c in code)  # 1,650 values: a call would cost more than it saves
    torch.testing.assert_close(got, layer(x))


def test_tanh_is_still_nn_tanh_eagerly():
    act = ACTIVATIONS["tanh"]()
    assert isinstance(act, nn.Tanh) and repr(act) == "Tanh()"
    x = torch.linspace(-30, 30, 1001, dtype=torch.float64)
    assert torch.equal(act(x), torch.tanh(x))
