"""The four training stages: which parameters each holds and trains, and its loss.

One parameter tree covers the whole system; each stage holds the parts it needs (top-level keys)
and trains the subset its patterns name (:mod:`moee_jax.train.partition`):

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

Diffusion losses (stages 1–2), MoEE §3.5:

* ``L_latent`` — the denoising error (ε or v target, per the schedule) per latent cell, weighted by
  the pipeline's ``loss_mask`` (0 on the mouth of masked noisy samples) and normalised by the
  mask's sum per sample, times the min-SNR-γ weight when ``train.min_snr_gamma > 0``.
* ``L_spatial = w(t)·(‖Î − I‖₁ + LPIPS(Î, I))`` on ``train.spatial_frames`` decoded frames of the
  x̂₀ prediction, ``w(t) = cos(t·π / 2T)``; the loss mask hides the same pixels from both images.
  LPIPS needs VGG16 + LPIPS weights (``train.perceptual.vgg`` / ``.lin``); without them the
  perceptual term is off (the trainer warns) and only L1 remains.
* ``L_cls`` (DICE-Talk eq. 16) on the discriminator's logits, ``L_vq`` (eq. 17) from the bank.
* ``L_gate`` (:func:`moee_jax.train.losses.gate_loss`, weight ``train.gate_weight``) wherever the
  Emotion MoE trains: every layer's gate network against the clip's palette.

Diagnostics (:attr:`Stage.diagnostics`, logged by the trainer every ``log_every`` steps): for the
diffusion stages with an emotion condition, the denoising loss on the same noise and timesteps with
the true emotion labels, with the labels shuffled across the batch, and with the emotion dropped.
``shuffle_gap = L(shuffled) − L(true)`` must grow above 0: a model whose loss does not move when its
condition changes does not use it.

The batch is the grain pipeline's (:mod:`moee_jax.data.pipeline`) as device arrays; pixels are
uint8 and converted here, inside the jitted step.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Iterable

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from moee_jax.diffusion import schedules
from moee_jax.models.build import build_backbone
from moee_jax.models.emotion_embedder import GaussianEmotionEmbedder
from moee_jax.models.moee import EmotionConfig, build_moee_from_config
from moee_jax.models.latent_norm import measure_latent_norm
from moee_jax.models.space_to_depth import SpaceToDepthAutoencoder
from moee_jax.models.vae import AutoencoderKL, decode_latents, encode_to_latents, sample_latent
from moee_jax.nn.layers import partitioned
from moee_jax.train import losses

STAGES = ("vae", "embedder", "stage1", "stage2")
_EMOTION_PARTS = (r"/emotion/",)  # the Emotion MoE inside every spatial transformer block of the U-Net


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


class ContextTokens(nn.Module):
    """Learned cross-attention context ``(Lc, D)`` shared by every clip.

    The U-Net's cross-attention (SD's text slot) carries no per-clip information here: identity
    comes through the reference attention, speech through the audio attention and emotion through
    the Emotion MoE; these tokens are the learned "empty prompt" of that slot.
    """

    num_tokens: int
    dim: int

    @nn.compact
    def __call__(self, batch: int) -> jax.Array:
        tokens = self.param("tokens", partitioned(nn.initializers.normal(0.02), (None, "embed")), (self.num_tokens, self.dim))
        return jnp.broadcast_to(tokens, (batch,) + tokens.shape)


# ---- batch → model inputs ---------------------------------------------------------------------------


def to_unit(pixels: jax.Array, dtype=jnp.float32) -> jax.Array:
    """uint8 ``[0, 255]`` → ``[-1, 1]``."""
    return pixels.astype(dtype) / 127.5 - 1.0


def upsample(mask: jax.Array, factor: int) -> jax.Array:
    """Nearest upsampling of the last two axes by ``factor``."""
    return jnp.repeat(jnp.repeat(mask, factor, axis=-2), factor, axis=-1)


def mel_windows(mel: jax.Array, num_frames: int, context: int) -> jax.Array:
    """``mel (B, F + 2c, n)`` → Hallo-style windows ``(B, F, 2c + 1, 1, n)`` centred on each frame."""
    windows = jnp.stack([mel[:, k : k + num_frames] for k in range(2 * context + 1)], axis=2)
    return windows[:, :, :, None, :]


def frame_mel(mel: jax.Array, num_frames: int, context: int) -> jax.Array:
    """The per-frame mel of the target frames ``(B, F, n)`` (drops the context frames)."""
    return mel[:, context : context + num_frames]


def weighted_mean(err: jax.Array, mask: jax.Array) -> jax.Array:
    """Per-sample mean of ``err (B, …)`` over the cells where ``mask`` (same shape) is on: ``(B,)``."""
    axes = tuple(range(1, err.ndim))
    return jnp.sum(err * mask, axis=axes) / jnp.maximum(jnp.sum(mask, axis=axes), 1e-6)


def spatial_weight(t: jax.Array, num_train_timesteps: int) -> jax.Array:
    """MoEE's ``w(t) = cos(t·π / 2T)``: 1 at t = 0, 0 at t = T."""
    return jnp.cos(t.astype(jnp.float32) * math.pi / (2 * num_train_timesteps))


