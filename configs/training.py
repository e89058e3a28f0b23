"""Training settings of the stages; the stage files (vae.py, embedder.py, stage1.py, stage2.py) call
:func:`training_config`. Not a config file itself.

``train`` holds the optimisation fields every stage shares (:data:`COMMON`) and the objective's
fields of its own stage only (:func:`objective`); ``data`` the pipeline's; ``checkpoint`` Orbax's.
"""

from ml_collections import ConfigDict

from moee_jax.configs import backbone


def latent_factor(c: ConfigDict) -> int:
    """Pixels per latent cell along a side for ``c.model.vae`` (the masks' downsampling)."""
    if c.model.vae.get("kind", "kl") == "space_to_depth":
        return int(c.model.vae.factor)
    return 2 ** (len(c.model.vae.block_out_channels) - 1)


def common(tiny: bool) -> dict:
    """Optimisation, logging and initialisation: the ``train`` fields of every stage."""
    return dict(
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
        print_every=0,  # a progress line on the terminal every this many steps (0: every log step); all go to the log
        nan_patience=10,  # stop after this many non-finite steps in a row (their updates are skipped)
        init_from=(),  # final/ dirs of earlier stages (or a converted checkpoint); default: this run's earlier stages
        init_skip=(),  # path patterns the earlier stages do not fill (they keep their fresh initialisation)
    )  # fmt: skip


def _perceptual() -> ConfigDict:
    return ConfigDict(dict(vgg="", lin="", weight=1.0, allow_pickle=False))  # LPIPS weights, optional


def objective(stage: str) -> dict:
    """The ``train`` fields of ``stage``'s own objective (moee_jax.train.stages / .losses)."""
    if stage == "vae":
        # L1 + KL + perceptual reconstruction; then the latent statistics, measured on finalize_batches batches.
        return dict(vae_frames=2, kl_weight=1e-6, perceptual=_perceptual(), finalize_batches=8)
    if stage == "embedder":
        return dict(info_nce_temperature=0.1)  # DICE-Talk eq. 8
    diffusion = dict(
        # MoEE §3.5: L_latent (+ min-SNR-γ weighting; 0 disables it, 5.0 is Hang et al.'s choice) and
        # L_spatial = w(t)(L1 + perceptual) on decoded x̂0 frames.
        min_snr_gamma=0.0, noise_offset=0.0, spatial_weight=0.1, spatial_frames=1, perceptual=_perceptual(),
        gate_weight=0.1,  # L_gate: every Emotion MoE gate network predicts the clip's palette (emotion stages)
    )  # fmt: skip
    if stage == "stage1":
        # MoEE trains the backbone alone here (the frozen two-stage schedule); True trains the emotion parts
        # with it: a joint warm-up for small demos, not the paper's schedule.
        return dict(diffusion, joint_emotion=False)
    if stage == "stage2":
        return dict(diffusion, cls_weight=0.1, vq_weight=1.0)  # L_cls (discriminator), L_vq (emotion bank)
    raise ValueError(f"unknown stage {stage!r}; choose vae, embedder, stage1 or stage2")


def training_config(stage: str, variant: str) -> ConfigDict:
    """``configs/backbone.py:<variant>`` plus ``stage``, ``train``, ``data`` and ``checkpoint``."""
    c = backbone.get_config(variant)
    tiny = c.variant == "tiny"
    c.stage = stage
    c.train = ConfigDict(dict(common(tiny), **objective(stage)))
    f, m = c.video.num_frames, c.video.motion_frames
    factor = latent_factor(c)
    c.data = ConfigDict(dict(
        data_dir="data/tfds",
        name="synthetic_talking_faces/tiny" if tiny else "talking_face_clips",
        split="train",
        num_frames=f, motion_frames=m, image_size=c.video.image_size[0],
        reference_min_distance=8 if stage == "stage1" else 0,
        audio_context_frames=2, mel_bins=32, mask_downsample=factor,
        face_mask="framing",  # the face locator sees what inference gives it (moee_jax.data.pipeline)
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
        face_loss_weight=1.0, lip_loss_weight=1.0,  # region-weighted denoising loss (1: uniform)
        worker_count=0, worker_buffer_size=2,
        # Pretrained-encoder features (moee_jax.data.feature_cache): "" trains on log-mel alone; a folder
        # built by `moee features` adds wav2vec2 audio windows (they replace the log-mel windows), the
        # wav2vec2 speech emotion source and T5 text features (of the cache's length, which the
        # animator then encodes --emotion_text to).
        features="",
    ))  # fmt: skip
    c.checkpoint = ConfigDict(dict(every_steps=20 if tiny else 1000, keep=3, async_save=True, export_ema=False))
    # What training uses by default, every variant: log-mel audio (pipeline ``mel``), for the U-Net's audio
    # windows and as the speech emotion source; label + speech emotion (no text without T5 features).
    # With a feature cache (data.features) the widths become the encoders' — wav2vec2-base and t5-base:
    # --config.data.features=FOLDER --config.model.emotion.speech_dim=768 --config.model.emotion.text_dim=768
    # --config.model.emotion.sources='("label","text","speech")' (the trainer checks them against the cache).
    c.model.emotion.speech_dim = c.data.mel_bins
    c.model.emotion.sources = ("label", "speech")
    return c


# The numbers of a training config that must be finite and in range: field → checks.number bounds.
_BOUNDS = {
    "train.steps": dict(minimum=0, integer=True), "train.batch_size": dict(minimum=1, integer=True),
    "train.learning_rate": dict(above=0), "train.warmup_steps": dict(minimum=0, integer=True),
    "train.final_lr_fraction": dict(minimum=0, maximum=1), "train.b1": dict(minimum=0, maximum=1),
    "train.b2": dict(minimum=0, maximum=1), "train.eps": dict(above=0), "train.weight_decay": dict(minimum=0),
    "train.grad_clip": dict(minimum=0), "train.grad_accum": dict(minimum=1, integer=True),
    "train.ema_decay": dict(minimum=0, maximum=1), "train.log_every": dict(minimum=1, integer=True),
    "train.print_every": dict(minimum=0, integer=True),
    "train.nan_patience": dict(minimum=1, integer=True), "checkpoint.every_steps": dict(minimum=1, integer=True),
    "data.drop_emotion_p": dict(minimum=0, maximum=1), "data.drop_audio_p": dict(minimum=0, maximum=1),
    "data.drop_reference_p": dict(minimum=0, maximum=1), "data.drop_all_p": dict(minimum=0, maximum=1),
    "data.noisy_p": dict(minimum=0, maximum=1),
}  # fmt: skip


def check(c: ConfigDict) -> None:
    """Raise :class:`moee_jax.checks.UsageError` naming ``--config.<field>`` for a training config
    that cannot train: an unknown stage, a non-finite or out-of-range number (:data:`_BOUNDS`)."""
    from moee_jax import checks

    checks.one_of(c.get("stage"), "--config.stage", ("vae", "embedder", "stage1", "stage2"))
    for path, bounds in _BOUNDS.items():
        node = c
        for key in path.split("."):
            node = node.get(key) if hasattr(node, "get") else None
        checks.number(node, f"--config.{path}", **bounds)
