"""The tiny presets: Stable Diffusion and domain text encoders that need no download.

Stable Diffusion (``cxr_diffusion.stable_diffusion`` entry points):

* ``tiny-random`` — a seeded miniature built from constructor configs (U-Net ``(32, 64)``, VAE ``[32, 64]``, a 5-layer
  32-wide CLIP text encoder) with the small CLIP tokenizer in ``synthetic/assets``. It needs no download and draws
  noise: use it for plumbing and tests.
* ``tiny-phantom`` — the same architecture with weights trained on chest X-ray phantoms, shipped in
  ``synthetic/assets/tiny_phantom`` (built by ``python -m synthetic.build_tiny_phantom``; see its MODEL_CARD.md). It
  draws phantom chest X-rays but has never seen a finding named. Unlike SD v1.4 it predicts v on a zero-terminal-SNR
  schedule (:func:`tiny_phantom_scheduler_config`), so that its prompt, not the starting noise, decides the layout of
  a 64 px image.
* ``tiny-random-sd2`` — ``tiny-random`` shaped like Stable Diffusion 2.x (its diffusers layout): a U-Net with
  ``use_linear_projection`` and per-block attention heads, a GELU text encoder (OpenCLIP's, as diffusers stores SD 2.x),
  v-prediction, as the 768 px SD 2.x checkpoints. Seeded random weights: every strategy runs on it in the tests.
* ``tiny-random-sana`` — a seeded miniature of the Sana family (:mod:`models.sana`): a 2-layer, 32-wide
  ``SanaTransformer2DModel`` on an 8-channel ``AutoencoderDC`` (4x down-sampling: 64 px images, 16x16 latents), a
  2-layer 32-wide ``Gemma2Model`` with a small Gemma tokenizer built in code (:func:`tiny_gemma_tokenizer`), and
  ``FlowMatchEulerDiscreteScheduler(shift=3.0)``. It draws noise: for plumbing and tests of the flow-matching path.
* ``sd14-random`` — SD v1.4's full-size architecture (docs/formats.md §7: 860 M U-Net, 84 M VAE, 123 M CLIP) with
  seeded random weights and the small tokenizer padded to CLIP's 49,408 ids: for speed and memory benchmarks on a GPU
  without downloading the weights. It draws noise.

Domain text encoders (``cxr_diffusion.domain_encoders``):

* ``tiny-bert`` — a seeded 2-layer, 32-wide ``BertModel`` (with pooler) over the small WordPiece vocabulary in
  ``synthetic/assets/tiny_bert_tokenizer`` (``python -m synthetic.make_tiny_bert_tokenizer``);
* ``tiny-cxr-bert`` — the same encoder as a :class:`~models.domain_encoder.CXRBertModel` with a 16-wide projection
  head, a stand-in for CXR-BERT-specialized in tests (it supports ``projected``, not ``pooler``).
"""
from __future__ import annotations

import functools
import hashlib
from pathlib import Path

import torch

from models.domain_encoder import CXRBertConfig, CXRBertModel, DomainEncoderPreset
from synthetic.make_tiny_tokenizer import WORDS as PROMPT_WORDS
from models.stable_diffusion import SD14_SCHEDULER_CONFIG, StableDiffusionPreset

ASSETS = Path(__file__).resolve().parent / "assets"
TINY_TOKENIZER_DIR = ASSETS / "tiny_clip_tokenizer"
TINY_BERT_TOKENIZER_DIR = ASSETS / "tiny_bert_tokenizer"
TINY_PHANTOM_DIR = ASSETS / "tiny_phantom"
TINY_PROJECTION_SIZE = 16
# The terminal signal level of the tiny-phantom schedule: zero SNR lifted to 2**-24, as diffusers'
# EulerDiscreteScheduler does under rescale_betas_zero_snr, so every sampler (PNDM too) can divide by it.
TERMINAL_ALPHA_CUMPROD = 2.0**-24


# ---------------------------------------------------------------------- Stable Diffusion
def tiny_configs() -> dict:
    """Constructor configs of the ``tiny-random`` miniature (also the CPU benchmark sizes)."""
    return {
        "unet": dict(
            sample_size=32, in_channels=4, out_channels=4, block_out_channels=(32, 64), layers_per_block=2,
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
            cross_attention_dim=32, attention_head_dim=8, norm_num_groups=32,
        ),
        "vae": dict(
            sample_size=64, in_channels=3, out_channels=3, block_out_channels=(32, 64),
            down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"), up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
            latent_channels=4, layers_per_block=1, norm_num_groups=32,
        ),
        "text_encoder": dict(
            hidden_size=32, intermediate_size=37, num_attention_heads=4, num_hidden_layers=5, max_position_embeddings=77,
            layer_norm_eps=1e-5, hidden_act="quick_gelu",
        ),
    }


