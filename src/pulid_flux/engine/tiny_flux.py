"""A FLUX.1-dev-shaped diffusers ``FluxPipeline`` at toy width, with random weights made from a seed.

Same classes and code path as the real model (transformer with guidance embedding, 16-channel VAE
with an 8x downsampling, CLIP + T5 text encoders), small enough to run on a CPU in well under a second.
Tokenizers are byte-level and built in code, since no vocabulary can be downloaded here.
"""

from __future__ import annotations

import torch
from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
from transformers import CLIPTextConfig, CLIPTextModel, PreTrainedTokenizerFast, T5Config, T5EncoderModel

# Toy sizes. The ratios that matter to PuLID are kept: several double and single blocks so that the
# cross-attention intervals (every 2nd double, every 4th single block) select more than one block.
TINY_WIDTH = 64  # transformer inner width (heads x head_dim)
TINY_HEADS = 2
TINY_DOUBLE_BLOCKS = 3
TINY_SINGLE_BLOCKS = 5
TINY_TEXT_WIDTH = 32  # CLIP and T5 hidden width
CLIP_MAX_LENGTH = 77  # as openai/clip-vit-large-patch14
T5_MAX_LENGTH = 512  # the longest max_sequence_length the API accepts


def _byte_level_tokenizer(specials: list[str], template: processors.TemplateProcessing, **kwargs):
    """A byte-level BPE tokenizer with no merges: every UTF-8 byte is one token."""
    vocab = {tok: i for i, tok in enumerate(specials + sorted(pre_tokenizers.ByteLevel.alphabet()))}
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.post_processor = template
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, **kwargs), len(vocab)


def clip_tokenizer():
    bos, eos = "<|startoftext|>", "<|endoftext|>"
    template = processors.TemplateProcessing(single=f"{bos} $A {eos}", special_tokens=[(bos, 0), (eos, 1)])
    return _byte_level_tokenizer(
        [bos, eos], template, bos_token=bos, eos_token=eos, pad_token=eos, unk_token=eos,
        model_max_length=CLIP_MAX_LENGTH,
    )


def t5_tokenizer():
    template = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    return _byte_level_tokenizer(
        ["<pad>", "</s>", "<unk>"], template, pad_token="<pad>", eos_token="</s>", unk_token="<unk>",
        model_max_length=T5_MAX_LENGTH,
    )


def flux_scheduler() -> FlowMatchEulerDiscreteScheduler:
    """FLUX.1-dev's scheduler config; FluxPipeline holds one, our own loop does the stepping."""
    return FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15)


def build_tiny_flux(seed: int = 0) -> FluxPipeline:
    """A random-weight FluxPipeline; the same seed always gives the same weights."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return _build()


def _build() -> FluxPipeline:
    tokenizer, clip_vocab = clip_tokenizer()
    tokenizer_2, t5_vocab = t5_tokenizer()
    text_encoder = CLIPTextModel(CLIPTextConfig(
        vocab_size=clip_vocab, hidden_size=TINY_TEXT_WIDTH, intermediate_size=2 * TINY_TEXT_WIDTH,
        num_hidden_layers=2, num_attention_heads=2, max_position_embeddings=CLIP_MAX_LENGTH,
        projection_dim=TINY_TEXT_WIDTH, bos_token_id=0, eos_token_id=1, pad_token_id=1,
    ))
    text_encoder_2 = T5EncoderModel(T5Config(
        vocab_size=t5_vocab, d_model=TINY_TEXT_WIDTH, d_kv=8, d_ff=2 * TINY_TEXT_WIDTH, num_layers=2,
        num_heads=4, pad_token_id=0, eos_token_id=1, decoder_start_token_id=0,
    ))
    head_dim = TINY_WIDTH // TINY_HEADS
    transformer = FluxTransformer2DModel(
        patch_size=1, in_channels=64, num_layers=TINY_DOUBLE_BLOCKS, num_single_layers=TINY_SINGLE_BLOCKS,
        attention_head_dim=head_dim, num_attention_heads=TINY_HEADS, joint_attention_dim=TINY_TEXT_WIDTH,
        pooled_projection_dim=TINY_TEXT_WIDTH, guidance_embeds=True,
        axes_dims_rope=(head_dim // 4, 3 * head_dim // 8, 3 * head_dim // 8),
    )
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=16, block_out_channels=(16, 16, 16, 16),
        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
        layers_per_block=1, norm_num_groups=8, scaling_factor=0.3611, shift_factor=0.1159,
        use_quant_conv=False, use_post_quant_conv=False,
    )
    pipe = FluxPipeline(
        scheduler=flux_scheduler(), vae=vae, text_encoder=text_encoder, tokenizer=tokenizer,
        text_encoder_2=text_encoder_2, tokenizer_2=tokenizer_2, transformer=transformer,
    )
    pipe.set_progress_bar_config(disable=True)
    for module in (text_encoder, text_encoder_2, transformer, vae):
        module.eval()  # built directly, not by from_pretrained: switch off T5's dropout
    return pipe
