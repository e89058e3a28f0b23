"""Shared training settings of every stage; the stage files (vae.py, embedder.py, stage1.py,
stage2.py) call :func:`training_config`. Not a config file itself."""

import importlib.util
import pathlib

from ml_collections import ConfigDict


def _backbone():
    spec = importlib.util.spec_from_file_location("moee_configs_backbone", pathlib.Path(__file__).with_name("backbone.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def latent_factor(c: ConfigDict) -> int:
    """Pixels per latent cell along a side for ``c.model.vae`` (the masks' downsampling)."""
    if c.model.vae.get("kind", "kl") == "space_to_depth":
        return int(c.model.vae.factor)
    return 2 ** (len(c.model.vae.block_out_channels) - 1)


def training_config(stage: str, variant: str) -> ConfigDict:
    """``configs/backbone.py:<variant>`` plus ``stage``, ``train``, ``data`` and ``checkpoint``."""
    c = _backbone().get_config(variant)
    tiny = c.variant == "tiny"
    c.stage = stage
    c.train = ConfigDict(dict(
        steps=40 if tiny else 100_000,
        batch_size=8 if tiny else 64,  # global, over all processes; divisible by the data × fsdp mesh size
        learning_rate=1e-3 if tiny else 1e-5,
        warmup_steps=0 if tiny else 500,
        schedule="constant",  # or "cosine" (decays to learning_rate · final_lr_fraction)
        final_lr_fraction=0.1,
        b1=0.9, b2=0.999, eps=1e-8, weight_decay=1e-2,
        grad_clip=1.0,
        grad_accum=1,  # micro-batches per step (the per-process batch is split into this many)
        ema_decay=0.0 if tiny else 0.9999,  # 0 disables the EMA
        log_every=5 if tiny else 50,
        nan_patience=10,  # stop after this many non-finite steps in a row (their updates are skipped)
        init_from=[],  # final/ dirs of earlier stages; default: this run's earlier stages
        init_skip=[],  # path patterns the earlier stages do not fill (they keep their fresh initialisation)
        # Diffusion losses (stage1 / stage2): MoEE §3.5.
        min_snr_gamma=0.0,  # 0 disables min-SNR weighting; 5.0 is Hang et al.'s choice
        noise_offset=0.0,
        spatial_weight=0.1,  # L_spatial = w(t)(L1 + perceptual) on decoded x̂0 frames
        spatial_frames=1,
        perceptual=ConfigDict(dict(vgg="", lin="", weight=1.0, allow_pickle=False)),  # LPIPS weights, optional
        cls_weight=0.1,  # L_cls (discriminator) in stage 2
        vq_weight=1.0,  # L_vq (emotion bank) in stage 2
        gate_weight=0.1,  # L_gate: every Emotion MoE gate network predicts the clip's palette (emotion stages)
        # Stage 1 trains the backbone alone (MoEE's frozen two-stage schedule). True trains the emotion
        # parts with it: a joint warm-up for small demos, not the paper's schedule.
        joint_emotion=False,
        finalize_batches=8,  # batches the vae stage measures the latent statistics on
        # VAE stage
        vae_frames=2, kl_weight=1e-6,
        # Embedder stage
        info_nce_temperature=0.1,
    ))  # fmt: skip
    f, m = c.video.num_frames, c.video.motion_frames
    factor = latent_factor(c)
    c.data = ConfigDict(dict(
        data_dir="data/tfds",
        name="synthetic_talking_faces/tiny" if tiny else "talking_face_clips",
        split="train",
        num_frames=f, motion_frames=m, image_size=c.video.image_size[0],
        reference_min_distance=8 if stage == "stage1" else 0,
        audio_context_frames=2, mel_bins=32, mask_downsample=factor,
        noisy_p=0.25 if stage == "stage2" else 0.0,
        class_balanced=True,
        # The reference from another clip of the same identity (mostly its neutral clip) and motion
        # frames that repeat the reference, as at inference: the emotion must come from the condition.
        reference_neutral_p=0.5 if stage == "stage2" else 0.25,
        reference_other_p=0.3 if stage == "stage2" else 0.25,
        motion_as_reference_p=0.3,
        drop_reference_p=0.05, drop_audio_p=0.05, drop_emotion_p=0.1 if stage == "stage2" else 0.0, drop_all_p=0.05,
        emotion_speech_p=0.2,  # emotion from the speech alone (the label dropped), as --emotion-from-audio
        emotion_text_p=0.0,
        worker_count=0, worker_buffer_size=2,
    ))  # fmt: skip
    c.checkpoint = ConfigDict(dict(every_steps=20 if tiny else 1000, keep=3, async_save=True, export_ema=False))
    # Audio windows are log-mel frames (pipeline ``mel``): the speech features of Emotion-to-Latents too.
    c.model.emotion.speech_dim = c.data.mel_bins
    c.model.emotion.sources = ("label", "speech")
    return c
