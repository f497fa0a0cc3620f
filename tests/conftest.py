"""Fixtures shared by every test package.

S3: a real S3 API server (moto's ThreadedMotoServer) on loopback for the whole session. The
fixture exports the standard AWS settings a user would set in a shell (AWS_ENDPOINT_URL plus test
credentials), so the code under test and any Ray workers started afterwards reach it with no
special configuration.

Wan: tiny random Wan folders in diffusers' layout (`wan_folders`, `wan_pipelines`), built once per
session, for every test that renders a real open-checkpoint layout (models, batch, serve).
"""

import logging
import os
import tempfile
import uuid

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing in the tests loads from a hub
# Model caches (copies of remote folders, weight digests) in the session's own folder, not ~/.cache:
# set before any models module reads it, and inherited by Ray workers and subprocesses.
os.environ.setdefault("REELFORGE_CACHE", tempfile.mkdtemp(prefix="reelforge-test-cache-"))

_S3_ENV_CLEARED = ("AWS_ENDPOINT_URL_S3", "AWS_PROFILE", "AWS_DEFAULT_PROFILE", "AWS_SESSION_TOKEN",
                   "AWS_SECURITY_TOKEN", "AWS_IGNORE_CONFIGURED_ENDPOINT_URLS")


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory):
    """Endpoint URL of a loopback S3 server; sets AWS_* in os.environ for the session."""
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # one log line per request otherwise
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    endpoint = f"http://{host}:{port}"
    aws_dir = tmp_path_factory.mktemp("aws")
    (aws_dir / "config").write_text("")
    (aws_dir / "credentials").write_text("")
    with pytest.MonkeyPatch.context() as mp:
        for name in _S3_ENV_CLEARED:
            mp.delenv(name, raising=False)
        mp.setenv("AWS_ENDPOINT_URL", endpoint)
        mp.setenv("AWS_ACCESS_KEY_ID", "testing")
        mp.setenv("AWS_SECRET_ACCESS_KEY", "testing")
        mp.setenv("AWS_DEFAULT_REGION", "us-east-1")
        mp.setenv("AWS_REGION", "us-east-1")
        # Keep a developer's ~/.aws out of it: no profile, endpoint or credentials from there.
        mp.setenv("AWS_CONFIG_FILE", str(aws_dir / "config"))
        mp.setenv("AWS_SHARED_CREDENTIALS_FILE", str(aws_dir / "credentials"))
        mp.setenv("AWS_EC2_METADATA_DISABLED", "true")
        try:
            yield endpoint
        finally:
            server.stop()


@pytest.fixture
def bucket(s3_server):
    """A fresh, empty bucket on the loopback S3 server; yields its name."""
    import boto3

    name = f"test-{uuid.uuid4().hex[:16]}"
    boto3.client("s3", endpoint_url=s3_server).create_bucket(Bucket=name)
    return name


@pytest.fixture
def s3_bucket(bucket):
    """Alias of `bucket`."""
    return bucket


# --- tiny random Wan folders in diffusers' layout, built once per session (offline, CPU, ~1 s each) ---
# The components are diffusers' and transformers' own, at toy sizes (after diffusers' tests/pipelines/wan):
# a WordLevel tokenizer, a 2-layer UMT5 encoder, AutoencoderKLWan, WanTransformer3DModel and UniPC with
# flow sigmas, saved by `WanPipeline.save_pretrained` with small shards (several files per component):
#     wan21   Wan 2.1 T2V: z=16 VAE (8x spatial, 4x temporal), patch (1, 2, 2), flow_shift 3
#     ti2v    Wan 2.2 TI2V-5B: z=48 residual VAE with patch 2 (16x spatial), expand_timesteps, flow_shift 5
#     a14b    Wan 2.2 A14B: two transformers, boundary_ratio 0.875

WORDS = ("<pad> </s> <unk> a an the red blue green white black circle square ball moves falls right left up on "
         "slowly fast cat dog bakes cake blurry static ugly").split()


def _tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(WORDS)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="</s>", unk_token="<unk>")


def _transformer(seed, channels, heads=2, **image):
    import torch
    from diffusers import WanTransformer3DModel

    torch.manual_seed(seed)
    out_channels = image.pop("out_channels", channels)
    return WanTransformer3DModel(patch_size=(1, 2, 2), num_attention_heads=heads, attention_head_dim=12,
                                 in_channels=channels, out_channels=out_channels, text_dim=32, freq_dim=256,
                                 ffn_dim=32, num_layers=2, cross_attn_norm=True, qk_norm="rms_norm_across_heads",
                                 rope_max_seq_len=32, **image)