def tiny_sd2_configs() -> dict:
    """``tiny_configs`` in SD 2.x's shape (diffusers' own SD 2 test components): linear projections in the transformer
    blocks, per-block head dimensions, a GELU text encoder, v-prediction."""
    cfg = tiny_configs()
    cfg["unet"].update(attention_head_dim=(2, 4), use_linear_projection=True)
    cfg["text_encoder"].update(hidden_act="gelu")
    cfg["scheduler"] = {"prediction_type": "v_prediction"}
    return cfg


def sd14_configs() -> dict:
    """Constructor configs of SD v1.4's U-Net, VAE and CLIP text encoder (docs/formats.md §7), for the ``sd14-random``
    preset: the full-size architecture with random weights, for speed and memory benchmarks."""
    return {
        "unet": dict(
            sample_size=64, in_channels=4, out_channels=4, block_out_channels=(320, 640, 1280, 1280), layers_per_block=2,
            down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
            up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
            cross_attention_dim=768, attention_head_dim=8, norm_num_groups=32, norm_eps=1e-5, act_fn="silu",
            downsample_padding=1, flip_sin_to_cos=True, freq_shift=0, mid_block_scale_factor=1,
        ),
        "vae": dict(
            sample_size=512, in_channels=3, out_channels=3, block_out_channels=(128, 256, 512, 512),
            down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
            latent_channels=4, layers_per_block=2, norm_num_groups=32, act_fn="silu", scaling_factor=0.18215,
        ),
        "text_encoder": dict(
            hidden_size=768, intermediate_size=3072, num_attention_heads=12, num_hidden_layers=12,
            max_position_embeddings=77, layer_norm_eps=1e-5, hidden_act="quick_gelu",
        ),
        "vocab_size": 49408,
    }


def load_tiny_tokenizer():
    from transformers import CLIPTokenizer

    return CLIPTokenizer.from_pretrained(str(TINY_TOKENIZER_DIR), model_max_length=77)


def build_from_configs(cfg: dict, seed: int) -> tuple:
    """``(vae, text_encoder, tokenizer, unet, noise_scheduler)`` with weights drawn from ``seed``."""
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    tokenizer = load_tiny_tokenizer()
    if "vocab_size" in cfg:  # ids line up with the embedding table, as in SD's own tokenizer (new tokens go after it)
        tokenizer.add_tokens([f"<|unused-{i}|>" for i in range(cfg["vocab_size"] - len(tokenizer))])
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(**cfg["unet"])
    vae = AutoencoderKL(**cfg["vae"])
    text_config = CLIPTextConfig(**cfg["text_encoder"], vocab_size=cfg.get("vocab_size", len(tokenizer)),
                                 bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                                 pad_token_id=tokenizer.pad_token_id)
    text_encoder = CLIPTextModel(text_config)
    return vae, text_encoder, tokenizer, unet, DDPMScheduler.from_config({**SD14_SCHEDULER_CONFIG, **cfg.get("scheduler", {})})


@functools.lru_cache(maxsize=1)
def tiny_phantom_digest() -> str:
    """First 10 hex digits of the SHA-256 of the shipped U-Net weights: a rebuild changes the key."""
    path = TINY_PHANTOM_DIR / "unet" / "diffusion_pytorch_model.safetensors"
    return hashlib.sha256(path.read_bytes()).hexdigest()[:10] if path.is_file() else "missing"


tiny_random = StableDiffusionPreset("tiny-random", key=lambda seed: f"tiny-random-seed{seed}",
                                    build=lambda seed: build_from_configs(tiny_configs(), seed))
tiny_random_sd2 = StableDiffusionPreset("tiny-random-sd2", key=lambda seed: f"tiny-random-sd2-seed{seed}",
                                        build=lambda seed: build_from_configs(tiny_sd2_configs(), seed))
sd14_random = StableDiffusionPreset("sd14-random", key=lambda seed: f"sd14-random-seed{seed}",
                                    build=lambda seed: build_from_configs(sd14_configs(), seed))
tiny_phantom = StableDiffusionPreset("tiny-phantom", key=lambda seed: f"tiny-phantom-{tiny_phantom_digest()}",
                                     folder=TINY_PHANTOM_DIR)