# ---- stages -------------------------------------------------------------------------------------------


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
    backbone = build_backbone(config)
    vae = backbone.vae
    t = config.train

    def init(rng, batch):
        x = to_unit(batch["frames"][:1, 0])
        return {"vae": vae.init(rng, x)["params"]}

    raw_latents = jax.jit(lambda p, x: vae.apply({"params": p}, to_unit(x), method=type(vae).encode)[0])

    def finalize(params, batches):
        """``latent_norm`` from the raw latents of the training frames (LDM's 1/std; see latent_norm.py)."""
        frames = [np.asarray(b["frames"]).reshape((-1,) + np.shape(b["frames"])[2:]) for b in batches]
        z = np.concatenate([np.asarray(raw_latents(params["vae"], f)) for f in frames])
        vae_params = dict(params["vae"], latent_norm=measure_latent_norm(z))
        return dict(params, vae=vae_params)

    if isinstance(vae, SpaceToDepthAutoencoder):
        def no_loss(params, batch, rng, extra):  # nothing to learn: a lossless rearrangement
            return jnp.zeros((), jnp.float32), {}

        return Stage("vae", ("vae",), (), (r"^vae/",), init, no_loss, finalize=finalize)

    def loss(params, batch, rng, extra):
        x = to_unit(batch["frames"][:, : t.vae_frames], vae.dtype)
        x = x.reshape((-1,) + x.shape[2:])
        mean, logvar = vae.apply({"params": params["vae"]}, x, method=AutoencoderKL.encode)
        z = sample_latent(rng, mean, logvar)
        recon = vae.apply({"params": params["vae"]}, z, method=AutoencoderKL.decode).astype(jnp.float32)
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


def _embedder_module(config) -> GaussianEmotionEmbedder:
    e = EmotionConfig.from_dict(config.model.emotion.to_dict())
    return GaussianEmotionEmbedder(
        e.embedder_dim, e.embedder_heads, e.embedder_audio_layers, e.embedder_layers,
        visual_channels=e.embedder_visual_channels, dtype=jnp.dtype(config.dtype),
    )  # fmt: skip


def _embedder_inputs(batch, data) -> tuple[jax.Array, jax.Array, jax.Array]:
    """``(audio (B, F, n_mels), frames (B, F, H, W, 3) in [-1, 1], mouth mask (B, F, H, W))``."""
    audio = frame_mel(batch["mel"], data.num_frames, data.audio_context_frames)
    mouth = upsample(batch["mouth_mask"], data.mask_downsample)
    return audio, to_unit(batch["frames"]), mouth


def _embedder_stage(config) -> Stage:
    embedder = _embedder_module(config)
    t, data = config.train, config.data

    def init(rng, batch):
        audio, frames, mouth = _embedder_inputs(batch, data)
        return {"embedder": embedder.init({"params": rng, "sample": rng, "dropout": rng}, audio, frames, mouth, train=True)["params"]}

    def loss(params, batch, rng, extra):
        audio, frames, mouth = _embedder_inputs(batch, data)
        r_sample, r_drop = jax.random.split(rng)
        prior = embedder.apply({"params": params["embedder"]}, audio, frames, mouth, train=True,
                               rngs={"sample": r_sample, "dropout": r_drop})  # fmt: skip
        nce = losses.info_nce(prior.sample, batch["emotion_class"], t.info_nce_temperature)
        return nce, {"info_nce": nce, "sigma": jnp.mean(prior.sigma)}

    return Stage("embedder", ("embedder",), (r"^embedder/",), (), init, loss)


