"""Consistency sampler: formulas, seeding, batch-size invariance, class labels, uint8 quantisation."""

import functools

import numpy as np
import pytest
import torch
from training_helpers import perturbed_micro_net

from tcm_core.sampling import SEED_STRIDE, generate, sample_batches, to_uint8

small_net = functools.partial(perturbed_micro_net, dropout=0.2)


def test_one_step_is_f_of_scaled_latent():
    net = small_net()
    z = torch.randn(4, 1, 16, 16)
    out = generate(net, z, [80.0])
    assert net.training  # mode restored
    net.eval()
    with torch.no_grad():
        torch.testing.assert_close(out, net(80.0 * z, torch.full((4,), 80.0)))


def test_two_step_formula():
    net = small_net()
    z, z1 = torch.randn(4, 1, 16, 16), torch.randn(4, 1, 16, 16)
    out = generate(net, z, [80.0, 1.0], step_noise=[z1])
    net.eval()
    with torch.no_grad():
        x0 = net(80.0 * z, torch.full((4,), 80.0))
        expected = net(x0 + 1.0 * z1, torch.full((4,), 1.0))
    torch.testing.assert_close(out, expected)
    # Default step noise comes from torch's global RNG.
    torch.manual_seed(9)
    a = generate(net, z, [80.0, 1.0])
    torch.manual_seed(9)
    torch.testing.assert_close(generate(net, z, [80.0, 1.0]), a)


def test_eval_mode_disables_dropout():
    net = small_net(dropout=0.5)
    z = torch.randn(2, 1, 16, 16)
    torch.testing.assert_close(generate(net, z, [80.0]), generate(net, z, [80.0]))


def test_to_uint8_matches_edm_quantisation():
    x = torch.tensor([-2.0, -1.0, -0.5, 0.0, 0.999, 1.0, 3.0])
    expected = np.clip(x.numpy() * 127.5 + 128, 0, 255).astype(np.uint8)
    assert to_uint8(x).dtype == torch.uint8
    assert to_uint8(x).tolist() == expected.tolist() == [0, 0, 64, 128, 255, 255, 255]


def collect(net, num, seed, steps, batch_size, **kw):
    return torch.cat(list(sample_batches(net, num, seed, steps, batch_size, "cpu", **kw)))


def test_sample_batches_deterministic_and_batch_size_invariant():
    net = small_net()
    a = collect(net, 7, 3, [80.0, 1.0], 7)
    b = collect(net, 7, 3, [80.0, 1.0], 2)
    c = collect(net, 7, 3, [80.0, 1.0], 7)
    assert a.shape == (7, 1, 16, 16) and a.dtype == torch.uint8
    assert torch.equal(a, c)
    # Same per-image noise; float differences between batch sizes may at most flip a quantisation step.
    assert (a.int() - b.int()).abs().max() <= 1
    assert (a != b).float().mean() < 0.01
    # Another seed set gives other images; the batch boundaries do not matter for the split either.
    d = collect(net, 7, 4, [80.0, 1.0], 7)
    assert (a != d).float().mean() > 0.5
    assert torch.equal(collect(net, 3, 3, [80.0, 1.0], 3), a[:3])


def test_sample_batches_uses_per_image_generators():
    net = small_net()
    seed, index = 2, 5
    out = collect(net, 6, seed, [80.0, 1.0], 6)[index]
    g = torch.Generator().manual_seed(seed * SEED_STRIDE + index)
    latent, noise = torch.randn(1, 16, 16, generator=g), torch.randn(1, 16, 16, generator=g)
    expected = to_uint8(generate(net, latent[None], [80.0, 1.0], step_noise=[noise[None]]))[0]
    assert (out.int() - expected.int()).abs().max() <= 1


def test_class_labels_for_a_conditional_net():
    net = small_net(label_dim=4)
    seed, num = 1, 6
    random = collect(net, num, seed, [80.0], 3)
    # "random" draws the class right after the latent from the image's own generator.
    labels = []
    for i in range(num):
        g = torch.Generator().manual_seed(seed * SEED_STRIDE + i)
        torch.randn(1, 16, 16, generator=g)
        labels.append(int(torch.randint(4, (1,), generator=g)))
    explicit = collect(net, num, seed, [80.0], 3, class_labels=labels)
    assert (random.int() - explicit.int()).abs().max() <= 1
    # The label matters: the same latents with class 0 for every image give other images.
    all_zero = collect(net, num, seed, [80.0], 3, class_labels=0)
    differs = [not torch.equal(all_zero[i], explicit[i]) for i in range(num) if labels[i] != 0]
    assert differs and all(differs)
    with pytest.raises(ValueError, match="class_labels"):
        collect(net, num, seed, [80.0], 3, class_labels=[0, 9, 0, 0, 0, 0])
    with pytest.raises(ValueError, match="unconditional"):
        collect(small_net(), 2, 0, [80.0], 2, class_labels=1)


def test_invalid_arguments():
    net = small_net()
    with pytest.raises(ValueError, match="steps"):
        generate(net, torch.randn(1, 1, 16, 16), [])
    with pytest.raises(ValueError, match="step_noise"):
        generate(net, torch.randn(1, 1, 16, 16), [80.0, 1.0], step_noise=[])
    with pytest.raises(ValueError, match="batch_size"):
        collect(net, 2, 0, [80.0], 0)