# ---------------------------------------------------------------------- Sana
def tiny_sana_configs() -> dict:
    """Constructor configs of ``tiny-random-sana`` (diffusers' own Sana test components, a little wider)."""
    return {
        "transformer": dict(patch_size=1, in_channels=8, out_channels=8, num_layers=2, num_attention_heads=2,
                            attention_head_dim=16, num_cross_attention_heads=2, cross_attention_head_dim=16,
                            cross_attention_dim=32, caption_channels=32, mlp_ratio=2.5, sample_size=16),
        "vae": dict(in_channels=3, latent_channels=8, attention_head_dim=8,
                    encoder_block_types=("ResBlock", "ResBlock", "EfficientViTBlock"),
                    decoder_block_types=("ResBlock", "ResBlock", "EfficientViTBlock"),
                    encoder_block_out_channels=(16, 32, 32), decoder_block_out_channels=(16, 32, 32),
                    encoder_qkv_multiscales=((), (), (5,)), decoder_qkv_multiscales=((), (), (5,)),
                    encoder_layers_per_block=(1, 1, 1), decoder_layers_per_block=(1, 1, 1), downsample_block_type="conv",
                    upsample_block_type="interpolate", decoder_norm_types="rms_norm", decoder_act_fns="silu",
                    scaling_factor=0.41407),
        "text_encoder": dict(hidden_size=32, intermediate_size=64, num_attention_heads=2, num_key_value_heads=2, head_dim=16,
                             num_hidden_layers=2, max_position_embeddings=512, attn_implementation="eager"),
        "scheduler": dict(shift=3.0),
    }


def tiny_gemma_tokenizer():
    """A small Gemma tokenizer (``GemmaTokenizer``: BPE with byte fallback, ``<bos>`` first) built in code: Gemma's
    special tokens, the 256 byte tokens, printable ASCII, and one merge chain per word of the suite's prompts (each such
    word one ``▁word`` token, and one ``word`` token at a prompt's start; any other text still tokenizes, letter by letter or byte by byte)."""
    import string

    from transformers import GemmaTokenizer

    vocab = {t: i for i, t in enumerate(["<pad>", "<eos>", "<bos>", "<unk>", "<mask>"])}
    for b in range(256):
        vocab[f"<0x{b:02X}>"] = len(vocab)
    for c in sorted(set("▁" + string.ascii_letters + string.digits + string.punctuation)):
        vocab.setdefault(c, len(vocab))
    words = sorted({w for word in PROMPT_WORDS for w in word.replace("<", " ").replace(">", " ").replace("-", " ").split()})
    # each word with and without the word-start marker: a prompt's first word has none (Gemma adds no prefix space)
    pieces, merges = [list(prefix + w) for w in words for prefix in ("▁", "")], []
    while any(len(w) > 1 for w in pieces):  # greedy BPE until every word is one token (ties broken by the pair itself)
        counts: dict = {}
        for w in pieces:
            for pair in zip(w, w[1:]):
                counts[pair] = counts.get(pair, 0) + 1
        best = min(counts, key=lambda pair: (-counts[pair], pair))
        merges.append(best)
        vocab.setdefault(best[0] + best[1], len(vocab))
        merged = []
        for w in pieces:
            out, j = [], 0
            while j < len(w):
                if j + 1 < len(w) and (w[j], w[j + 1]) == best:
                    out.append(w[j] + w[j + 1])
                    j += 2
                else:
                    out.append(w[j])
                    j += 1
            merged.append(out)
        pieces = merged
    return GemmaTokenizer(vocab=vocab, merges=merges, add_bos_token=True, model_max_length=TINY_SANA_WINDOW)


TINY_SANA_WINDOW = 300


def build_tiny_sana(seed: int, spec):
    """``tiny-random-sana`` with weights drawn from ``seed``."""
    from diffusers import AutoencoderDC, FlowMatchEulerDiscreteScheduler, SanaTransformer2DModel
    from transformers import Gemma2Config, Gemma2Model

    from models.sana import Sana

    cfg = tiny_sana_configs()
    tokenizer = tiny_gemma_tokenizer()
    torch.manual_seed(seed)
    transformer = SanaTransformer2DModel(**cfg["transformer"])
    vae = AutoencoderDC(**cfg["vae"])
    text_encoder = Gemma2Model(Gemma2Config(**cfg["text_encoder"], vocab_size=len(tokenizer), pad_token_id=0, bos_token_id=2,
                                            eos_token_id=1))
    scheduler = FlowMatchEulerDiscreteScheduler(**cfg["scheduler"])
    return Sana(vae, text_encoder, tokenizer, transformer, scheduler, spec)


tiny_random_sana = StableDiffusionPreset("tiny-random-sana", key=lambda seed: f"tiny-random-sana-seed{seed}",
                                         build=build_tiny_sana, family="sana")


# tiny-phantom-sana: a Sana trained on phantoms (python -m synthetic.build_tiny_phantom_sana; its MODEL_CARD.md)
TINY_PHANTOM_SANA_DIR = ASSETS / "tiny_phantom_sana"


