"""Training (models/training/, `train_model`) on the tiny config: the steps learn, a paused run
resumes to the same step count and the same weights, and the export loads as a model."""

import json

import numpy as np
import pytest
import torch

from models.config import load_config
from models.dit import VideoDiT
from models.interface import RenderRequest, load_generator
from models.shapes.source import ShapesWorldSource
from models.shapes.world import Scene, canonical_caption, render_scene
from models.training.config import TrainConfig
from models.training.data import to_tensor
from models.training.dit import dit_step
from models.training.engine import init_training_process, make_engine
from models.training.train import train_model
from models.training.vae import vae_step
from models.vae import VideoAutoencoder
from models.weights import load_weights, sha256_bytes

SCENES = [Scene(shape, colour, bg, motion) for shape, colour, bg, motion in (
    ("circle", "red", "black", "right"), ("square", "blue", "gray", "up"),
    ("triangle", "white", "navy", "grows"), ("diamond", "green", "brown", "still"))]


class FewScenes(ShapesWorldSource):
    """The shapes world cut to four scenes (so the caption cache takes a moment, not seconds)."""

    def __init__(self):
        super().__init__()
        self.captions = [canonical_caption(s) for s in SCENES]

    def sample(self, rng, n):
        scenes = [SCENES[i] for i in rng.integers(0, len(SCENES), size=n)]
        return np.stack([render_scene(s, rng=rng) for s in scenes]), [canonical_caption(s) for s in scenes]


def tiny_cfg(out, **kw):
    base = dict(out_dir=str(out), model="tiny", vae_steps=4, dit_steps=4, vae_batch=2, dit_batch=4,
                vae_crop=32, vae_frames=8, latent_clips=8, checkpoint_every=100, log_every=1, threads=1,
                warmup_steps=2)
    return TrainConfig(**{**base, **kw})


@pytest.fixture(scope="module")
def dist():
    return init_training_process()


def test_vae_and_dit_steps_decrease_the_loss(dist, tmp_path):
    _, world, device = dist
    cfg = tiny_cfg(tmp_path, vae_lr=3e-3, dit_lr=3e-3, warmup_steps=1)
    model = load_config("tiny")
    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    x = to_tensor(np.stack([render_scene(s, rng=rng) for s in SCENES[:2]]))[:, :, :8, :32, :32]
    engine, _, _ = make_engine(VideoAutoencoder(model.vae), cfg.vae_lr, 0.0, 20, cfg, 2, world, device)
    vae_losses = [vae_step(engine, x, cfg, torch.Generator().manual_seed(1))["loss"] for _ in range(12)]
    assert np.mean(vae_losses[-3:]) < 0.8 * np.mean(vae_losses[:3])

    x0 = torch.randn(4, model.vae.latent_channels, 2, 8, 8)
    text, mask = torch.randn(4, 16, model.text.dim), torch.ones(4, 16, dtype=torch.bool)
    engine, _, _ = make_engine(VideoDiT(model.dit), cfg.dit_lr, 0.0, 20, cfg, 4, world, device)
    dit_losses = [dit_step(engine, x0, text, mask, torch.zeros(1, 16, model.text.dim), mask[:1], cfg,
                           torch.Generator().manual_seed(2)) for _ in range(12)]
    assert np.mean(dit_losses[-3:]) < 0.8 * np.mean(dit_losses[:3])


def _curve(path):
    lines = path.read_text().splitlines()
    return [dict(zip(lines[0].split(","), line.split(","))) for line in lines[1:]]


@pytest.fixture(scope="module")
def straight_run(dist, tmp_path_factory):
    """One uninterrupted tiny run: (its out_dir, its summary)."""
    out = tmp_path_factory.mktemp("straight")
    summary = train_model(tiny_cfg(out), FewScenes())
    assert summary["finished"] and (out / "loss_dit.csv").exists()
    return out, summary


def test_paused_run_resumes_to_the_same_steps_and_weights(straight_run, tmp_path):
    a, straight = straight_run

    paused = train_model(tiny_cfg(tmp_path / "b", pause_at=2), FewScenes())
    assert not paused["finished"] and paused["phase"] == "vae"
    assert (tmp_path / "b" / "vae" / "ckpt" / "latest").read_text().strip() == "step2"
    paused = train_model(tiny_cfg(tmp_path / "b", pause_at=2, resume=True), FewScenes())
    assert not paused["finished"] and paused["phase"] == "dit"  # the VAE went on to 4, the DiT paused at 2
    resumed = train_model(tiny_cfg(tmp_path / "b", resume=True), FewScenes())
    assert resumed["finished"]

    log = [json.loads(line) for line in (tmp_path / "b" / "train_log.jsonl").read_text().splitlines()]
    assert [(e["phase"], e["step"]) for e in log if e["event"] == "resume"] == [("vae", 2), ("dit", 2)]
    for phase in ("vae", "dit"):
        steps = [int(r["step"]) for r in _curve(tmp_path / "b" / f"loss_{phase}.csv")]
        assert steps == [1, 2, 3, 4]  # every step once, none repeated after the resume
        assert [r["loss"] for r in _curve(tmp_path / "b" / f"loss_{phase}.csv")] == \
               [r["loss"] for r in _curve(a / f"loss_{phase}.csv")]
    # The same weights: equal up to float rounding (a resumed process may sum in another order;
    # a missing optimizer, scheduler or EMA state would differ by far more than this).
    a_state, _ = load_weights(straight["weights"])
    b_state, _ = load_weights(resumed["weights"])
    assert a_state.keys() == b_state.keys()
    for k in a_state:
        assert torch.allclose(a_state[k], b_state[k], rtol=1e-5, atol=1e-6), k


