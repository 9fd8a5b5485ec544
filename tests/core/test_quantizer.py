import pytest
import torch

from provq_lightning.vq.quantizer import VectorQuantizer


def quantizer(**kw):
    torch.manual_seed(0)
    vq = VectorQuantizer(16, 4, **kw)
    vq.set_codebook(torch.randn(16, 4))
    return vq


def test_hard_output_is_nearest_code_with_straight_through_gradient():
    vq = quantizer()
    z = torch.randn(2, 5, 4, requires_grad=True)
    out = vq(z)
    assert out.indices.shape == (2, 5)
    codes = vq.codebook()
    expected = torch.cdist(z.reshape(-1, 4), codes).argmin(1).view(2, 5)
    assert torch.equal(out.indices, expected)
    torch.testing.assert_close(out.z_tilde, codes[expected])
    out.z_tilde.sum().backward()
    torch.testing.assert_close(z.grad, torch.ones_like(z))  # identity through the straight-through


def test_losses_and_beta():
    vq = quantizer(beta=0.25)
    z = torch.randn(8, 4)
    out = vq(z)
    mse = (z - vq.codebook()[out.indices]).pow(2).mean()
    torch.testing.assert_close(out.codebook_loss, mse)
    torch.testing.assert_close(out.commit_loss, mse)
    torch.testing.assert_close(out.loss, 1.25 * mse)


def test_loss_gradients_go_to_the_right_side():
    vq = quantizer()
    z = torch.randn(8, 4, requires_grad=True)
    out = vq(z)
    out.codebook_loss.backward()
    assert z.grad is None or torch.all(z.grad == 0)  # L_vq moves only the codes
    assert vq.embedding.weight.grad.abs().sum() > 0
    vq.zero_grad()
    out = vq(z)
    out.commit_loss.backward()
    assert (
        z.grad.abs().sum() > 0
        and vq.embedding.weight.grad is None
        or torch.all(vq.embedding.weight.grad == 0)
    )


def test_alpha_mixes_continuous_and_quantized():
    vq = quantizer()
    z = torch.randn(6, 4)
    hard = vq(z).z_tilde
    mixed = vq(z, alpha=0.3).z_tilde
    torch.testing.assert_close(mixed, 0.3 * z + 0.7 * hard)
    torch.testing.assert_close(vq(z, alpha=1.0).z_tilde, z)


def test_bypass_returns_latent_and_no_loss():
    vq = quantizer(l2_normalize=True)
    z = torch.randn(3, 4) * 5
    out = vq(z, bypass=True)
    assert out.indices is None and float(out.loss) == 0.0
    torch.testing.assert_close(out.z_tilde.norm(dim=-1), torch.ones(3))


def test_mask_excludes_padding_from_losses():
    vq = quantizer()
    z = torch.randn(1, 6, 4)
    mask = torch.tensor([[True, True, True, False, False, False]])
    padded = z.clone()
    padded[:, 3:] = 1e3  # garbage in the padding must not matter
    torch.testing.assert_close(vq(padded, mask=mask).loss, vq(z[:, :3]).loss)


def test_l2_normalized_codes_and_inputs():
    vq = quantizer(l2_normalize=True)
    out = vq(torch.randn(10, 4) * 7)
    torch.testing.assert_close(vq.codebook().norm(dim=-1), torch.ones(16))
    torch.testing.assert_close(out.z_q.norm(dim=-1), torch.ones(10))


def test_linear_codebook_seeding_and_frozen_base():
    vq = VectorQuantizer(16, 4, linear_codebook=True, freeze_base_codebook=True)
    centres = torch.randn(16, 4)
    vq.set_codebook(centres)
    torch.testing.assert_close(vq.codebook(), centres)  # Linear is identity right after seeding
    assert not vq.embedding.weight.requires_grad
    opt = torch.optim.SGD([p for p in vq.parameters() if p.requires_grad], lr=0.1)
    vq(torch.randn(32, 4)).loss.backward()
    opt.step()
    torch.testing.assert_close(vq.embedding.weight, centres)  # base codebook C stays fixed
    assert not torch.allclose(vq.codebook(), centres)  # the map W learns


def test_bad_arguments_are_explained():
    with pytest.raises(ValueError, match="needs linear_codebook"):
        VectorQuantizer(4, 2, freeze_base_codebook=True)
    with pytest.raises(ValueError, match="last dim 4"):
        VectorQuantizer(4, 4)(torch.zeros(2, 3))
    with pytest.raises(ValueError, match=r"\(4, 4\)"):
        VectorQuantizer(4, 4).set_codebook(torch.zeros(3, 4))
