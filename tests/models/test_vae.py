import pytest
import torch

from models.config import VAEConfig
from models.vae import VideoAutoencoder

SMALL = dict(latent_channels=4, block_out_channels=[8, 16, 16, 16])


@pytest.mark.parametrize("fs,ft", [(4, 4), (8, 2), (4, 1)])
@pytest.mark.parametrize("frames,height,width", [(16, 64, 64), (8, 64, 96), (4, 96, 64), (8, 32, 32)])
def test_encode_decode_shapes(fs, ft, frames, height, width):
    torch.manual_seed(0)
    vae = VideoAutoencoder(VAEConfig(spatial_compression=fs, temporal_compression=ft, **SMALL)).eval()
    x = torch.rand(2, 3, frames, height, width) * 2 - 1
    with torch.no_grad():
        z = vae.encode(x)
        assert z.shape == (2, 4, frames // ft, height // fs, width // fs)
        assert vae.latent_shape(frames, height, width) == z.shape[1:]
        assert vae.decode(z).shape == x.shape


def test_posterior_for_training():
    torch.manual_seed(0)
    vae = VideoAutoencoder(VAEConfig(**SMALL))
    x = torch.rand(2, 3, 8, 32, 32) * 2 - 1
    recon, posterior = vae(x, generator=torch.Generator().manual_seed(0))
    assert recon.shape == x.shape and posterior.kl().shape == (2,)
    assert torch.equal(vae.encode(x), posterior.mode())
    loss = (recon - x).pow(2).mean() + 1e-6 * posterior.kl().mean()
    loss.backward()
    assert all(p.grad is not None for p in vae.encoder.parameters())


def test_time_is_causal():
    """Changing the last frames leaves the earlier latent frames (and their decode) unchanged."""
    torch.manual_seed(0)
    vae = VideoAutoencoder(VAEConfig(**SMALL)).eval()  # 4x time: 16 frames -> 4 latent frames
    x = torch.rand(1, 3, 16, 32, 32) * 2 - 1
    y = x.clone()
    y[:, :, 12:] = 0
    with torch.no_grad():
        zx, zy = vae.encode(x), vae.encode(y)
        assert torch.equal(zx[:, :, :3], zy[:, :, :3]) and not torch.equal(zx[:, :, 3], zy[:, :, 3])
        zy[:, :, 3] += 1
        assert torch.equal(vae.decode(zx)[:, :, :12], vae.decode(zy)[:, :, :12])


def test_off_grid_clip_is_rejected():
    vae = VideoAutoencoder(VAEConfig(**SMALL))
    with pytest.raises(ValueError, match="multiple of 4"):
        vae.encode(torch.zeros(1, 3, 6, 32, 32))