def _model_folder(out, summary, folder):
    """A model folder (config.json) for the weights a run exported."""
    vae_info = json.loads((out / "vae" / "final.json").read_text())
    config = {"base": "tiny", "name": "trained-tiny", "version": "0.0.1", "weights": summary["weights"],
              "weights_sha256": summary["weights_sha256"],
              "vae": {"scaling_factor": vae_info["scaling_factor"], "shift_factor": vae_info["shift_factor"]}}
    (folder / "config.json").write_text(json.dumps(config))
    return str(folder)


def test_exported_weights_load_as_a_model(straight_run, tmp_path):
    out, summary = straight_run
    path = out / "model.safetensors"
    assert summary["weights"] == str(path) and summary["weights_sha256"] == sha256_bytes(path.read_bytes())
    gen = load_generator(_model_folder(out, summary, tmp_path), device="cpu")
    assert gen.info.weights_sha256 == summary["weights_sha256"]
    [out] = gen.generate([RenderRequest(caption=canonical_caption(SCENES[0]), width=32, height=32, frames=8,
                                        fps=8, seed=1, steps=2, guidance=2.0)])
    assert out.frames.shape == (8, 32, 32, 3) and out.frames.dtype == np.uint8


def test_fine_tuning_starts_from_a_trained_model(straight_run, tmp_path):
    out, summary = straight_run
    base = _model_folder(out, summary, tmp_path)
    # A learning rate of ~0: the fine-tuned weights are the starting model's (random ones would not be).
    tuned = train_model(tiny_cfg(tmp_path / "ft", init_from=base, vae_steps=0, dit_steps=2, dit_lr=1e-12),
                        FewScenes())
    assert tuned["finished"]
    start, _ = load_weights(summary["weights"])
    got, _ = load_weights(tuned["weights"])
    assert got.keys() == start.keys()
    for k in start:
        atol = 0 if k.startswith("vae.") else 1e-6  # the autoencoder is taken as it is
        assert torch.allclose(got[k], start[k], rtol=0, atol=atol), k
    assert json.loads((tmp_path / "ft" / "vae" / "final.json").read_text())["scaling_factor"] == \
        json.loads((out / "vae" / "final.json").read_text())["scaling_factor"]

    with pytest.raises(ValueError, match="autoencoder differs"):  # the default model's VAE is not tiny's
        train_model(tiny_cfg(tmp_path / "bad", init_from="default", vae_steps=0), FewScenes())


def test_decoder_only_run_keeps_the_encoder_and_dit_and_carries_the_decoder_over(dist, tmp_path):
    """--vae-decoder-only from a "repeat" model into tiny (a "depth_to_time" decoder, as the
    default's): the encoder, the latent scale and the DiT come out exactly as they went in, the
    decoder's upsampling convs are carried over to twice the channels, and only the decoder learns."""
    from models.weights import load_modules

    repeat = tmp_path / "repeat"
    repeat.mkdir()
    (repeat / "config.json").write_text(json.dumps({"base": "tiny", "vae": {"temporal_upsample": "repeat"}}))
    assert load_config("tiny").vae.temporal_upsample == "depth_to_time"
    tuned = train_model(tiny_cfg(tmp_path / "dec", init_from=str(repeat), vae_decoder_only=True, vae_steps=3,
                                 dit_steps=0, vae_crop=0, vae_frames=0, temporal_weight=1.0), FewScenes())
    assert tuned["finished"] and tuned["weights"] == str(tmp_path / "dec" / "model.safetensors")
    start = load_modules(load_config(str(repeat)))[0].state_dict()
    got, _ = load_weights(tuned["weights"])
    assert got.keys() == start.keys()
    assert all(torch.equal(got[k], start[k]) for k in start if k.startswith(("vae.encoder.", "dit.")))
    decoder = [k for k in start if k.startswith("vae.decoder.")]
    doubled = [k for k in decoder if got[k].shape != start[k].shape]
    assert doubled and all(got[k].shape[0] == 2 * start[k].shape[0] for k in doubled)  # the upsampling convs
    assert any(not torch.equal(got[k], start[k]) for k in decoder if k not in doubled)  # it trained
    scale = json.loads((tmp_path / "dec" / "vae" / "final.json").read_text())["scaling_factor"]
    assert scale == load_config(str(repeat)).vae.scaling_factor
    assert float(_curve(tmp_path / "dec" / "loss_vae.csv")[-1]["temporal"]) > 0

    with pytest.raises(ValueError, match="only the decoder's temporal_upsample may change"):
        TrainConfig(out_dir=str(tmp_path / "bad"), model="default", init_from=str(repeat),
                    vae_decoder_only=True).check_init_from()
    with pytest.raises(ValueError, match="only repeat -> depth_to_time can be carried over"):
        TrainConfig(out_dir=str(tmp_path / "bad"), model=str(repeat), init_from="tiny").check_init_from()