def _diffusion_stage(config, name: str) -> Stage:
    backbone = build_backbone(config)
    model = build_moee_from_config(config)
    e = EmotionConfig.from_dict(config.model.emotion.to_dict())
    vae, locator = backbone.vae, backbone.face_locator
    cross_dim = int(config.model.unet.cross_attention_dim)
    context = ContextTokens(int(config.model.context_tokens), cross_dim)
    schedule = schedules.make_schedule(**config.diffusion.to_dict())
    t_cfg, data = config.train, config.data
    stage2 = name == "stage2"
    # Stage 1 trains the backbone alone (MoEE); ``joint_emotion`` trains the emotion parts with it.
    with_emotion = stage2 or bool(t_cfg.get("joint_emotion", False))
    uses_embedder = e.sources == ("embedder",)
    factor = vae.downsample_factor
    if data.mask_downsample != factor:
        raise ValueError(f"config.data.mask_downsample={data.mask_downsample} must equal the autoencoder's downsampling {factor}")

    parts = ["vae", "face_locator", "context", "reference_net", "unet", "conditioning"]
    if stage2 and e.discriminator:
        parts.append("discriminator")

    def model_inputs(params, batch, drop: bool = True):
        """Latents and the MoEE batch dict from a pipeline batch (VAE frozen: no gradient).

        ``drop=False`` keeps every condition (reference, audio) and conditions the emotion on the
        label alone, as ``moee animate --emotion`` does.
        """
        vae_p = jax.lax.stop_gradient(params["vae"])
        frames = to_unit(batch["frames"])
        lat = jax.lax.stop_gradient(encode_to_latents(vae, vae_p, frames))
        ref = jax.lax.stop_gradient(encode_to_latents(vae, vae_p, to_unit(batch["reference"])))
        b, f = frames.shape[:2]
        m = {
            "ref_latents": ref,
            "context": context.apply({"params": params["context"]}, b),
            "face_locator": locator.apply({"params": params["face_locator"]}, upsample(batch["face_mask"], factor)[..., None]),
        }
        if data.motion_frames:
            m["motion_frames"] = jax.lax.stop_gradient(encode_to_latents(vae, vae_p, to_unit(batch["motion_frames"])))
        windows = mel_windows(batch["mel"], f, data.audio_context_frames)
        keep_audio = ~batch["drop_audio"] if drop else jnp.ones((b,), bool)
        m["audio_windows"] = windows * keep_audio[:, None, None, None, None].astype(windows.dtype)
        m["reference_keep"] = ~batch["drop_reference"] if drop else jnp.ones((b,), bool)
        per_frame_mel = frame_mel(batch["mel"], f, data.audio_context_frames)
        m["palette"] = batch["palette"]
        if uses_embedder:
            m["embedder_audio"] = per_frame_mel
            m["expression_frames"] = frames
            m["mouth_mask"] = upsample(batch["mouth_mask"], factor)
            m["palette_keep"] = jnp.zeros((b,), bool)  # the emotion comes from the clip: the learned gate acts
        else:
            m["emotion_label"] = batch["palette"]
            m["speech_features"] = per_frame_mel
            if "text_features" in batch:
                m["text_features"], m["text_mask"] = batch["text_features"], batch["text_mask"]
            label_only = jnp.broadcast_to(jnp.array([True, True, False]), (b, 3))
            emotion_drop = batch["emotion_drop"] if drop else label_only
            m["emotion_drop"] = emotion_drop
            m["palette_keep"] = ~emotion_drop[:, 2]  # a kept label sets the MoE's global gate
        return lat, frames, m

    def init(rng, batch):
        r_model, r_loc, r_ctx, r_vae = jax.random.split(rng, 4)
        b = batch["frames"].shape[0]
        vae_params = vae.init(r_vae, to_unit(batch["frames"][:1, 0]))["params"]
        params = {
            "vae": vae_params,
            "face_locator": locator.init(r_loc, upsample(batch["face_mask"], factor)[..., None])["params"],
            "context": context.init(r_ctx, b)["params"],
        }
        unboxed = nn.unbox(params)
        lat, _, m = model_inputs(unboxed, batch)
        t = jnp.zeros((b,), jnp.int32)
        params.update(model.init(r_model, m, lat, t))
        return {k: v for k, v in params.items() if k in parts}

    lpips_frames = int(t_cfg.spatial_frames)

    def denoise(params, batch, rng, drop: bool = True):
        """One noised forward pass: ``(latents, frames, t, noisy, target, model output)``."""
        r_t, r_noise, r_model = jax.random.split(rng, 3)
        lat, frames, m = model_inputs(params, batch, drop)
        t = schedules.sample_timesteps(r_t, lat.shape[0], schedule.num_train_timesteps)
        noise = schedules.offset_noise(r_noise, lat.shape, float(t_cfg.noise_offset), lat.dtype)
        noisy = schedules.q_sample(schedule, lat, noise, t)
        target = schedules.training_target(schedule, lat, noise, t)
        out = model(params, m, noisy, t, train=True, rng=r_model, use_emotion=with_emotion)
        return lat, frames, t, noisy, target, out

    def latent_loss(pred, target, t, mask):
        """``L_latent`` per sample ``(B,)``: masked mean squared error (× min-SNR weight)."""
        per_sample = weighted_mean(jnp.mean(jnp.square(pred.astype(jnp.float32) - target), axis=-1), mask)
        if t_cfg.min_snr_gamma > 0:
            per_sample = per_sample * schedules.min_snr_weight(schedule, t, t_cfg.min_snr_gamma)
        return per_sample

    def loss(params, batch, rng, extra):
        lat, frames, t, noisy, target, out = denoise(params, batch, rng)
        b = lat.shape[0]
        pred = out.prediction.astype(jnp.float32)
        mask = batch["loss_mask"]  # (B, F, h, w)
        latent = jnp.mean(latent_loss(pred, target, t, mask))
        metrics = {"latent": latent}
        total = latent

        if t_cfg.spatial_weight > 0 and lpips_frames > 0:
            k = min(lpips_frames, lat.shape[1])
            x0, _ = schedules.predict_x0_and_eps(schedule, pred[:, :k], noisy[:, :k], t)
            images = decode_latents(vae, jax.lax.stop_gradient(params["vae"]), x0).astype(jnp.float32)
            gt = frames[:, :k]
            pix_mask = upsample(mask[:, :k], factor)[..., None]  # (B, k, H, W, 1)
            w = spatial_weight(t, schedule.num_train_timesteps)
            l1 = weighted_mean(jnp.abs(images - gt), jnp.broadcast_to(pix_mask, images.shape))
            spatial = l1
            if extra.get("lpips") is not None:
                flat = (-1,) + images.shape[2:]
                d = extra["lpips"]((images * pix_mask).reshape(flat), (gt * pix_mask).reshape(flat)).reshape(b, k)
                metrics["perceptual"] = jnp.mean(d)
                spatial = spatial + t_cfg.perceptual.weight * jnp.mean(d, axis=1)
            spatial = jnp.mean(w * spatial)
            metrics["spatial"] = spatial
            total = total + t_cfg.spatial_weight * spatial

        if with_emotion and out.gate_logits and float(t_cfg.get("gate_weight", 0.0)) > 0:
            gate = losses.gate_loss(out.gate_logits, batch["palette"])
            metrics["gate"] = gate
            total = total + t_cfg.gate_weight * gate
        if stage2 and out.emotion_logits is not None:
            labels = batch["emotion_class"]
            valid = labels >= 0
            log_p = jax.nn.log_softmax(out.emotion_logits.astype(jnp.float32), axis=-1)
            nll = -jnp.take_along_axis(log_p, jnp.maximum(labels, 0)[:, None], axis=-1)[:, 0]
            cls = jnp.sum(jnp.where(valid, nll, 0.0)) / jnp.maximum(valid.sum(), 1)
            metrics["cls"] = cls
            total = total + t_cfg.cls_weight * cls
        if stage2 and out.vq_loss is not None:
            metrics["vq"] = out.vq_loss
            total = total + t_cfg.vq_weight * out.vq_loss
        return total, metrics

    def diagnostics(params, batch, rng):
        """Whether the emotion condition is used: the latent loss on the same noise and timesteps
        (reference and audio kept) with the true label, the labels rolled by one across the batch,
        and the emotion dropped."""
        b = batch["palette"].shape[0]
        keep = jnp.zeros((b,), bool)
        label_only = jnp.broadcast_to(jnp.array([True, True, False]), (b, 3))
        true = dict(batch, drop_reference=keep, drop_audio=keep, emotion_drop=label_only)
        variants = {
            "true": true,
            "shuffled": dict(true, palette=jnp.roll(batch["palette"], 1, axis=0)),
            "dropped": dict(true, emotion_drop=jnp.ones((b, 3), bool)),
        }
        values = {}
        for tag, variant in variants.items():
            _, _, t, _, target, out = denoise(params, variant, rng)
            values[tag] = jnp.mean(latent_loss(out.prediction, target, t, batch["loss_mask"]))
        return {
            "loss_true_emotion": values["true"],
            "shuffle_gap": values["shuffled"] - values["true"],
            "drop_gap": values["dropped"] - values["true"],
        }

    if stage2:
        trainable = [_EMOTION_PARTS[0], r"^conditioning/latents/", r"^conditioning/embedder/", r"^conditioning/bank/", r"^discriminator/"]
        frozen: tuple[str, ...] = ()
    elif with_emotion:
        trainable = [r"^(reference_net|unet|face_locator|context|conditioning)/"]
        frozen = ()
    else:
        trainable = [r"^(reference_net|unet|face_locator|context|conditioning/audio_projection)/"]
        frozen = _EMOTION_PARTS
    has_condition = with_emotion and not uses_embedder
    return Stage(name, tuple(parts), tuple(trainable), tuple(frozen), init, loss, diagnostics if has_condition else None)
