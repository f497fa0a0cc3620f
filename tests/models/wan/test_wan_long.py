"""Long Wan clips (models/wan/windows.py); the chunked, tiled VAE decode spread over ranks (models/wan/vae_decode.py).

The long clips use a copy of the tiny Wan 2.1 folder whose reelforge.json sets 9-frame windows (3 latent
frames) sharing 4 frames (1 latent frame), so three windows are 25 frames; the defaults (81-frame windows
sharing 20) are checked on the folder itself. The group test runs this file as a script, one process per
rank (gloo on 127.0.0.1, `run_ranks`).
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

ROOT = Path(__file__).resolve().parents[3]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from models.interface import ParallelConfig, RenderRequest, load_generator  # noqa: E402

#: the short-window folder's reelforge.json
SHORT_WINDOWS = {"window_frames": 9, "context_frames": 4, "max_frames": 33}
#: 25 frames = 7 latent frames: three windows of 3 sharing 1 latent frame, starting 2 apart
LONG = RenderRequest(caption="a red circle moves right", negative_caption="blurry static", width=32, height=32,
                     frames=25, fps=16, seed=11, steps=2, guidance=5.0)
#: the tiles of the decode tests: 40x48-pixel tiles every 32x40 pixels over a 7x9 latent (56x72 pixels): 2x2
TILING = {"tile_sample_min_height": 40, "tile_sample_min_width": 48, "tile_sample_stride_height": 32,
          "tile_sample_stride_width": 40}
LATENT = (1, 16, 3, 7, 9)
#: the group's generator request: two windows at 48x48, sampled under Ulysses sp=2
GROUP_LONG = dataclasses.replace(LONG, width=48, height=48, frames=17, seed=3)


def short_window_folder(wan21: str, root: Path) -> str:
    """A copy of the tiny Wan 2.1 folder with `SHORT_WINDOWS` in its reelforge.json."""
    import shutil

    folder = root / "Tiny-wan21-short-windows"
    if not folder.exists():
        shutil.copytree(wan21, folder)
        (folder / "reelforge.json").write_text(json.dumps(SHORT_WINDOWS))
    return str(folder)


@pytest.fixture(scope="module")
def short(wan_folders, tmp_path_factory):
    """(folder, its generator): the short-window copy."""
    folder = short_window_folder(wan_folders["wan21"], tmp_path_factory.mktemp("short"))
    return folder, load_generator(folder, device="cpu")


def tiny_vae(seed: int = 1):
    from diffusers import AutoencoderKLWan

    torch.manual_seed(seed)
    vae = AutoencoderKLWan(base_dim=4, z_dim=16, dim_mult=[1, 2, 2, 2], num_res_blocks=1,
                           temperal_downsample=[False, True, True]).eval()
    vae.enable_tiling(**TILING)
    return vae


def test_a_long_clip_is_three_windows_each_held_to_the_one_before(short, generators, wan_pipelines):
    from models.generator import window_seed
    from models.wan.windows import latent_windows, sample_long

    limits = generators["wan21"].limits  # the defaults: Wan 2.1's 81 frames, 5 latent frames shared, 20 s
    assert (limits.window_frames, limits.context_frames, limits.max_frames) == (81, 20, 321)
    assert latent_windows(53, 21, 5) == [(0, 21), (16, 37), (32, 53)] and latent_windows(21, 21, 5) == [(0, 21)]
    assert latent_windows(24, 21, 5) == [(0, 21), (3, 24)]  # the last window ends at the clip's end
    gen, pipe = short[1], wan_pipelines["wan21"][1]
    [out] = gen.generate([LONG])
    assert out.frames.shape == (25, 32, 32, 3) and out.frames.dtype == np.uint8 and out.frames[-8:].std() > 1

    windows = []
    with torch.inference_mode():
        cond = gen.encode_text(LONG.caption)
        uncond = gen.encode_text(LONG.negative_caption)
        clip = sample_long(gen, LONG, cond, uncond, on_window=lambda s, x: windows.append((s, x.clone())))
    assert [(s, x.shape[2]) for s, x in windows] == [(0, 3), (2, 3), (4, 3)] and clip.shape[2] == 7
    for (_, before), (s1, after) in zip(windows, windows[1:]):
        assert torch.equal(after[:, :, :1], before[:, :, -1:])  # the seam: held to the window before
        assert torch.equal(clip[:, :, s1:s1 + 3], after)
    # conditioning reaches the new frames: window 1 differs from its own noise sampled without the context
    with torch.inference_mode():
        free = gen.sample(dataclasses.replace(LONG, frames=9, seed=window_seed(LONG.seed, 1)), cond, uncond)
    assert not torch.allclose(windows[1][1][:, :, 1:], free[:, :, 1:], atol=1e-3)
    # window 0 is WanPipeline's clip of one window; the causal VAE decodes its frames alike inside the long clip
    expected = pipe(prompt=LONG.caption, negative_prompt=LONG.negative_caption, height=32, width=32, num_frames=9,
                    num_inference_steps=2, guidance_scale=5.0, generator=torch.Generator("cpu").manual_seed(LONG.seed),
                    output_type="np").frames[0]
    diff = np.abs(out.frames[:9].astype(int) - (expected * 255).round().astype(int))
    assert diff.max() <= 1, diff.max()


def test_each_window_of_a_long_clip_computes_its_first_step_under_the_step_cache(short):
    """A threshold no change reaches reuses every step it may: then only each window's first step computes (the
    last window's residuals are of another latent and noise level), three windows of 4 steps: 3 computed."""
    _, generator = short
    [out] = generator.generate([dataclasses.replace(LONG, steps=4, step_cache=1e9)])
    assert out.steps_computed == 3


