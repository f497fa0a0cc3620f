"""The options of one training run (`models/training/train.py`), kept apart from the training code so
that reading them (the CLI's `reel train` options) does not import torch."""

from __future__ import annotations

from dataclasses import dataclass, field, replace

from models.config import ModelConfig, load_config

#: Default share of the DiT's training samples per frame-conditioning task (the rest are
#: text→video); the tasks are `models.sampler.random_frame_masks`'.
COND_PROBS = {"i2v": 0.1, "extend": 0.2, "extend_backward": 0.15, "interpolate": 0.05}


@dataclass
class TrainConfig:
    """One training run.

    Attributes:
        out_dir: checkpoints, caches, loss curves and the final weights go here.
        model: the model config to train (a shipped name, a .json path, or a folder).
        model_overrides: merged over `model` (a nested dict like the JSON), e.g. smaller sizes.
        vae_steps / dit_steps: optimiser steps of each phase (0 skips the phase; a skipped VAE
            phase needs `vae/final.*` from an earlier run in `out_dir`).
        vae_batch / dit_batch: clips per step per rank.
        vae_lr / dit_lr: peak AdamW learning rates (linear warm-up, then cosine to 10%).
        warmup_steps: linear warm-up of each phase.
        weight_decay: AdamW weight decay (DiT; the VAE uses none).
        vae_crop / vae_frames: VAE training crops (pixels, frames); 0 = the whole clip.
        kl_weight: weight of the KL term per latent element.
        init_logvar: initial log-variance of the VAE's posterior (see `init_posterior_logvar`).
        object_weight: weight of the L1 averaged over the object's pixels only (far from the
            clip's median colour), so a small object counts as much as the background.
        edge_weight: weight of the L1 on spatial finite differences.
        temporal_weight: weight of the L1 on frame-to-frame differences (the reconstruction's
            steps against the clip's), so motion is not bunched at latent-frame boundaries.
        vae_decoder_only: phase 1 trains the decoder alone, on `init_from`'s frozen encoder: the
            latents, their scale and so the DiT trained on them stay valid (a better or
            re-architected decoder, e.g. `temporal_upsample`, without retraining the DiT).
        latent_clips: clips encoded for the DiT's latent cache (per rank).
        text_dropout: share of DiT samples trained with the empty caption (for guidance).
        timestep_shift: SD3 shift of the DiT's training noise levels (logit-normal t, then shifted;
            1 = unshifted). A shift > 1 trains more at high noise, where the sampler (shift 2 in the
            default model) spends its first steps and where the object's place and path are settled.
        high_noise_share: share of the DiT's samples whose noise level is drawn from the top band
            [0.9, 1) instead (`models.sampler.sample_training_timesteps`): where the first sampler
            steps settle a clip's layout and motion, and the caption must already count.
        cond_mix: shares of the DiT's samples per frame-conditioning task ("i2v", "extend",
            "extend_backward", "interpolate"; `models.sampler.random_frame_masks`), the rest
            text→video; a task not named gets none. None: `COND_PROBS`. A model
            weak at one mode (extending backwards, say) is fine-tuned with more of it.
        ema_decay: decay of the DiT's exponential moving average (exported instead of the raw weights).
        grad_clip: gradient-norm clipping.
        zero_stage: DeepSpeed ZeRO stage (1 or 2).
        checkpoint_every: steps between checkpoints; keep_checkpoints of them are kept.
        log_every: steps between loss-curve rows.
        seed: seed of everything random (data, noise, masks), mixed with rank and step.
        minutes: wall-time budget of this call (all phases); on running out the current phase
            saves a checkpoint and the call returns (resume later). None = no limit.
        threads: torch intra-op threads (None: leave as is).
        resume: continue from the latest checkpoints in `out_dir`.
        pause_at: pause a phase when its step count reaches this in this call (as if the time
            ran out: checkpoint, return; a phase resumed at or past it runs on); for staged runs
            and tests. None = run to the end.
        export_path: where `train_model` writes the final weights (default out_dir/model.safetensors).
        init_from: a trained model (shipped name, config path or URI) to start from instead of
            random weights: fine-tuning, e.g. after a change of the data or the caption style. Its
            DiT starts phase 3; with vae_steps 0 its autoencoder and latent scale are taken as they
            are (they must match `model`'s), else phase 1 trains on from them.
        data_workers: processes that draw training clips ahead of the steps (0: drawn inline). The
            shapes world renders on the CPU (~8 ms a clip): enough for CPU training, far too slow
            to feed a GPU, so give a GPU run most of its host's cores here.
    """

    out_dir: str
    model: str = "default"
    model_overrides: dict = field(default_factory=dict)
    vae_steps: int = 1000
    dit_steps: int = 3000
    vae_batch: int = 8
    dit_batch: int = 16
    vae_lr: float = 1e-3
    dit_lr: float = 5e-4
    warmup_steps: int = 100
    weight_decay: float = 0.01
    vae_crop: int = 32
    vae_frames: int = 8
    kl_weight: float = 1e-4
    init_logvar: float = -8.0
    object_weight: float = 1.0
    edge_weight: float = 0.5
    temporal_weight: float = 0.0
    vae_decoder_only: bool = False
    latent_clips: int = 4000
    text_dropout: float = 0.1
    timestep_shift: float = 1.0
    high_noise_share: float = 0.0
    cond_mix: dict[str, float] | None = None
    ema_decay: float = 0.995
    grad_clip: float = 1.0
    zero_stage: int = 1
    checkpoint_every: int = 200
    keep_checkpoints: int = 2
    log_every: int = 10
    seed: int = 0
    minutes: float | None = None
    threads: int | None = None
    resume: bool = False
    pause_at: int | None = None
    export_path: str | None = None
    data_workers: int = 0
    init_from: str | None = None

    def __post_init__(self):
        if not self.timestep_shift > 0:
            raise ValueError(f"--timestep-shift {self.timestep_shift}: the shift must be above 0 (1: unshifted)")
        if not 0 <= self.high_noise_share < 1:
            raise ValueError(f"--high-noise-share {self.high_noise_share}: a share in [0, 1) (0: none)")
        if self.cond_mix is not None:
            unknown = sorted(set(self.cond_mix) - set(COND_PROBS))
            if unknown or any(not 0 <= v <= 1 for v in self.cond_mix.values()) or sum(self.cond_mix.values()) > 1:
                raise ValueError(f"--cond-mix {format_cond_mix(self.cond_mix)}: shares in [0, 1] of the tasks "
                                 f"{', '.join(COND_PROBS)}, adding up to at most 1"
                                 + (f" (unknown: {', '.join(unknown)})" if unknown else ""))
        if self.vae_decoder_only and not (self.init_from and self.vae_steps):
            raise ValueError("--vae-decoder-only trains a decoder for the encoder of a trained model: "
                             "give --init-from MODEL and --vae-steps > 0")

    def model_config(self) -> ModelConfig:
        return load_config(self.model, self.model_overrides or None)

    def check_init_from(self) -> None:
        """A one-line ValueError when `init_from` cannot start this run: no such model, a DiT of
        another shape than `model`'s, (with vae_steps 0, the autoencoder kept) another autoencoder,
        (with vae_decoder_only) another encoder, or a decoder that cannot be carried over to
        `model`'s temporal upsampling. Reads configs only: cheap enough to run before training starts."""
        if not self.init_from:
            return
        start, model = load_config(self.init_from), self.model_config()
        unscaled = dict(scaling_factor=0.0, shift_factor=0.0)  # the latent scale comes with the weights
        if not self.vae_steps and replace(start.vae, **unscaled) != replace(model.vae, **unscaled):
            raise ValueError(f"--init-from {self.init_from!r}: its autoencoder differs from the one of model "
                             f"{self.model!r}; train one (--vae-steps > 0) or start from a model that matches")
        if self.vae_steps and (start.vae.temporal_upsample, model.vae.temporal_upsample) == ("depth_to_time", "repeat"):
            raise ValueError(f"--init-from {self.init_from!r}: its decoder upsamples time by "
                             f"{start.vae.temporal_upsample}, model {self.model!r} by {model.vae.temporal_upsample}; "
                             f"only repeat -> depth_to_time can be carried over")
        encoder_only = dict(unscaled, temporal_upsample="")  # what the encoder depends on
        if self.vae_decoder_only and replace(start.vae, **encoder_only) != replace(model.vae, **encoder_only):
            raise ValueError(f"--vae-decoder-only: the encoder of --init-from {self.init_from!r} differs from the one "
                             f"of model {self.model!r}; only the decoder's temporal_upsample may change")
        if start.dit != model.dit or start.text.dim != model.text.dim:
            raise ValueError(f"--init-from {self.init_from!r}: its DiT differs from the one of model {self.model!r}; "
                             f"start from a model of the same shape")


def parse_cond_mix(text: str) -> dict[str, float]:
    """`--cond-mix` text, "extend=0.2,extend_backward=0.4", as {task: share}; a one-line
    ValueError for text of another form (the tasks and shares are checked by TrainConfig)."""
    mix = {}
    for part in filter(None, (p.strip() for p in text.split(","))):
        task, _, share = part.partition("=")
        try:
            mix[task.strip()] = float(share)
        except ValueError:
            raise ValueError(f"--cond-mix {text!r}: write TASK=SHARE pairs, comma-separated "
                             f"(e.g. extend=0.2,extend_backward=0.4)") from None
    return mix


def format_cond_mix(mix: dict[str, float]) -> str:
    return ",".join(f"{k}={v:g}" for k, v in mix.items())
