"""The built-in demo (``moee demo``): synthetic data → vae → stage1 → stage2 → animate → score.

Variants:
  cpu  the README's main job on 2 CPU cores: 32² frames, the tiny model on lossless space-to-depth
       latents. ``moee demo`` animates and scores the held-out identities with the checkpoint shipped
       in ``checkpoints/demo_cpu`` (about 13 minutes on 2 cores); ``moee demo --from-scratch``
       trains that checkpoint again from nothing (7,000 + 2,000 steps, about 3¼ hours on 2 idle
       cores; see the README for the numbers it gives).
  gpu  the same recipe, larger: 64² frames, more identities and steps (for a machine with an
       accelerator; always trains from scratch).

Every stage's config is the stage file's (configs/<stage>.py, tiny backbone) with the overrides
below. Stage 1 is a *joint warm-up* here — the emotion parts train with the backbone — and stage 2
then trains only the emotion parts on the frozen backbone, as MoEE's stage 2 does. The paper's
strictly frozen two-stage schedule (stage 1 without the emotion parts) stays the default of
configs/stage1.py; on 2 CPU cores the emotion experts learn far faster next to a backbone that is
learning with them.
"""

from ml_collections import ConfigDict

from moee_jax.configs import training

VARIANTS = ("cpu", "gpu")


