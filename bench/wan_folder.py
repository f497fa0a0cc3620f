"""Random-weight Wan folders in diffusers' layout, for benchmarks (no hub: every weight is random).

    python bench/wan_folder.py /tmp/wan-small --config small      # writes model_index.json + components

Configs: `small` (a CPU-sized Wan 2.1: 4 layers, width 128) and the real transformer shapes of
`wan2.1-1.3b` and `wan2.1-14b` (only for a GPU: 1.3B is 5 GB and 14B 57 GB in fp32 on disk). The
VAE, text encoder and tokenizer are always small: the benchmarks time the transformer's steps,
which is where a clip's time goes. `transformer_config(name)` gives the transformer's arguments alone.
"""

from __future__ import annotations

import argparse

#: WanTransformer3DModel arguments. The 1.3B and 14B shapes are the released configs' (Wan-AI's
#: Wan2.1-T2V-*-Diffusers/transformer/config.json), except text_dim, which follows the small UMT5 here.
TRANSFORMERS = {
    "small": dict(num_attention_heads=4, attention_head_dim=32, ffn_dim=512, num_layers=4),
    "wan2.1-1.3b": dict(num_attention_heads=12, attention_head_dim=128, ffn_dim=8960, num_layers=30),
    "wan2.1-14b": dict(num_attention_heads=40, attention_head_dim=128, ffn_dim=13824, num_layers=40),
}
COMMON = dict(patch_size=(1, 2, 2), in_channels=16, out_channels=16, freq_dim=256, cross_attn_norm=True,
              qk_norm="rms_norm_across_heads", eps=1e-6, rope_max_seq_len=1024)
TEXT_DIM = 64
WORDS = ("<pad> </s> <unk> a an the red blue green white black circle square ball moves falls right left up on "
         "slowly fast cat dog bakes cake kitchen sunny beach blurry static ugly").split()


def transformer_config(name: str, text_dim: int = TEXT_DIM) -> dict:
    """The arguments of a `WanTransformer3DModel` of config `name`."""
    return {**COMMON, **TRANSFORMERS[name], "text_dim": text_dim}


def tokenizer():
    """A WordLevel tokenizer over `WORDS` (offline), as transformers' fast tokenizer."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(WORDS)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="</s>", unk_token="<unk>")


def build(path: str, config: str = "small", seed: int = 0):
    """Save a random Wan 2.1 T2V pipeline with the transformer of `config` under `path`; returns it."""
    import torch
    from diffusers import AutoencoderKLWan, UniPCMultistepScheduler, WanPipeline, WanTransformer3DModel
    from transformers import UMT5Config, UMT5EncoderModel

    torch.manual_seed(seed)
    text_encoder = UMT5EncoderModel(UMT5Config(vocab_size=len(WORDS), d_model=TEXT_DIM, d_kv=16, d_ff=128,
                                               num_layers=2, num_heads=4, relative_attention_num_buckets=8))
    vae = AutoencoderKLWan(base_dim=8, z_dim=16, dim_mult=[1, 2, 2, 2], num_res_blocks=1,
                           temperal_downsample=[False, True, True])
    transformer = WanTransformer3DModel(**transformer_config(config))
    scheduler = UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=3.0)
    pipe = WanPipeline(tokenizer=tokenizer(), text_encoder=text_encoder, vae=vae, scheduler=scheduler,
                       transformer=transformer)
    pipe.save_pretrained(path)
    return pipe


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("out", help="folder to write")
    p.add_argument("--config", choices=sorted(TRANSFORMERS), default="small")
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args(argv)
    build(a.out, a.config, a.seed)
    print(f"wrote a random {a.config} Wan folder to {a.out}")


if __name__ == "__main__":
    main()