def tiny_phantom_sana_configs() -> dict:
    """Constructor configs of ``tiny-phantom-sana``: tiny-random-sana's autoencoder and Gemma-2, a deeper and wider
    transformer (8 layers, 3 heads of 32, 2x2 patches: 8x8 tokens, our choice to fit a CPU build) with sin-cos position
    embeddings (``interpolation_scale=1``, as diffusers' Sana 2K/4K configs; the 512/1024 px ones have none and take
    position from their convolutions only, which we judged too little for a layout in 8 layers), and Sana 512 px's sampling
    shift (3.0) as the training schedule too."""
    cfg = tiny_sana_configs()
    cfg["transformer"].update(patch_size=2, num_layers=8, num_attention_heads=3, attention_head_dim=32, num_cross_attention_heads=3,
                              cross_attention_head_dim=32, cross_attention_dim=96, interpolation_scale=1.0)
    return cfg


@functools.lru_cache(maxsize=1)
def tiny_phantom_sana_digest() -> str:
    """First 10 hex digits of the SHA-256 of the shipped transformer and autoencoder weights: a rebuild changes the key."""
    digest = hashlib.sha256()
    for part in ("transformer", "vae"):
        path = TINY_PHANTOM_SANA_DIR / part / "diffusion_pytorch_model.safetensors"
        if not path.is_file():
            return "missing"
        digest.update(path.read_bytes())
    return digest.hexdigest()[:10]


tiny_phantom_sana = StableDiffusionPreset("tiny-phantom-sana", key=lambda seed: f"tiny-phantom-sana-{tiny_phantom_sana_digest()}",
                                          folder=TINY_PHANTOM_SANA_DIR, family="sana")


# ---- tiny-phantom-sana preset (helper H5 writes its block above this line)

# ---------------------------------------------------------------------- SD 3.5
def tiny_sd3_configs() -> dict:
    """Constructor configs of ``tiny-random-sd3``: SD 3.5 medium's shape in miniature (diffusers' own SD3 pipeline test
    components, a little wider): a 2-layer ``SD3Transformer2DModel`` with patch 2, a dual-attention first block and
    RMS q/k norms (as 3.5 medium), a 16-channel ``AutoencoderKL`` with 4x down-sampling (64 px images, 16x16 latents) and
    SD 3.5's scale and shift, two CLIPs of different widths (16 and 24, pooled 16 + 24 = 40) and a 48-wide T5 (the
    CLIP part, 40 wide, is zero-padded to it), ``FlowMatchEulerDiscreteScheduler(shift=3.0)`` as SD 3.5's folders."""
    clip = dict(intermediate_size=37, layer_norm_eps=1e-5, num_hidden_layers=2, hidden_act="gelu")
    return {
        "transformer": dict(sample_size=16, patch_size=2, in_channels=16, out_channels=16, num_layers=2, attention_head_dim=8,
                            num_attention_heads=4, joint_attention_dim=48, caption_projection_dim=32,
                            pooled_projection_dim=40, pos_embed_max_size=32, dual_attention_layers=(0,), qk_norm="rms_norm"),
        "vae": dict(sample_size=64, in_channels=3, out_channels=3, block_out_channels=(16, 32, 32), layers_per_block=1,
                    down_block_types=("DownEncoderBlock2D",) * 3, up_block_types=("UpDecoderBlock2D",) * 3, latent_channels=16,
                    norm_num_groups=8, use_quant_conv=False, use_post_quant_conv=False, scaling_factor=1.5305,
                    shift_factor=0.0609),
        "text_encoder": dict(clip, hidden_size=16, num_attention_heads=2, projection_dim=16),
        "text_encoder_2": dict(clip, hidden_size=24, num_attention_heads=2, projection_dim=24),
        "text_encoder_3": dict(d_model=48, d_kv=8, d_ff=64, num_layers=2, num_heads=4, relative_attention_num_buckets=8,
                               feed_forward_proj="gated-gelu", is_encoder_decoder=False, use_cache=False),
        "scheduler": dict(shift=3.0),
    }


def tiny_t5_tokenizer(model_max_length: int = 512):
    """A small T5 tokenizer (``T5Tokenizer``: a tokenizers Unigram model, ``</s>`` last) built in code: T5's special
    tokens, ``▁``, the printable ASCII characters, and each word of the suite's prompts as one ``▁word`` piece (and one
    ``word`` piece, for words after punctuation such as ``<lung-xray>``); any other text still tokenizes, character by
    character (characters outside printable ASCII are ``<unk>``). SD 3.5's and PixArt-Σ's tiny presets share it."""
    import string

    from transformers import T5Tokenizer

    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("▁", -2.0)]
    vocab += [(c, -10.0) for c in sorted(set(string.ascii_letters + string.digits + string.punctuation))]
    words = sorted({w for word in PROMPT_WORDS for w in word.replace("<", " ").replace(">", " ").replace("-", " ").split()})
    vocab += [(piece, -1.0) for w in words for piece in ("▁" + w, w) if len(piece) > 1]
    seen: set = set()
    vocab = [(p, s) for p, s in vocab if not (p in seen or seen.add(p))]
    return T5Tokenizer(vocab=vocab, extra_ids=0, model_max_length=model_max_length)


