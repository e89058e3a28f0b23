"""Backbone: VAE, video U-Net + ReferenceNet, noise schedule and sampler.

Variants (``--config configs/backbone.py:VARIANT``):
  tiny  CPU tests and the quick demo: seconds per step.
  mid   benchmark size between tiny and SD1.5.
  sd15  real Stable Diffusion 1.5 + AnimateDiff sizes (converted weights fit it), Hallo settings:
        512×512 at 25 fps, 16 frames + 2 motion frames, v-prediction with zero-terminal-SNR,
        trailing DDIM, 40 steps.
Override any field: ``--config.model.unet.layers_per_block=1``.

Audio and emotion features: the stage configs (configs/training.py) train every variant on per-frame
log-mel (``data.features=""``; speech emotion = log-mel, emotion sources label + speech). The real
sd15 recipe (Hallo's audio path, MoEE's text and speech emotion) uses pretrained encoders through a
feature cache: ``moee features --audio_encoder wav2vec2-base --text_encoder t5-base`` once, then
``data.features`` = that folder with the widths below (768 for both) and sources label + text + speech.
"""

from ml_collections import ConfigDict

VARIANTS = ("tiny", "mid", "sd15")


def get_config(arg: str = "tiny") -> ConfigDict:
    variant = arg or "tiny"
    if variant not in VARIANTS:
        raise ValueError(f"unknown config variant {variant!r}; choose one of {VARIANTS}")
    c = ConfigDict()
    c.variant = variant
    c.seed = 0
    c.dtype = "float32"  # compute dtype of activations; "bfloat16" on accelerators

    if variant == "sd15":
        vae = dict(block_out_channels=(128, 256, 512, 512), layers_per_block=2, norm_num_groups=32)
        unet = dict(
            block_out_channels=(320, 640, 1280, 1280),
            down_attention=(True, True, True, False),
            layers_per_block=2,
            num_attention_heads=8,
            cross_attention_dim=768,
            norm_num_groups=32,
            motion_num_attention_heads=8,
            motion_norm_num_groups=32,
            audio_dim=768,
        )
        video = dict(image_size=(512, 512), num_frames=16, motion_frames=2, fps=25)
        face_locator = dict(channels=(16, 32, 64, 128))
        sampler = dict(name="ddim", num_steps=40, spacing="trailing", eta=0.0)
    elif variant == "mid":
        vae = dict(block_out_channels=(32, 64, 128, 128), layers_per_block=1, norm_num_groups=16)
        unet = dict(
            block_out_channels=(64, 128, 256, 256),
            down_attention=(True, True, True, False),
            layers_per_block=2,
            num_attention_heads=8,
            cross_attention_dim=256,
            norm_num_groups=32,
            motion_num_attention_heads=8,
            motion_norm_num_groups=32,
            audio_dim=256,
        )
        video = dict(image_size=(256, 256), num_frames=8, motion_frames=2, fps=25)
        face_locator = dict(channels=(8, 16, 32, 64))
        sampler = dict(name="ddim", num_steps=25, spacing="trailing", eta=0.0)
    else:
        vae = dict(block_out_channels=(8, 16), layers_per_block=1, norm_num_groups=4)
        unet = dict(
            block_out_channels=(32, 64),
            down_attention=(True, False),
            layers_per_block=1,
            num_attention_heads=4,
            cross_attention_dim=32,
            norm_num_groups=8,
            motion_num_attention_heads=4,
            motion_norm_num_groups=8,
            audio_dim=32,
        )
        # The tiny VAE downsamples 2×, so 32×32 images give 16×16 latents.
        video = dict(image_size=(32, 32), num_frames=4, motion_frames=2, fps=25)
        face_locator = dict(channels=(8, 16))
        sampler = dict(name="ddim", num_steps=8, spacing="trailing", eta=0.0)

    c.model = ConfigDict()
    # kind "kl": SD's KL VAE (converted SD weights keep scaling_factor; one trained here measures its
    # latent statistics from data). kind "space_to_depth" (+ factor): lossless, for small demos.
    c.model.vae = ConfigDict(dict(vae, kind="kl", latent_channels=4, scaling_factor=0.18215))
    c.model.unet = ConfigDict(unet)
    # "blockwise" (flash-style, pure JAX) runs everywhere and is fastest on CPU; "cudnn" on NVIDIA GPUs
    # where head dims allow (≤ 128), "pallas" on TPU; "xla" is the plain reference.
    c.model.unet.attention_implementation = "blockwise"
    # Activation rematerialisation in training: "none" | "full" | "dots" (memory for recompute).
    c.model.unet.remat = "none"
    c.model.face_locator = ConfigDict(face_locator)
    # Emotion conditioning (MoEE / DICE-Talk). ``sources``: any of label / text / speech (through
    # Emotion-to-Latents), or ("embedder",) for the Gaussian embedder (+ ``bank``).
    # ``moe_variant``: moe | single | no_global | no_local (the ablations).
    wide = variant == "sd15"
    c.model.emotion = ConfigDict(
        dict(
            sources=("label", "text", "speech"),
            token_dim=768 if wide else unet["cross_attention_dim"],
            num_tokens=16 if wide else 4,
            moe_variant="moe",
            moe_heads=8 if wide else 2,
            latents_layers=2 if wide else 1,
            latents_heads=8 if wide else 2,
            # Widths of the text / speech emotion features: the feature cache's T5 (t5-base: 768) and
            # wav2vec2 (wav2vec2-base, last layer: 768) for sd15. The stage configs train on log-mel and
            # set speech_dim = data.mel_bins and sources = (label, speech) (configs/training.py).
            text_dim=768 if wide else 32,
            speech_dim=768 if wide else 32,
            embedder_dim=128 if wide else 16,
            embedder_heads=4 if wide else 2,
            embedder_audio_layers=2 if wide else 1,
            embedder_layers=2 if wide else 1,
            embedder_visual_channels=(32, 64, 128) if wide else (8, 16),
            bank=False,
            bank_size=64 if wide else 8,
            bank_beta=0.25,
            discriminator=False,
            num_classes=7,
            discriminator_hidden=512 if wide else 32,
        )
    )
    # Audio windows → tokens: per-frame log-mel windows (±data.audio_context_frames) by default; with a
    # feature cache, Hallo's wav2vec2-base windows (12 layers + embeddings, ±2 frames) → 32 tokens for sd15.
    c.model.audio = ConfigDict(dict(num_tokens=32 if wide else 4, hidden_dim=512 if wide else 32))
    c.model.context_tokens = 4  # identity / image tokens fed to cross-attention

    c.video = ConfigDict(video)
    c.diffusion = ConfigDict(
        dict(
            beta_schedule="scaled_linear",
            beta_start=0.00085,
            beta_end=0.012,
            num_train_timesteps=1000,
            rescale_zero_terminal_snr=True,
            prediction_type="v_prediction",
        )
    )
    c.sampler = ConfigDict(sampler)
    # Nested CFG scales, in condition order: reference, audio, emotion (Hallo uses 3.5 overall).
    c.guidance = ConfigDict(dict(reference=2.0, audio=3.5, emotion=3.5))
    # Compound emotions (palettes of several emotions) at inference: "guidance" mixes the guided
    # predictions of one batch row per basic emotion, "gate" sets the palette as every Emotion MoE's
    # global gate (MoEE's palette); see moee_jax.inference.compounds.
    c.compound_mixing = "guidance"
    c.mesh = ConfigDict(dict(shape=(-1, 1, 1)))
    # Logical axis → mesh axis pairs for params and activations (moee_jax.parallel.rules); None keeps
    # the default table, which says why each choice is made.
    c.sharding_rules = None
    return c