def build_wan_folder(path, variant: str, heads: int = 2):
    """Save a tiny random Wan pipeline of `variant` ("wan21", "ti2v", "a14b") under `path`; returns the
    pipeline (its modules in eval mode, as `from_pretrained` gives them). `heads`: the transformers'
    attention heads (of 12 channels each): 4 lets tp=2 and Ulysses sp=2 both divide them."""
    import torch
    from diffusers import AutoencoderKLWan, UniPCMultistepScheduler, WanPipeline
    from transformers import UMT5Config, UMT5EncoderModel

    torch.manual_seed(0)
    text_encoder = UMT5EncoderModel(UMT5Config(vocab_size=len(WORDS), d_model=32, d_kv=8, d_ff=64, num_layers=2,
                                               num_heads=4, relative_attention_num_buckets=8))
    torch.manual_seed(1)
    if variant == "ti2v":
        vae = AutoencoderKLWan(base_dim=4, z_dim=48, in_channels=12, out_channels=12, is_residual=True, patch_size=2,
                               latents_mean=[0.05 * (i % 7) for i in range(48)],
                               latents_std=[0.5 + 0.1 * (i % 5) for i in range(48)], dim_mult=[1, 1, 1, 1],
                               num_res_blocks=1, scale_factor_spatial=16, scale_factor_temporal=4,
                               temperal_downsample=[False, True, True])
    else:
        vae = AutoencoderKLWan(base_dim=4, z_dim=16, dim_mult=[1, 2, 2, 2], num_res_blocks=1,
                               temperal_downsample=[False, True, True])
    channels = 48 if variant == "ti2v" else 16
    scheduler = UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True,
                                        flow_shift=5.0 if variant == "ti2v" else 3.0)
    extra = {}
    if variant == "a14b":
        extra = {"transformer_2": _transformer(3, channels, heads), "boundary_ratio": 0.875}
    if variant == "ti2v":
        extra = {"expand_timesteps": True}
    pipe = WanPipeline(tokenizer=_tokenizer(), text_encoder=text_encoder, vae=vae, scheduler=scheduler,
                       transformer=_transformer(2, channels, heads), **extra)
    pipe.save_pretrained(str(path), max_shard_size="60KB")
    for module in pipe.components.values():
        if isinstance(module, torch.nn.Module):
            module.eval()
    return pipe


VARIANTS = ("wan21", "ti2v", "a14b")
#: image-to-video folders (`WanImageToVideoPipeline`): Wan 2.1 I2V (a CLIP vision encoder of 64 + 1 tokens),
#: Wan 2.1 FLF2V (the same with a position table for two pictures), Wan 2.2 I2V-A14B (two experts, no encoder);
#: 36 input channels (16 noisy latents, 4 mask, 16 picture latents)
IMAGE_VARIANTS = ("i2v", "flf2v", "i2v-a14b")


def build_wan_image_folder(path, variant: str):
    """Save a tiny random `WanImageToVideoPipeline` of `variant` (IMAGE_VARIANTS) under `path`, on the Wan 2.1
    text encoder and VAE of `build_wan_folder`; returns the pipeline (modules in eval mode)."""
    import torch
    from diffusers import WanImageToVideoPipeline
    from transformers import CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModel

    base = build_wan_folder(str(path) + "-t2v-base", "wan21")
    parts = {k: base.components[k] for k in ("tokenizer", "text_encoder", "vae", "scheduler")}
    extra = {}
    if variant == "i2v-a14b":
        extra = {"transformer_2": _transformer(5, 36, out_channels=16), "boundary_ratio": 0.875}
    else:
        torch.manual_seed(4)
        extra = {"image_encoder": CLIPVisionModel(CLIPVisionConfig(
                     hidden_size=8, intermediate_size=16, num_hidden_layers=2, num_attention_heads=2, image_size=32,
                     patch_size=4)),
                 "image_processor": CLIPImageProcessor(crop_size=32, size=32)}
    image = {} if variant == "i2v-a14b" else {"image_dim": 8, "added_kv_proj_dim": 24}
    if variant == "flf2v":
        image["pos_embed_seq_len"] = 2 * 65
    pipe = WanImageToVideoPipeline(**parts, transformer=_transformer(4, 36, out_channels=16, **image), **extra)
    pipe.save_pretrained(str(path), max_shard_size="60KB")
    for module in pipe.components.values():
        if isinstance(module, torch.nn.Module):
            module.eval()
    return pipe