def build_tiny_sd3(seed: int, spec):
    """``tiny-random-sd3`` with weights drawn from ``seed``."""
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection, T5Config, T5EncoderModel

    from models.sd3 import SD3

    cfg = tiny_sd3_configs()
    tokenizer, tokenizer_2, tokenizer_3 = load_tiny_tokenizer(), load_tiny_tokenizer(), tiny_t5_tokenizer()
    ids = dict(vocab_size=len(tokenizer), bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
               pad_token_id=tokenizer.pad_token_id)
    torch.manual_seed(seed)
    transformer = SD3Transformer2DModel(**cfg["transformer"])
    vae = AutoencoderKL(**cfg["vae"])
    text_encoder = CLIPTextModelWithProjection(CLIPTextConfig(**cfg["text_encoder"], **ids))
    text_encoder_2 = CLIPTextModelWithProjection(CLIPTextConfig(**cfg["text_encoder_2"], **ids))
    text_encoder_3 = T5EncoderModel(T5Config(**cfg["text_encoder_3"], vocab_size=len(tokenizer_3), pad_token_id=0,
                                             eos_token_id=1, decoder_start_token_id=0))
    scheduler = FlowMatchEulerDiscreteScheduler(**cfg["scheduler"])
    return SD3(vae, text_encoder, text_encoder_2, text_encoder_3, tokenizer, tokenizer_2, tokenizer_3, transformer, scheduler,
               spec)


tiny_random_sd3 = StableDiffusionPreset("tiny-random-sd3", key=lambda seed: f"tiny-random-sd3-seed{seed}",
                                        build=build_tiny_sd3, family="sd3")

# ---- SD 3.5 preset (helper H1 writes its block above this line)

# PixArt-Σ (helper H2): ``tiny-random-pixart``, a seeded miniature of the pixart family (models/pixart.py): a 2-layer,
# 32-wide PixArtTransformer2DModel (patch 2, learned sigma: 8 output channels) on a 4-channel AutoencoderKL with SDXL's
# scaling factor (4x down-sampling: 64 px images, 16x16 latents), a 2-layer 32-wide T5EncoderModel with a small T5
# tokenizer built in code (tiny_t5_tokenizer), and the hub folders' DPMSolverMultistepScheduler() as its sampler (the
# training schedule is DDPMScheduler read from the same config, as diffusers' PixArt script reads it). It draws noise.
def tiny_pixart_configs() -> dict:
    """Constructor configs of ``tiny-random-pixart`` (diffusers' own PixArt-Σ pipeline test components, a little wider;
    PixArt-XL-2's block settings as diffusers' convert_pixart_sigma_to_diffusers.py writes them)."""
    return {
        "transformer": dict(sample_size=16, num_layers=2, patch_size=2, attention_head_dim=8, num_attention_heads=4,
                            caption_channels=32, in_channels=4, out_channels=8, cross_attention_dim=32, attention_bias=True,
                            activation_fn="gelu-approximate", num_embeds_ada_norm=1000, norm_type="ada_norm_single",
                            norm_elementwise_affine=False, norm_eps=1e-6, use_additional_conditions=False),
        "vae": dict(sample_size=64, in_channels=3, out_channels=3, block_out_channels=(16, 16, 32), layers_per_block=1,
                    down_block_types=("DownEncoderBlock2D",) * 3, up_block_types=("UpDecoderBlock2D",) * 3,
                    latent_channels=4, norm_num_groups=16, scaling_factor=0.13025),  # SDXL's VAE scaling factor
        "text_encoder": dict(d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4, relative_attention_num_buckets=8,
                             relative_attention_max_distance=32, feed_forward_proj="gated-gelu", dropout_rate=0.0),
    }


TINY_PIXART_WINDOW = 300


def build_tiny_pixart(seed: int, spec):
    """``tiny-random-pixart`` with weights drawn from ``seed``."""
    from diffusers import AutoencoderKL, DDPMScheduler, DPMSolverMultistepScheduler, PixArtTransformer2DModel
    from transformers import T5Config, T5EncoderModel

    from models.pixart import PixArtSigma

    cfg = tiny_pixart_configs()
    tokenizer = tiny_t5_tokenizer(TINY_PIXART_WINDOW)
    torch.manual_seed(seed)
    transformer = PixArtTransformer2DModel(**cfg["transformer"])
    vae = AutoencoderKL(**cfg["vae"])
    text_encoder = T5EncoderModel(T5Config(**cfg["text_encoder"], vocab_size=len(tokenizer), pad_token_id=0, eos_token_id=1,
                                           decoder_start_token_id=0))
    sampler = DPMSolverMultistepScheduler()  # the hub folders' (diffusers' conversion script writes its defaults)
    return PixArtSigma(vae, text_encoder, tokenizer, transformer, DDPMScheduler.from_config(sampler.config), spec, sampler)