def test_long_remix_and_off_settings_are_refused(short, tmp_path):
    from models.wan.folder import WanFolderError, read_wan_folder

    folder, gen = short
    assert (gen.limits.max_frames, gen.limits.context_frames, gen.limits.window_frames) == (33, 4, 9)
    remix = dataclasses.replace(LONG, frames=13, init_frames=np.zeros((13, 32, 32, 3), np.uint8), strength=0.5)
    with pytest.raises(ValueError, match="^a remix is sampled in one window: at most 9 frames, got 13$"):
        gen.generate([remix])
    with pytest.raises(ValueError, match=r"^frames=37 is not on the model's grid; nearest allowed is 33 "):
        gen.generate([dataclasses.replace(LONG, frames=37)])
    bad_folder = short_window_folder(folder, tmp_path)
    for bad, why in (({"max_frames": 5}, "max_frames=5 must be 1 \\+ a multiple of 4, at least the window"),
                     ({"context_frames": 80}, "context_frames=80 must be a multiple of 4 in 4..76"),
                     ({"window_frames": 8}, "window_frames=8 must be 1 \\+ a multiple of 4, at least 5"),
                     ({"frames": 9}, "must be a JSON object with keys among .*, got keys frames")):
        Path(bad_folder, "reelforge.json").write_text(json.dumps(bad))
        with pytest.raises(WanFolderError, match=f"reelforge.json.*{why}"):
            read_wan_folder(bad_folder)


def test_chunked_tiled_decode_equals_diffusers_tiled_decode():
    from models.wan.vae_decode import WanTiledDecoder

    vae = tiny_vae()
    z = torch.randn(LATENT, generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        expected = vae.decode(z).sample
        for chunk in (1, 2):
            decoder = WanTiledDecoder(vae, chunk=chunk)
            assert len(decoder.tiles(*LATENT[3:])) == 2 * 2
            assert torch.equal(decoder.decode(z), expected)


def test_the_decode_spread_over_two_ranks_equals_one_rank(run_ranks, short, tmp_path):
    """Ranks 0 and 1 each decode half the 4 tiles of a tiny VAE's 3-chunk decode and all-gather them; then
    the short-window folder renders a two-window clip under Ulysses sp=2 (its one tile decoded on rank 0,
    rank 1 taking part in the gather with none)."""
    folder = short[0]
    results = run_ranks(__file__, 2, tmp_path, folder, timeout=240)
    assert results["tiles"] == [2, 2] and results["decode_max_abs_diff"] == 0.0
    one = short[1].generate([GROUP_LONG])[0].frames
    group = np.load(tmp_path / "frames.npy")
    assert group.shape == one.shape == (17, 48, 48, 3)
    assert np.abs(group.astype(int) - one.astype(int)).max() <= 1


# --- one rank (this file run as a script) ---------------------------------------------------------


def rank_main(rank: int, world: int, port: int, out_dir: str, folder: str) -> None:
    import torch.distributed as dist

    from models.interface import join_render_group
    from models.wan.vae_decode import WanTiledDecoder

    torch.set_num_threads(1)
    join_render_group(rank, world, "127.0.0.1", port, backend="gloo", timeout_s=120)
    vae = tiny_vae()
    z = torch.randn(LATENT, generator=torch.Generator().manual_seed(0))
    spread = WanTiledDecoder(vae, dist.group.WORLD, chunk=1)
    video = spread.decode(z)
    alone = WanTiledDecoder(vae).decode(z)
    tiles = [sum(spread.owner(n) == r for n in range(len(spread.tiles(*LATENT[3:])))) for r in range(world)]
    frames = load_generator(folder, device="cpu", parallel=ParallelConfig(sp=2)).generate([GROUP_LONG])[0].frames
    if rank == 0:
        np.save(os.path.join(out_dir, "frames.npy"), frames)
        Path(out_dir, "results.json").write_text(json.dumps(
            {"tiles": tiles, "decode_max_abs_diff": float((video - alone).abs().max())}))
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    rank_main(int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), sys.argv[4], sys.argv[5])
