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


# --- memory-bounded (tiled) decode ------------------------------------------------------------


def _tiny_vae(temporal_kernel=3, temporal_upsample="repeat"):
    from models.config import load_config

    cfg = load_config("tiny").vae
    cfg.temporal_kernel = temporal_kernel
    cfg.temporal_upsample = temporal_upsample
    torch.manual_seed(0)
    return VideoAutoencoder(cfg).eval()


def test_tiled_decode_of_a_small_clip_is_decode():
    vae = _tiny_vae()
    z = torch.randn(1, 4, 3, 12, 16, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(vae.decode_tiled(z, tile=(3, 12, 16)), vae.decode(z))


@pytest.mark.parametrize("temporal_kernel,temporal_upsample", [(1, "repeat"), (3, "repeat"), (1, "depth_to_time")])
@pytest.mark.parametrize("chunk", [1, 2])
def test_temporal_chunks_are_exact(temporal_kernel, temporal_upsample, chunk):
    """Causal convs carry their last k-1 input frames from chunk to chunk: any chunk length gives
    the frames of one decode (up to float rounding of convolutions over different lengths)."""
    vae = _tiny_vae(temporal_kernel, temporal_upsample)
    z = torch.randn(1, 4, 5, 6, 8, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = vae.decode(z)
        chunks = list(vae.iter_decode_tiled(z, tile=(chunk, 6, 8)))
    assert [c.shape[2] for c in chunks] == [min(chunk, 5 - a) * 4 for a in range(0, 5, chunk)]
    assert (torch.cat(chunks, dim=2) - ref).abs().max().item() <= 1e-5


def test_spatial_tiles_blend_towards_the_full_decode():
    """Tiles cut the decoder's receptive field (zero padding at the cut). Ramps that skip each tile's
    outer `radius` pixels make an overlap of 2·radius+1 latent pixels exact (float rounding,
    1e-5); narrower overlaps blend the seams and the error falls as the overlap grows."""
    from models.vae import decoder_receptive_field

    vae = _tiny_vae()
    radius = decoder_receptive_field(vae.decoder)[1]
    assert radius >= 11  # 3x3 convs: 7 at latent size, 5 at 2x, 5 at 4x -> 7 + 2.5 + 1.25, rounded up
    z = torch.randn(1, 4, 1, 28, 28, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        ref = vae.decode(z)
        errors = {}
        for tile, overlap in [(12, 2), (18, 9), (2 * radius + 3, 2 * radius + 1)]:
            out = vae.decode_tiled(z, tile=(1, tile, tile), overlap=overlap)
            assert out.shape == ref.shape
            errors[overlap] = (out - ref).abs().mean().item(), (out - ref).abs().max().item()
    mean_err = [m for m, _ in errors.values()]
    assert mean_err == sorted(mean_err, reverse=True), errors  # wider overlaps, closer results
    assert errors[2 * radius + 1][1] <= 1e-5, errors  # exact
    assert errors[9][0] <= 0.01 * ref.abs().mean().item(), errors  # within 1% of the mean level


# --- temporal upsampling -----------------------------------------------------------------------


def test_depth_to_time_weights_give_the_repeat_decoders_frames():
    """A "repeat" decoder carried over to "depth_to_time" (`convert_temporal_upsample`) decodes the
    same frames: the starting point of a decoder-only fine-tune (`reel train --vae-decoder-only`)."""
    from models.vae import convert_temporal_upsample

    old = _tiny_vae(1, "repeat")
    new = _tiny_vae(1, "depth_to_time")
    state = convert_temporal_upsample(old.state_dict(), new)
    assert state.keys() == new.state_dict().keys()
    new.load_state_dict(state)
    z = torch.randn(1, 4, 5, 6, 8, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        a, b = old.decode(z), new.decode(z)
    assert (a - b).abs().max().item() <= 1e-5
    with pytest.raises(RuntimeError, match="size mismatch"):  # unconverted, the shapes differ
        _tiny_vae(1, "depth_to_time").load_state_dict(old.state_dict())


@pytest.mark.parametrize("temporal_upsample,first_group_moves", [("repeat", False), ("depth_to_time", True)])
def test_the_first_latent_frame_decodes_to_a_still_only_when_repeating(temporal_upsample, first_group_moves):
    """Repeating frames then padding causally with the first frame gives the first latent frame's
    group identical frames, whatever the weights (so every clip's first frames stand still);
    depth-to-time upsampling gives each of them its own channels."""
    vae = _tiny_vae(1, temporal_upsample)
    with torch.no_grad():
        for p in vae.decoder.parameters():  # random, so no weight is special
            p.normal_(0, 0.2)
        frames = vae.decode(torch.randn(1, 4, 2, 6, 8, generator=torch.Generator().manual_seed(4)))
    first_steps = (frames[:, :, 1:4] - frames[:, :, :3]).abs().amax().item()
    assert (first_steps > 1e-3) == first_group_moves, first_steps
    assert (frames[:, :, 4:] - frames[:, :, 3:-1]).abs().amax().item() > 1e-3  # the later groups move in both


def test_unknown_temporal_upsample_is_refused():
    from models.config import ConfigError, load_config

    with pytest.raises(ConfigError, match="temporal_upsample='nearest' must be one of repeat, depth_to_time"):
        load_config("tiny", {"vae": {"temporal_upsample": "nearest"}})