tiny_random_pixart = StableDiffusionPreset("tiny-random-pixart", key=lambda seed: f"tiny-random-pixart-seed{seed}",
                                           build=build_tiny_pixart, family="pixart")


# ---------------------------------------------------------------------- size presets (helper H2)
# ``sana-0.6b-random`` and ``sd35-medium-random``: the published architectures with seeded random weights, for speed and
# memory benchmarks on a GPU without downloading anything (benchmarks/train_throughput.py --size sana-0.6b / sd35-medium).
# They draw noise. Every part is built on the default device in effect (the benchmark builds under
# ``with torch.device("cuda")``: drawing billions of random weights on a CPU takes minutes); the schedulers and the base
# wrapper on the CPU, as the loaders make them. Tokenizers with the real vocabularies cannot be built offline, so each
# text encoder's embedding table has its real vocabulary's size and the tiny tokenizers give ids in their own range
# (cost per step: the same, an embedding lookup reads one row whatever the table's size). Unlike ``sd14-random`` the
# tokenizers are not padded to the table (their families run no textual inversion, which would add ids after them).
def sana_06b_configs() -> dict:
    """Constructor configs of Sana 0.6B at 512 px (``Efficient-Large-Model/Sana_600M_512px_diffusers``):

    * transformer: diffusers' ``scripts/convert_sana_to_diffusers.py`` (``model_kwargs["SanaMS_600M_P1_D28"]`` and its
      ``transformer_kwargs``: 28 layers, 36 heads of 32, 16 cross-attention heads of 72, caption channels 2304, no
      position embedding at 512 px, ``sample_size = 512 // 32``);
    * autoencoder: ``get_ae_config("dc-ae-f32c32-sana-1.0")`` in diffusers' ``scripts/convert_dcae_to_diffusers.py``
      (32x down-sampling, 32 latent channels, scaling 0.41407), the DC-AE the 600M 512 px folder ships;
    * text encoder: Gemma-2 2B (Sana's ``gemma-2-2b-it``): the values of transformers' ``Gemma2Config`` defaults, which
      are gemma-2-2b's (hidden 2304, 26 layers, 8 heads and 4 key-value heads of 256, MLP 9216, vocabulary 256,000);
    * scheduler: the conversion script's default ``flow-dpm_solver`` (``DPMSolverMultistepScheduler(flow_shift=3.0,
      use_flow_sigmas=True, prediction_type="flow_prediction")``), which the Sana loader reads as its sampler; training
      uses ``FlowMatchEulerDiscreteScheduler`` read from that config, as diffusers' Sana script does (shift 1.0)."""
    blocks = ("ResBlock",) * 3 + ("EfficientViTBlock",) * 3
    return {
        "transformer": dict(in_channels=32, out_channels=32, num_attention_heads=36, attention_head_dim=32, num_layers=28,
                            num_cross_attention_heads=16, cross_attention_head_dim=72, cross_attention_dim=1152,
                            caption_channels=2304, mlp_ratio=2.5, attention_bias=False, sample_size=16, patch_size=1,
                            norm_elementwise_affine=False, norm_eps=1e-6, interpolation_scale=None),
        "vae": dict(latent_channels=32, encoder_block_types=blocks, decoder_block_types=blocks,
                    encoder_block_out_channels=(128, 256, 512, 512, 1024, 1024),
                    decoder_block_out_channels=(128, 256, 512, 512, 1024, 1024),
                    encoder_qkv_multiscales=((), (), (), (5,), (5,), (5,)), decoder_qkv_multiscales=((), (), (), (5,), (5,), (5,)),
                    encoder_layers_per_block=(2, 2, 2, 3, 3, 3), decoder_layers_per_block=(3, 3, 3, 3, 3, 3),
                    downsample_block_type="conv", upsample_block_type="interpolate", decoder_norm_types="rms_norm",
                    decoder_act_fns="silu", scaling_factor=0.41407),
        "text_encoder": dict(hidden_size=2304, intermediate_size=9216, num_hidden_layers=26, num_attention_heads=8,
                             num_key_value_heads=4, head_dim=256, max_position_embeddings=8192, vocab_size=256000),
        "sampler": dict(flow_shift=3.0, use_flow_sigmas=True, prediction_type="flow_prediction"),
    }


