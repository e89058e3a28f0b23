"""LPIPS-VGG: parity with a PyTorch LPIPS on random weights, metric properties, and the converter's errors.

The reference is written here with plain ``torch.nn``, as the ``lpips`` package computes it (its
``ScalingLayer``, ``normalize_tensor``, ``NetLinLayer`` and spatial average) over a VGG16 trunk with
torchvision's ``vgg16().features`` layer indices, so neither ``lpips`` nor ``torchvision`` is needed.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from moee_jax.checkpoint.convert.perceptual import convert_lpips, load_lpips
from moee_jax.checkpoint.convert.state_dict import ConversionError
from moee_jax.models.perceptual import LPIPS, VGG16_STAGES, unit_normalize, vgg16_conv_indices
from tests.reference_models import rel_err

B, H, W = 2, 64, 48  # non-square on purpose; relu5_3 is 4×3
TAP_INDICES = (3, 8, 15, 22, 29)  # relu1_2 … relu5_3 in vgg16().features


def make_reference(torch):
    """A PyTorch LPIPS-VGG (lpips v0.1, ``use_dropout=True``) whose keys are torchvision's + lpips' own."""
    tnn = torch.nn

    class Reference(tnn.Module):
        def __init__(self):
            super().__init__()
            layers, c_in = [], 3
            for stage in VGG16_STAGES:
                for width in stage:
                    layers += [tnn.Conv2d(c_in, width, 3, padding=1), tnn.ReLU(inplace=False)]
                    c_in = width
                layers.append(tnn.MaxPool2d(2, 2))
            self.features = tnn.Sequential(*layers)
            widths = [stage[-1] for stage in VGG16_STAGES]
            for k, c in enumerate(widths):
                self.add_module(f"lin{k}", tnn.Module())
                getattr(self, f"lin{k}").model = tnn.Sequential(tnn.Dropout(), tnn.Conv2d(c, 1, 1, bias=False))
            self.register_buffer("shift", torch.tensor([-0.030, -0.088, -0.188])[None, :, None, None], persistent=False)
            self.register_buffer("scale", torch.tensor([0.458, 0.448, 0.450])[None, :, None, None], persistent=False)

        def taps(self, x):
            out, h = [], (x - self.shift) / self.scale
            for i, layer in enumerate(self.features[: TAP_INDICES[-1] + 1]):
                h = layer(h)
                if i in TAP_INDICES:
                    out.append(h)
            return out

        def forward(self, x, y):
            """``(B, 3, H, W)`` pair → per-tap ``(B,)`` terms (their sum is the distance)."""
            terms = []
            for k, (fx, fy) in enumerate(zip(self.taps(x), self.taps(y))):
                fx = fx / (torch.sqrt(torch.sum(fx**2, dim=1, keepdim=True)) + 1e-10)
                fy = fy / (torch.sqrt(torch.sum(fy**2, dim=1, keepdim=True)) + 1e-10)
                terms.append(getattr(self, f"lin{k}").model((fx - fy) ** 2).mean([1, 2, 3]))
            return terms

    return Reference()


@pytest.fixture(scope="module")
def torch_lpips(torch):
    """Random weights on the scale of trained ones: He-normal convs (activations neither vanish nor
    explode over 13 layers), non-zero biases, and non-negative linear weights."""
    model = make_reference(torch).eval()
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.startswith("lin"):
                p.copy_(torch.rand(p.shape, generator=gen))
            elif name.endswith("weight"):
                fan_in = p.shape[1] * p.shape[2] * p.shape[3]
                p.copy_(torch.randn(p.shape, generator=gen) * (2.0 / fan_in) ** 0.5)
            else:
                p.copy_(0.1 * torch.randn(p.shape, generator=gen))
    return model


@pytest.fixture(scope="module")
def weight_files(torch, torch_lpips, tmp_path_factory):
    """torchvision-style ``vgg16.safetensors`` (with a classifier head to skip) and lpips' ``vgg.pth``."""
    folder = tmp_path_factory.mktemp("lpips")
    state = torch_lpips.state_dict()
    vgg = {k: v.numpy() for k, v in state.items() if k.startswith("features.")}
    vgg |= {"classifier.0.weight": np.ones((8, 4), np.float32), "classifier.0.bias": np.ones(8, np.float32)}
    save_file(vgg, str(folder / "vgg16.safetensors"))
    torch.save({k: v for k, v in state.items() if k.startswith("lin")}, folder / "vgg.pth")
    return folder / "vgg16.safetensors", folder / "vgg.pth"


@pytest.fixture(scope="module")
def loaded(weight_files):
    return load_lpips(*weight_files, allow_pickle=True)


@pytest.fixture(scope="module")
def params(loaded):
    return loaded[1]


@pytest.fixture(scope="module")
def state_dicts(torch, weight_files):
    """The two files' contents as numpy state dicts, for building broken variants."""
    return dict(load_file(str(weight_files[0]))), {k: v.numpy() for k, v in torch.load(weight_files[1]).items()}


@pytest.fixture(scope="module")
def lpips_fn(loaded):
    """``(params, x, y)`` → ``(distance (B,), per-tap terms)``; one compilation for every test."""
    module = loaded[0]

    @jax.jit
    def fn(p, x, y):
        distance, state = module.apply({"params": p}, x, y, mutable="intermediates")
        return distance, jnp.stack(state["intermediates"]["per_tap"])

    return fn


@pytest.fixture(scope="module")
def images():
    """Two ``(B, H, W, 3)`` batches in [-1, 1], channels-last."""
    rng = np.random.default_rng(0)
    x = rng.uniform(-1.0, 1.0, (B, H, W, 3)).astype(np.float32)
    return x, np.clip(x + rng.normal(0.0, 0.3, x.shape), -1.0, 1.0).astype(np.float32)