@pytest.fixture(scope="session")
def wan_image_pipelines(tmp_path_factory):
    """{variant: (folder, `WanImageToVideoPipeline.from_pretrained(folder)`)} of IMAGE_VARIANTS, built on
    first use: the reference the image-conditioned Wan tests compare against."""
    from diffusers import WanImageToVideoPipeline

    return _built_folders(tmp_path_factory.mktemp("wan-image"), IMAGE_VARIANTS, build_wan_image_folder,
                          WanImageToVideoPipeline)


def _built_folders(root, variants, build, pipeline_class) -> dict:
    """{variant: (folder, `pipeline_class.from_pretrained(folder)`)} of tiny folders `build` makes under `root`."""
    out = {}
    for v in variants:
        folder = str(root / f"Tiny-{v}-Diffusers")
        build(folder, v)
        out[v] = (folder, pipeline_class.from_pretrained(folder))
    return out


@pytest.fixture(scope="session")
def wan_pipelines(tmp_path_factory):
    """{variant: (folder, `WanPipeline.from_pretrained(folder)`)}, built on first use: diffusers'
    own loading of the folder, the reference every Wan test compares against."""
    from diffusers import WanPipeline

    return _built_folders(tmp_path_factory.mktemp("wan"), VARIANTS, build_wan_folder, WanPipeline)


@pytest.fixture(scope="session")
def wan_folders(wan_pipelines):
    """{"wan21": dir, "ti2v": dir, "a14b": dir}: the tiny folders."""
    return {v: folder for v, (folder, _) in wan_pipelines.items()}


# --- random LoRA adapters for the tiny Wan folders (tests/models/wan/test_wan_lora.py and the pipeline's) ---
#: diffusers' names of a Wan block's linear layers → the original Wan / ComfyUI names
COMFY_LAYER_NAMES = {"attn1.to_q": "self_attn.q", "attn1.to_k": "self_attn.k", "attn1.to_v": "self_attn.v",
                     "attn1.to_out.0": "self_attn.o", "attn2.to_q": "cross_attn.q", "attn2.to_k": "cross_attn.k",
                     "attn2.to_v": "cross_attn.v", "attn2.to_out.0": "cross_attn.o", "ffn.net.0.proj": "ffn.0",
                     "ffn.net.2": "ffn.2"}


def write_wan_lora(path, folder, seed: int = 0, rank: int = 4, names: str = "diffusers", misfit: bool = False):
    """Write a random rank-`rank` LoRA safetensors file for every linear layer of the tiny Wan `folder`'s
    transformer blocks and return `path`. `names`: "diffusers" (`transformer.blocks.0.attn1.to_q.lora_A.weight`)
    or "comfy" (`diffusion_model.blocks.0.self_attn.q.lora_down.weight`, with `.alpha` = rank: scale 1), the
    same tensors for the same seed. `misfit`: every lora_A one input column too wide (an adapter made for
    another checkpoint size)."""
    import torch
    from diffusers import WanTransformer3DModel
    from safetensors.torch import save_file

    model = WanTransformer3DModel.from_pretrained(folder, subfolder="transformer")
    g = torch.Generator().manual_seed(seed)
    tensors = {}
    for name, layer in model.named_modules():
        if not (isinstance(layer, torch.nn.Linear) and name.startswith("blocks.")):
            continue
        down = torch.randn(rank, layer.in_features + int(misfit), generator=g) * 0.3
        up = torch.randn(layer.out_features, rank, generator=g) * 0.3
        if names == "diffusers":
            tensors.update({f"transformer.{name}.lora_A.weight": down, f"transformer.{name}.lora_B.weight": up})
        else:
            _, block, layer_name = name.split(".", 2)
            key = f"diffusion_model.blocks.{block}.{COMFY_LAYER_NAMES[layer_name]}"
            tensors.update({f"{key}.lora_down.weight": down, f"{key}.lora_up.weight": up,
                            f"{key}.alpha": torch.tensor(float(rank))})
    save_file(tensors, str(path))
    return str(path)