def get_config(arg: str = "cpu") -> ConfigDict:
    variant = arg or "cpu"
    if variant not in VARIANTS:
        raise ValueError(f"unknown demo variant {variant!r}; choose one of {VARIANTS}")
    gpu = variant == "gpu"
    c = ConfigDict()
    c.variant = variant
    c.seed = 0
    # Synthetic data (moee_jax.data.builders.synthetic_talking_faces.SyntheticConfig fields). Drawn at
    # 64² and area-shrunk to the model's size; the compound palettes appear only in the held-out split.
    c.data = ConfigDict(dict(
        name=f"demo_{variant}", size=64 if not gpu else 128, num_frames=50, train_identities=160 if not gpu else 480,
        test_identities=8, clips_per_emotion=1 if not gpu else 2, intensities=(0.6, 1.0), neutral_voice_p=0.5, other_voice_p=0.0,
        compounds=("happy:0.5,surprised:0.5", "sad:0.5,fearful:0.5", "happily_surprised", "sadly_fearful"), seed=0,
    ))  # fmt: skip
    image = 32 if not gpu else 64
    steps = {"vae": 0, "stage1": 7000, "stage2": 2000} if not gpu else {"vae": 0, "stage1": 60000, "stage2": 10000}
    c.stages = ConfigDict()
    for stage, n in steps.items():
        s = training.training_config(stage, "tiny")
        s.video.image_size = (image, image)
        # Lossless latents: 2×2 pixel patches → 12 channels (nothing to train, the statistics are measured).
        s.model.vae = ConfigDict(dict(kind="space_to_depth", factor=2, latent_channels=12))
        s.model.unet.in_channels = s.model.unet.out_channels = 12
        # The reference latent joined to every frame's input as well as attended by ReferenceNet:
        # pixel-aligned identity, which a model this small does not learn quickly from attention alone.
        s.model.unet.reference_concat = True
        s.model.face_locator.channels = (8, 16)
        s.model.unet.block_out_channels = (32, 64) if not gpu else (64, 128, 256)
        # Attention below the top level only: on 2 CPU cores the 16² attention cost half the step.
        s.model.unet.down_attention = (False, True) if not gpu else (False, True, True)
        s.model.unet.layers_per_block = 1 if not gpu else 2
        s.model.unet.num_attention_heads = s.model.unet.motion_num_attention_heads = 2
        s.model.unet.attention_implementation = "xla"
        # DICE-Talk's emotion discriminator stays off (model.emotion.discriminator, the tiny default):
        # its head reads the label from the Emotion MoE's features rather than the drawn expression;
        # stage 2 with it read 40 (cls_weight 0.1) and 33 (1.0) of the validation split's 56 labelled
        # clips right, against 42 without (benchmarks/RESULTS.md, "DICE-Talk's emotion discriminator").
        s.data.name = f"synthetic_talking_faces/demo_{variant}"
        s.data.image_size = image
        s.data.mask_downsample = 2
        # Stage 2 trains the emotion parts alone: its reference is another clip of the identity
        # (neutral 0.8, another emotion 0.2, never the target's own clip) and its motion frames are
        # mostly the repeated reference, so the label is what must carry the expression. Against
        # 0.6 / 0.2 / 0.5 and 400 steps: held-out accuracy 0.571 → 0.643, the shuffled-label loss
        # gap 0.001–0.003 → 0.0003–0.013 (benchmarks/RESULTS.md, "A longer stage 2").
        s2 = stage == "stage2"
        s.data.update(dict(
            reference_neutral_p=0.8 if s2 else 0.6, reference_other_p=0.2, motion_as_reference_p=0.8 if s2 else 0.5,
            emotion_speech_p=0.15, drop_emotion_p=0.1, drop_all_p=0.05, drop_reference_p=0.05, drop_audio_p=0.05,
            class_balanced=True, noisy_p=0.25 if s2 else 0.0,
            # The face (5×) and lips (5×) weigh more in the loss than the background: on the one-identity
            # overfit this doubled the shuffled-label loss gap and raised the label's accuracy
            # (benchmarks/RESULTS.md, "Region-weighted loss").
            face_loss_weight=5.0, lip_loss_weight=5.0,
            # The face locator's mask. cpu: each target frame's face-oval hull, what the shipped
            # checkpoint was trained with (the animator gives the framing ellipse; benchmarks/RESULTS.md,
            # "Where the failing classes come from"). gpu trains from scratch: the ellipse, as at inference.
            face_mask="landmarks" if not gpu else "framing",
        ))  # fmt: skip
        s.train.steps = n
        s.train.batch_size = 8 if not gpu else 32
        s.train.log_every = 50
        s.train.learning_rate = 6e-4 if stage == "stage1" else 3e-4
        s.train.warmup_steps = 200 if stage == "stage1" else 50
        s.train.schedule = "cosine"
        s.train.ema_decay = 0.999
        # The tiny U-Net predicts the clean latents (x₀, "sample") instead of v. After 400 steps on one
        # identity, v-prediction's samples carried the input noise through the chain (10 DDIM steps:
        # 8.0 grey levels from the ground truth, neighbouring-pixel difference 11.7 against the
        # frames' 4.3); x₀-prediction's were clean (3.1 grey levels, 5.4) — benchmarks/RESULTS.md,
        # "Clean samples". The real configs keep v-prediction.
        if not gpu:
            s.diffusion.prediction_type = "sample"
        # Uniform loss, no min-SNR-γ: its v weight min(SNR, γ)/(SNR + 1) vanishes at high
        # noise (0 at the zero-terminal-SNR step), exactly where the label decides the expression; with
        # γ = 5 the label-only overfit of one identity read 2 of 7 labels, without it 5 of 7
        # (benchmarks/RESULTS.md, "min-SNR and the label").
        if stage == "stage1":
            s.train.joint_emotion = True
        s.checkpoint.every_steps = 500
        s.checkpoint.export_ema = True
        s.mesh.shape = (-1, 1, 1)
        c.stages[stage] = s
    # Animation and scoring of held-out identities. Audio guidance 4: on the validation identities'
    # 56 labelled clips (shipped checkpoint, emotion guidance 3) audio guidance 1 / 2 / 3 / 4 gave
    # lip sync r 0.59 / 0.78 / 0.84 / 0.87 and emotion accuracy 0.66 / 0.77 / 0.75 / 0.75 (neutral
    # 1/8 → 7/8 at 4), for 3 sampled rows instead of 2. Reference guidance 1.5 on top lowered accuracy
    # (0.71) for a fourth row (benchmarks/RESULTS.md, "Audio guidance").
    # Sampler: DPM-Solver++(2M), 5 steps. On 4 held-out identities' 36 labelled and compound clips
    # (same noise), against 40 DDIM steps: 3 of 28 labelled clips read another class (net +1 right),
    # the same compounds, lip sync r −0.013, at 0.25 s per frame against 1.81. 10 DDIM steps, the
    # earlier default: 2 of 28 read otherwise (net 0), lip r −0.004, 0.47 s per frame
    # (benchmarks/RESULTS.md, "The step-count study"; benchmarks/sampler_steps.py). The gpu
    # variant's 25 DDIM steps are not measured against it.
    c.animate = ConfigDict(dict(steps=5 if not gpu else 25, sampler="dpmpp_2m" if not gpu else "ddim",
                                guidance=dict(reference=1.0, audio=4.0, emotion=3.0),
                                compounds={"happily_surprised": "happy:0.5,surprised:0.5", "sadly_fearful": "sad:0.5,fearful:0.5"},
                                speech_only_emotions=("anger", "sadness"), batch_size=16))  # fmt: skip
    # A run of this recipe animates as it is scored: its stages' sampler and guidance (what `moee
    # animate` and the UI default to, stored in RUN/stage2/config.json) are the animate block's, not
    # the tiny backbone's 8 DDIM steps at guidance 2 / 3.5 / 3.5.
    for stage in c.stages:
        c.stages[stage].sampler = ConfigDict(dict(name=c.animate.sampler, num_steps=c.animate.steps, spacing="trailing", eta=0.0))
        c.stages[stage].guidance = ConfigDict(dict(c.animate.guidance))
    # The expression reader, trained on faces drawn at the data's size and shrunk to the model's. 12,000
    # steps: on 50/50 compound palettes of 24 fresh identities it finds both components in 0.83 of
    # the ground-truth clips (3,000 steps: 0.58), with no false alarm on clips of one component alone.
    c.reader = ConfigDict(dict(steps=12000, blend_fraction=0.4, render_size=c.data.size))
    # The shipped checkpoint `moee demo` scores (relative to the repository root); none for gpu.
    c.checkpoint = "checkpoints/demo_cpu" if not gpu else ""
    # Where that checkpoint is absent, `moee demo` trains these steps instead (about 30 minutes on 2
    # cores when scoring took 14 of them; with audio guidance 4 and 10 DDIM steps scoring took about 26,
    # with 5 DPM-Solver++ steps about two thirds of that: far too few steps for the method to work, see
    # the README's learning curve).
    c.short_steps = {"stage1": 500, "stage2": 100, "reader": 1500} if not gpu else {}
    # MoEE's ablations (moee_jax.eval.ablation): stage 2 again from the same stage 1, same steps, each
    # variant scored like the full model. On 2 CPU cores they take hours, so the cpu demo leaves them
    # to `moee ablate outputs/demo/run`.
    c.ablate = ConfigDict(dict(variants=("full", "no_moe", "no_global", "no_masked_noisy") if gpu else ()))
    return c