@pytest.fixture(scope="module")
def reference_terms(torch, torch_lpips, images):
    x, y = (torch.from_numpy(a).permute(0, 3, 1, 2) for a in images)
    with torch.no_grad():
        return np.stack([t.numpy() for t in torch_lpips(x, y)])  # (5, B)


def test_distance_matches_pytorch_reference(lpips_fn, params, images, reference_terms):
    distance, _ = lpips_fn(params, *images)
    assert distance.shape == (B,)
    assert rel_err(distance, reference_terms.sum(0)) < 1e-4


def test_each_tap_matches_pytorch_reference(lpips_fn, params, images, reference_terms):
    _, terms = lpips_fn(params, *images)
    for k in range(len(TAP_INDICES)):
        assert rel_err(terms[k], reference_terms[k]) < 1e-4, f"tap {k}"


def test_per_tap_terms_sum_to_distance(lpips_fn, params, images):
    distance, terms = lpips_fn(params, *images)
    np.testing.assert_allclose(terms.sum(0), distance, rtol=1e-6)


def test_distance_of_an_image_to_itself_is_zero(lpips_fn, params, images):
    distance, _ = lpips_fn(params, images[0], images[0])
    np.testing.assert_allclose(distance, 0.0, atol=1e-6)


def test_distance_is_symmetric(lpips_fn, params, images):
    x, y = images
    np.testing.assert_allclose(lpips_fn(params, y, x)[0], lpips_fn(params, x, y)[0], rtol=1e-6)


def test_images_of_different_shapes_are_refused(params):
    x = jnp.zeros((1, 32, 32, 3))
    with pytest.raises(ValueError, match="one shape"):
        LPIPS().apply({"params": params}, x, x[:, :16])


def test_unit_normalize_has_zero_gradient_for_an_all_zero_column():
    f = jnp.zeros((1, 2, 2, 4)).at[0, 0, 0].set(jnp.array([3.0, 4.0, 0.0, 0.0]))
    np.testing.assert_allclose(unit_normalize(f)[0, 0, 0], [0.6, 0.8, 0.0, 0.0], rtol=1e-6)
    grad = jax.grad(lambda f: jnp.sum(unit_normalize(f) ** 2))(f)
    assert np.all(np.isfinite(grad))


def test_params_follow_torchvision_layer_indices(params):
    convs = sorted(int(k.removeprefix("features_")) for k in params["net"])
    assert convs == [i for stage in vgg16_conv_indices() for i in stage]
    assert params["net"]["features_28"]["kernel"].shape == (3, 3, 512, 512)
    assert params["lin2"]["kernel"].shape == (1, 1, 256, 1)


def test_saved_lpips_model_converts_like_torchvision_plus_lin_file(state_dicts, params):
    vgg, lin = state_dicts
    slice_of = {i: s for s, stage in enumerate(vgg16_conv_indices(), 1) for i in stage}
    full = {}
    for key, value in vgg.items():
        if key.startswith("features."):
            index = int(key.split(".")[1])
            full[key.replace("features.", f"net.slice{slice_of[index]}.", 1)] = value
    full |= lin | {
        "scaling_layer.shift": np.array([-0.030, -0.088, -0.188], np.float32).reshape(1, 3, 1, 1),
        "scaling_layer.scale": np.array([0.458, 0.448, 0.450], np.float32).reshape(1, 3, 1, 1),
    }
    jax.tree.map(np.testing.assert_array_equal, convert_lpips(full, {}, LPIPS(), source="lpips.pth"), params)


def test_missing_and_unexpected_keys_are_listed_in_one_error(state_dicts):
    vgg, lin = (dict(d) for d in state_dicts)
    del vgg["features.28.bias"]
    lin["lin2.model.1.weights"] = lin.pop("lin2.model.1.weight")
    with pytest.raises(ConversionError) as err:
        convert_lpips(vgg, lin, LPIPS(), source="vgg16 + vgg.pth")
    assert "lin2.model.1.weights" in str(err.value)
    assert "net/features_28/bias" in str(err.value)
    assert "lin2/kernel" in str(err.value)


def test_wrong_shape_is_reported(state_dicts):
    vgg, lin = (dict(d) for d in state_dicts)
    lin["lin4.model.1.weight"] = np.ones((1, 256, 1, 1), np.float32)
    with pytest.raises(ConversionError, match=r"lin4\.model\.1\.weight: file has shape \(1, 256, 1, 1\)"):
        convert_lpips(vgg, lin, LPIPS(), source="vgg16 + vgg.pth")


def test_negative_linear_weights_are_reported(state_dicts):
    vgg, lin = (dict(d) for d in state_dicts)
    lin["lin0.model.1.weight"] = -lin["lin0.model.1.weight"]
    with pytest.raises(ConversionError, match=r"lin0\.model\.1\.weight: has negative entries"):
        convert_lpips(vgg, lin, LPIPS(), source="vgg16 + vgg.pth")


def test_foreign_scaling_constants_are_reported(state_dicts):
    vgg, lin = state_dicts
    vgg = vgg | {"scaling_layer.shift": np.zeros((1, 3, 1, 1), np.float32)}
    with pytest.raises(ConversionError, match=r"scaling_layer\.shift: .* differs"):
        convert_lpips(vgg, lin, LPIPS(), source="lpips.pth")


def test_pickle_file_is_refused_without_allow_pickle(weight_files):
    with pytest.raises(ConversionError, match="pickle.*--allow_pickle"):
        load_lpips(*weight_files)
