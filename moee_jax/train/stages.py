"""The four training stages: which parameters each holds and trains, and its loss as a weighted sum.

One parameter tree covers the whole system (:mod:`moee_jax.models.system`); each stage holds the
parts it needs (top-level keys) and trains the subset its patterns name (:mod:`moee_jax.train.partition`):

=========  ===============================================  ==========================================
stage      parts held                                       trained
=========  ===============================================  ==========================================
vae        vae                                              all but ``latent_norm`` (L1 + KL + perceptual
                                                            reconstruction); then ``latent_norm`` is
                                                            measured on data (space-to-depth: only that)
embedder   embedder                                         all (DICE-Talk InfoNCE, eq. 8)
stage1     vae, face_locator, context, reference_net,       ReferenceNet, U-Net (without its emotion
           unet, conditioning                               experts), face locator, context, audio
                                                            projection; the VAE is frozen. With
                                                            ``train.joint_emotion`` (a warm-up for small
                                                            demos) the emotion parts train too
stage2     stage1's parts (+ discriminator, + embedder      the Emotion MoE in every block,
           when the emotion source is the embedder)         Emotion-to-Latents / embedder + bank,
                                                            discriminator; everything else frozen
=========  ===============================================  ==========================================

The diffusion stages' loss is ``L_latent + λ_s L_spatial + λ_cls L_cls + λ_vq L_vq + λ_g L_gate``
(:mod:`moee_jax.train.losses`, one function per equation), each term where its part trains.

Diagnostics (:attr:`Stage.diagnostics`, logged by the trainer every ``log_every`` steps): for the
diffusion stages with an emotion condition, the denoising loss on the same noise and timesteps with
the true emotion labels, with the labels shuffled across the batch, and with the emotion dropped.
``shuffle_gap = L(shuffled) − L(true)`` must grow above 0: a model whose loss does not move when its
condition changes does not use it.

The batch is the grain pipeline's (:mod:`moee_jax.data.pipeline`) as device arrays; pixels are
uint8 and converted inside the jitted step.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable

import jax
import jax.numpy as jnp
import numpy as np

from moee_jax.checkpoint.run import STAGES
from moee_jax.diffusion import schedules
from moee_jax.models.build import build_autoencoder
from moee_jax.models.conditioning import EmotionConfig
from moee_jax.models.emotion_embedder import GaussianEmotionEmbedder
from moee_jax.models.features import embedder_inputs, to_unit, upsample
from moee_jax.models.latent_norm import measure_latent_norm
from moee_jax.models.space_to_depth import SpaceToDepthAutoencoder
from moee_jax.models.system import LABEL_ONLY, MoEESystem
from moee_jax.models.vae import sample_latent
from moee_jax.train import losses

EMOTION_PARTS = (r"/emotion/",)  # the Emotion MoE inside every spatial transformer block of the U-Net


@dataclasses.dataclass(frozen=True)
class Stage:
    """What a stage trains and how. ``loss(params, batch, rng, extra) → (loss, metrics)``."""

    name: str
    parts: tuple[str, ...]
    trainable: tuple[str, ...]
    frozen: tuple[str, ...]
    init: Callable[[jax.Array, dict], dict]  # (rng, example batch) → boxed params of ``parts``
    loss: Callable[..., tuple[jax.Array, dict]]
    # (params, batch, rng) → scalar metrics, run by the trainer at log steps (jitted on its own)
    diagnostics: Callable[..., dict] | None = None
    # (params, batches) → params: after the last step, before the export (measured statistics)
    finalize: Callable[[dict, Iterable[dict]], dict] | None = None


def make_stage(config) -> Stage:
    """The :class:`Stage` of ``config.stage``."""
    name = config.stage
    if name == "vae":
        return _vae_stage(config)
    if name == "embedder":
        return _embedder_stage(config)
    if name in ("stage1", "stage2"):
        return _diffusion_stage(config, name)
    raise ValueError(f"config.stage={name!r}; choose one of {STAGES}")


def _vae_stage(config) -> Stage:
    vae = build_autoencoder(config.model.vae.to_dict(), jnp.dtype(config.dtype))
    t = config.train

    def init(rng, batch):
        return {"vae": vae.init(rng, to_unit(batch["frames"][:1, 0]))["params"]}

    raw_latents = jax.jit(lambda p, x: vae.apply({"params": p}, to_unit(x), method=type(vae).encode)[0])

    def finalize(params, batches):
        """``latent_norm`` from the raw latents of the training frames (LDM's 1/std; see latent_norm.py)."""
        frames = [np.asarray(b["frames"]).reshape((-1,) + np.shape(b["frames"])[2:]) for b in batches]
        z = np.concatenate([np.asarray(raw_latents(params["vae"], f)) for f in frames])
        return dict(params, vae=dict(params["vae"], latent_norm=measure_latent_norm(z)))

    if isinstance(vae, SpaceToDepthAutoencoder):

        def no_loss(params, batch, rng, extra):  # nothing to learn: a lossless rearrangement
            return jnp.zeros((), jnp.float32), {}

        return Stage("vae", ("vae",), (), (r"^vae/",), init, no_loss, finalize=finalize)

    def loss(params, batch, rng, extra):
        x = to_unit(batch["frames"][:, : t.vae_frames], vae.dtype)
        x = x.reshape((-1,) + x.shape[2:])
        mean, logvar = vae.apply({"params": params["vae"]}, x, method=type(vae).encode)
        recon = vae.apply({"params": params["vae"]}, sample_latent(rng, mean, logvar), method=type(vae).decode).astype(jnp.float32)
        l1 = jnp.mean(jnp.abs(recon - x.astype(jnp.float32)))
        kl = 0.5 * jnp.mean(jnp.sum(jnp.square(mean) + jnp.exp(logvar) - 1.0 - logvar, axis=-1).astype(jnp.float32))
        metrics = {"l1": l1, "kl": kl}
        total = l1 + t.kl_weight * kl
        if extra.get("lpips") is not None:
            perceptual = jnp.mean(extra["lpips"](recon, x))
            metrics["perceptual"] = perceptual
            total = total + t.perceptual.weight * perceptual
        return total, metrics

    return Stage("vae", ("vae",), (r"^vae/",), (r"^vae/latent_norm/",), init, loss, finalize=finalize)


def _embedder_stage(config) -> Stage:
    e = EmotionConfig.from_dict(config.model.emotion.to_dict())
    embedder = GaussianEmotionEmbedder(e.embedder_dim, e.embedder_heads, e.embedder_audio_layers, e.embedder_layers,
                                       visual_channels=e.embedder_visual_channels, dtype=jnp.dtype(config.dtype))  # fmt: skip
    t, data = config.train, config.data

    def inputs(batch):
        return embedder_inputs(batch, data.num_frames, data.audio_context_frames, data.mask_downsample)

    def init(rng, batch):
        return {"embedder": embedder.init({"params": rng, "sample": rng, "dropout": rng}, *inputs(batch), train=True)["params"]}

    def loss(params, batch, rng, extra):
        r_sample, r_drop = jax.random.split(rng)
        prior = embedder.apply({"params": params["embedder"]}, *inputs(batch), train=True, rngs={"sample": r_sample, "dropout": r_drop})
        nce = losses.info_nce(prior.sample, batch["emotion_class"], t.info_nce_temperature)
        return nce, {"info_nce": nce, "sigma": jnp.mean(prior.sigma)}

    return Stage("embedder", ("embedder",), (r"^embedder/",), (), init, loss)


def _diffusion_stage(config, name: str) -> Stage:
    system = MoEESystem(config)
    schedule = schedules.make_schedule(**config.diffusion.to_dict())
    t_cfg = config.train
    stage2 = name == "stage2"
    # Stage 1 trains the backbone alone (MoEE); ``joint_emotion`` trains the emotion parts with it.
    with_emotion = stage2 or bool(t_cfg.get("joint_emotion", False))
    parts = tuple(p for p in system.parts if stage2 or p != "discriminator")
    spatial_frames = int(t_cfg.spatial_frames)

    def init(rng, batch):
        return {k: v for k, v in system.init(rng, batch).items() if k in parts}

    def denoise(params, batch, rng, drop: bool = True):
        """One noised forward pass: ``(latents, frames, t, noisy, target, conditions, output)``."""
        r_t, r_noise, r_model = jax.random.split(rng, 3)
        lat, frames, inputs = system.encode(params, batch, drop=drop)
        t = schedules.sample_timesteps(r_t, lat.shape[0], schedule.num_train_timesteps)
        noise = schedules.offset_noise(r_noise, lat.shape, float(t_cfg.noise_offset), lat.dtype)
        noisy = schedules.q_sample(schedule, lat, noise, t)
        target = schedules.training_target(schedule, lat, noise, t)
        cond = system.conditions(params, inputs, train=True, rng=r_model)
        out = system.denoise(params, cond, noisy, t, use_emotion=with_emotion)
        return lat, frames, t, noisy, target, cond, out

    def latent(out, target, t, mask):
        weight = schedules.min_snr_weight(schedule, t, t_cfg.min_snr_gamma) if t_cfg.min_snr_gamma > 0 else None
        return losses.latent_loss(out.prediction, target, mask, weight)

    def loss(params, batch, rng, extra):
        lat, frames, t, noisy, target, cond, out = denoise(params, batch, rng)
        mask = batch["loss_mask"]  # (B, F, h, w)
        terms = {"latent": jnp.mean(latent(out, target, t, mask))}
        weights = {"latent": 1.0}
        logged = {}
        if t_cfg.spatial_weight > 0 and spatial_frames > 0:
            k = min(spatial_frames, lat.shape[1])
            x0, _ = schedules.predict_x0_and_eps(schedule, out.prediction.astype(jnp.float32)[:, :k], noisy[:, :k], t)
            images = system.decode(params, x0).astype(jnp.float32)
            pix_mask = upsample(mask[:, :k], system.downsample)[..., None]
            terms["spatial"], distance = losses.spatial_loss(images, frames[:, :k], pix_mask, t, schedule.num_train_timesteps,
                                                             extra.get("lpips"), float(t_cfg.perceptual.weight))  # fmt: skip
            weights["spatial"] = float(t_cfg.spatial_weight)
            if distance is not None:
                logged["perceptual"] = distance  # already inside L_spatial
        if with_emotion and out.gate_logits and float(t_cfg.get("gate_weight", 0.0)) > 0:
            terms["gate"], weights["gate"] = losses.gate_loss(out.gate_logits, batch["palette"]), float(t_cfg.gate_weight)
        if stage2 and out.emotion_logits is not None:
            terms["cls"], weights["cls"] = (
                losses.emotion_classification_loss(out.emotion_logits, batch["emotion_class"]),
                float(t_cfg.cls_weight),
            )
        if stage2 and cond.vq_loss is not None:
            terms["vq"], weights["vq"] = cond.vq_loss, float(t_cfg.vq_weight)
        return sum(weights[k] * v for k, v in terms.items()), terms | logged

    def diagnostics(params, batch, rng):
        """Whether the emotion condition is used: the latent loss on the same noise and timesteps
        (reference and audio kept) with the true label, the labels rolled by one across the batch,
        and the emotion dropped.

        The loss here is *unweighted* (no min-SNR factor): the label decides the coarse expression at
        high noise, exactly where min-SNR-γ's v-prediction weight ``min(SNR, γ)/(SNR + 1)`` vanishes
        (0 at a zero-terminal-SNR step), so a weighted gap would read 0 even when the label is used."""
        b = batch["palette"].shape[0]
        keep = jnp.zeros((b,), bool)
        true = dict(batch, drop_reference=keep, drop_audio=keep, emotion_drop=jnp.broadcast_to(jnp.array(LABEL_ONLY), (b, 3)))
        variants = {
            "true": true,
            "shuffled": dict(true, palette=jnp.roll(batch["palette"], 1, axis=0)),
            "dropped": dict(true, emotion_drop=jnp.ones((b, 3), bool)),
        }
        values = {}
        for tag, variant in variants.items():
            _, _, t, _, target, _, out = denoise(params, variant, rng)
            values[tag] = jnp.mean(losses.latent_loss(out.prediction, target, batch["loss_mask"]))
        return {
            "loss_true_emotion": values["true"],
            "shuffle_gap": values["shuffled"] - values["true"],
            "drop_gap": values["dropped"] - values["true"],
        }

    if stage2:
        trainable = (EMOTION_PARTS[0], r"^conditioning/latents/", r"^conditioning/embedder/", r"^conditioning/bank/", r"^discriminator/")
        frozen: tuple[str, ...] = ()
    elif with_emotion:
        trainable, frozen = (r"^(reference_net|unet|face_locator|context|conditioning)/",), ()
    else:
        trainable, frozen = (r"^(reference_net|unet|face_locator|context|conditioning/audio_projection)/",), EMOTION_PARTS
    has_condition = with_emotion and not system.emotion.uses_embedder
    return Stage(name, parts, trainable, frozen, init, loss, diagnostics if has_condition else None)