def build_sana_06b(seed: int, spec):
    """``sana-0.6b-random`` with weights drawn from ``seed`` on the default device."""
    from diffusers import AutoencoderDC, DPMSolverMultistepScheduler, FlowMatchEulerDiscreteScheduler, SanaTransformer2DModel
    from transformers import Gemma2Config, Gemma2Model

    from models.sana import Sana

    cfg = sana_06b_configs()
    tokenizer = tiny_gemma_tokenizer()
    torch.manual_seed(seed)
    transformer = SanaTransformer2DModel(**cfg["transformer"])
    vae = AutoencoderDC(**cfg["vae"])
    text_encoder = Gemma2Model(Gemma2Config(**cfg["text_encoder"], pad_token_id=0, bos_token_id=2, eos_token_id=1))
    with torch.device("cpu"):
        sampler = DPMSolverMultistepScheduler(**cfg["sampler"])
        # what FlowMatchEulerDiscreteScheduler.from_pretrained reads from that folder: its step count, no shift (1.0)
        noise_scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=sampler.config.num_train_timesteps)
        return Sana(vae, text_encoder, tokenizer, transformer, noise_scheduler, spec, sampler)


def sd35_medium_configs() -> dict:
    """Constructor configs of SD 3.5 medium (``stabilityai/stable-diffusion-3.5-medium``):

    * transformer: ``SD3Transformer2DModel`` as diffusers' ``scripts/convert_sd3_to_diffusers.py`` builds it (sample 128,
      patch 2, 16 channels, joint attention 4096, ``num_attention_heads = num_layers``), with what that script reads
      from the 3.5 medium checkpoint, as its comments say: 24 layers, caption projection 1536 (24 x 64), dual attention
      in blocks 0-12, RMS q/k norms, position embeddings up to 384 (the 24 layers and 1536 are our reading of the
      checkpoint's shapes, not printed in diffusers);
    * autoencoder: the same script's ``AutoencoderKL.from_config("stabilityai/stable-diffusion-xl-base-1.0", ...,
      latent_channels=16, use_quant_conv=False, use_post_quant_conv=False, scaling_factor=1.5305, shift_factor=0.0609)``,
      SDXL's VAE layout written out (128/256/512/512 channels, 2 layers per block);
    * text encoders: CLIP ViT-L/14's text tower (768 wide, 12 layers, quick-GELU), OpenCLIP ViT-bigG/14's (1280 wide,
      32 layers, 20 heads, MLP 5120, GELU), both with projections, and T5 v1.1 XXL's encoder (4096 wide, 24 layers, 64
      heads, gated-GELU MLP 10240, vocabulary 32,128): the published configs of those models as the SD3 folders carry
      them (from the models' papers and cards; the hub files themselves could not be read offline);
    * scheduler: ``FlowMatchEulerDiscreteScheduler(shift=3.0)``, SD 3.5's."""
    clip = dict(max_position_embeddings=77, layer_norm_eps=1e-5, vocab_size=49408)
    return {
        "transformer": dict(sample_size=128, patch_size=2, in_channels=16, out_channels=16, num_layers=24, attention_head_dim=64,
                            num_attention_heads=24, joint_attention_dim=4096, caption_projection_dim=1536,
                            pooled_projection_dim=2048, pos_embed_max_size=384, dual_attention_layers=tuple(range(13)),
                            qk_norm="rms_norm"),
        "vae": dict(sample_size=1024, in_channels=3, out_channels=3, block_out_channels=(128, 256, 512, 512), layers_per_block=2,
                    down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4, latent_channels=16,
                    norm_num_groups=32, act_fn="silu", use_quant_conv=False, use_post_quant_conv=False, force_upcast=True,
                    scaling_factor=1.5305, shift_factor=0.0609),
        "text_encoder": dict(clip, hidden_size=768, intermediate_size=3072, num_attention_heads=12, num_hidden_layers=12,
                             projection_dim=768, hidden_act="quick_gelu"),
        "text_encoder_2": dict(clip, hidden_size=1280, intermediate_size=5120, num_attention_heads=20, num_hidden_layers=32,
                               projection_dim=1280, hidden_act="gelu"),
        "text_encoder_3": dict(d_model=4096, d_kv=64, d_ff=10240, num_layers=24, num_heads=64, relative_attention_num_buckets=32,
                               relative_attention_max_distance=128, feed_forward_proj="gated-gelu", layer_norm_epsilon=1e-6,
                               vocab_size=32128, is_encoder_decoder=False, use_cache=False),
        "scheduler": dict(shift=3.0),
    }


def build_sd35_medium(seed: int, spec):
    """``sd35-medium-random`` with weights drawn from ``seed`` on the default device."""
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection, T5Config, T5EncoderModel

    from models.sd3 import SD3

    cfg = sd35_medium_configs()
    tokenizer, tokenizer_2, tokenizer_3 = load_tiny_tokenizer(), load_tiny_tokenizer(), tiny_t5_tokenizer()
    ids = dict(bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    torch.manual_seed(seed)
    transformer = SD3Transformer2DModel(**cfg["transformer"])
    vae = AutoencoderKL(**cfg["vae"])
    text_encoder = CLIPTextModelWithProjection(CLIPTextConfig(**cfg["text_encoder"], **ids))
    text_encoder_2 = CLIPTextModelWithProjection(CLIPTextConfig(**cfg["text_encoder_2"], **ids))
    text_encoder_3 = T5EncoderModel(T5Config(**cfg["text_encoder_3"], pad_token_id=0, eos_token_id=1, decoder_start_token_id=0))
    with torch.device("cpu"):
        scheduler = FlowMatchEulerDiscreteScheduler(**cfg["scheduler"])
        return SD3(vae, text_encoder, text_encoder_2, text_encoder_3, tokenizer, tokenizer_2, tokenizer_3, transformer,
                   scheduler, spec)


sana_06b_random = StableDiffusionPreset("sana-0.6b-random", key=lambda seed: f"sana-0.6b-random-seed{seed}",
                                        build=build_sana_06b, family="sana")
sd35_medium_random = StableDiffusionPreset("sd35-medium-random", key=lambda seed: f"sd35-medium-random-seed{seed}",
                                           build=build_sd35_medium, family="sd3")


# ---- size presets (helper H2 writes its block above this line)


def tiny_phantom_scheduler_config() -> dict:
    """SD v1.4's scheduler rescaled to zero terminal SNR, with v-prediction and trailing timesteps (Lin et al. 2024).

    Why: under SD v1.4's schedule the last training step still keeps sqrt(0.0047) of the image. In a
    32x32x4 latent that is enough for a large structure such as a pleural effusion to be read from
    the starting noise, so a U-Net learns to take the layout from the noise and never from the
    prompt; ε-prediction also gives the prompt almost no gradient at the high noise levels where it
    would matter. Measured once (the tiny-phantom MODEL_CARD.md): a U-Net trained from scratch on two
    prompts, each with its own phantoms, drew images the phantom classifier could hardly tell apart
    by prompt on SD v1.4's schedule (AUROC 0.55), and could on this one (0.91). The betas are
    written out (``trained_betas``) so every diffusers sampler reads the same schedule; PNDM has no
    ``rescale_betas_zero_snr`` option.
    """
    from diffusers.schedulers.scheduling_ddim import rescale_zero_terminal_snr

    base = SD14_SCHEDULER_CONFIG
    steps = base["num_train_timesteps"]
    betas = torch.linspace(base["beta_start"] ** 0.5, base["beta_end"] ** 0.5, steps, dtype=torch.float64) ** 2
    alphas_cumprod = torch.cumprod(1.0 - rescale_zero_terminal_snr(betas), dim=0)
    alphas_cumprod[-1] = TERMINAL_ALPHA_CUMPROD
    betas = 1.0 - alphas_cumprod / torch.cat([torch.ones(1, dtype=torch.float64), alphas_cumprod[:-1]])
    return {**base, "trained_betas": [round(float(b), 10) for b in betas], "prediction_type": "v_prediction",
            "timestep_spacing": "trailing"}


# ---------------------------------------------------------------------- domain text encoders
def tiny_bert_config(vocab_size: int) -> dict:
    """Constructor config of the tiny presets' encoder."""
    return dict(vocab_size=vocab_size, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=37,
                max_position_embeddings=128, pad_token_id=0)


def load_tiny_bert_tokenizer():
    from transformers import BertTokenizer

    vocab = TINY_BERT_TOKENIZER_DIR / "vocab.txt"
    if not vocab.is_file():
        raise FileNotFoundError(f"{vocab}: the tiny BERT vocabulary is missing; rebuild it with "
                                "`python -m synthetic.make_tiny_bert_tokenizer`")
    return BertTokenizer(vocab=str(vocab), do_lower_case=True, model_max_length=128)


def _tiny_bert(seed: int) -> tuple:
    from transformers import BertConfig, BertModel

    tokenizer = load_tiny_bert_tokenizer()
    torch.manual_seed(seed)
    return BertModel(BertConfig(**tiny_bert_config(len(tokenizer)))), tokenizer


def _tiny_cxr_bert(seed: int) -> tuple:
    tokenizer = load_tiny_bert_tokenizer()
    torch.manual_seed(seed)
    return CXRBertModel(CXRBertConfig(projection_size=TINY_PROJECTION_SIZE, **tiny_bert_config(len(tokenizer)))), tokenizer


tiny_bert = DomainEncoderPreset("tiny-bert", build=_tiny_bert)
tiny_cxr_bert = DomainEncoderPreset("tiny-cxr-bert", build=_tiny_cxr_bert)
