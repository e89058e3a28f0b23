"""Mixture of Emotion Experts (MoEE, Liu et al. 2025, CVPR, arXiv 2501.01808, §Design 1).

Six experts, one per basic emotion (:data:`moee_jax.emotions.EMOTIONS`), each a cross-attention
whose keys/values are the emotion tokens, combined by soft gating:

    local gate   s = sigmoid(G_local(X; φ))            s ∈ R^{n×6}   (per token)
    global gate  g = softmax(G_global(Pool(X); ω))     g ∈ R^6       (per frame)
    output       X' = X + Σ_i g_i · E_i(X · s_i)

The experts are ONE :class:`~moee_jax.nn.attention.Attention` vmapped over a stacked parameter
axis (vmoe style): every expert parameter has a leading axis of size 6 with the logical name
``"expert"``, and all experts run as one batched computation.

**Experts are bound to their emotions, as the paper trains them.** MoEE: "each expert is a
cross-attention module trained on single-emotion data"; "single emotion: activates only the
corresponding expert | compound emotion: soft combination of multiple experts". A free softmax gate
trained without that constraint ties expert *i* to nothing in particular, and a palette that later
replaces it selects arbitrary experts. So:

* **In training the global gate of every MoE layer is the sample's palette** — one-hot for a basic
  emotion, all zeros for neutral (no emotion, no expert) — for every sample whose emotion is given
  by its label (``EmotionCondition.palette_keep``). Where the emotion comes from speech or text, or
  is dropped for classifier-free guidance, the learned gate acts.
* **The learned gate is taught to predict the palette** (an auxiliary loss,
  :func:`moee_jax.train.losses.gate_loss`), so that it can act where no palette is given
  (speech-only, text). A softmax over six experts cannot say "no emotion", which a neutral sample
  needs, so the gate network has a seventh logit for "none" and ``g`` is the first six entries of
  that 7-way softmax: ``g = softmax(G(Pool(X̂); ω))[:6]``; its training target is
  ``(palette, 1 − Σ palette)``. The logits are sown (``global_gate_logits (N, 7)``) for the loss.
* **At inference a palette sets the gate** (``happy:0.6,surprised:0.4`` weighs the happiness and
  surprise experts 0.6 / 0.4): compounds are soft combinations of experts that each learned one
  emotion.

Further choices (the paper leaves them open):

* **Pool is the mean over the tokens of one frame.** The spatial blocks see frames folded into the
  batch, ``X (N, L, C)`` with ``N = B·F``, so each frame gets its own ``g``, as in MoEE where the
  gated features are the spatial features of a frame. This keeps the module independent of how
  frames are grouped into clips (motion frames prepended to a clip are frames like any other) and
  lets a single image use it.
* Per-clip tokens and palettes reach the frame-folded rows through
  :func:`~moee_jax.nn.attention.repeat_to_batch` (tokens after their K/V projection, once per clip).
* **X is layer-normalised before gating and experts** (``X̂ = LN(X)``; the residual adds to the
  raw ``X``): every other residual branch of the SD transformer block reads normalised states.
* **Each expert's output projection is zero-initialised**, so a fresh MoE is the identity and stage
  2 (MoEE: only the MoE and Emotion-to-Latents train) starts exactly from the stage-1 U-Net.

Ablations (MoEE Table 5) via ``variant``:

* ``"moe"``       — the full module above.
* ``"single"``    — no MoE ("w/o MoEE"): one cross-attention, ``X' = X + E(X̂)``, no gates; a
  palette is ignored (the emotion reaches it through the tokens only).
* ``"no_global"`` — "w/o global soft assignment": ``g_i = 1/6`` always (no gate network, the
  palette ignored), so no expert is bound to an emotion.
* ``"no_local"``  — no local assignment: ``s ≡ 1``, no local gate params.

Gates are sown into the ``intermediates`` collection for analysis: ``local_gates (N, L, 6)`` and
``global_gates (N, 6)`` (the ``g`` actually used: uniform for ``no_global``, the palette where one
is kept, ones for ``no_local``'s ``s``), and ``global_gate_logits (N, 7)`` where a gate network
exists; the ``single`` variant sows nothing.
"""

from __future__ import annotations

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp

from moee_jax.emotions import NUM_EMOTIONS
from moee_jax.nn.attention import Attention, repeat_to_batch
from moee_jax.nn.layers import dense
from moee_jax.nn.norms import layer_norm

VARIANTS = ("moe", "single", "no_global", "no_local")


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class EmotionCondition:
    """What the emotion slot is conditioned on, per clip.

    tokens  (B, Le, De)  emotion tokens (keys/values of every expert), e.g. from
                         :class:`~moee_jax.models.emotion_latents.EmotionToLatents`
    palette (B, 6) | None  weights over :data:`~moee_jax.emotions.EMOTIONS` that replace the
                         global gate ``g`` (one-hot for a label, a compound at inference, MoEE's
                         "palette"); build rows with :func:`moee_jax.emotions.parse_palette`
    palette_keep (B,) bool | None  which clips the palette applies to (None: all); the learned
                         gate acts on the others (emotion from speech or text, or dropped)
    """

    tokens: jax.Array
    palette: jax.Array | None = None
    palette_keep: jax.Array | None = None


class EmotionMoE(nn.Module):
    """The emotion slot of a spatial transformer block: ``x (N, L, C)``, ``emotion`` → ``(N, L, C)``.

    ``x`` holds frame-folded tokens (row ``b·F + f``); ``emotion`` an :class:`EmotionCondition`, per
    clip (``B`` divides ``N``) or per row (``B = N``).
    ``head_dim`` defaults to ``C // heads``, so one factory serves every U-Net level::

        UNetConfig(emotion_slot=functools.partial(EmotionMoE, heads=8, variant="moe"), emotion_dim=768)
    """

    heads: int = 8
    head_dim: int | None = None
    variant: str = "moe"
    num_experts: int = NUM_EMOTIONS
    implementation: str = "xla"
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, cond: EmotionCondition) -> jax.Array:
        if self.variant not in VARIANTS:
            raise ValueError(f"EmotionMoE variant {self.variant!r}: expected one of {VARIANTS}")
        n, _, c = x.shape
        head_dim = self.head_dim or c // self.heads
        h = layer_norm(name="norm", dtype=self.dtype)(x)

        if self.variant == "single":
            e = Attention(self.heads, head_dim, zero_init_out=True, implementation=self.implementation, dtype=self.dtype, name="attn")(
                h, cond.tokens
            )
            return nn.with_logical_constraint(x + e, ("batch", "length", "act_embed"))

        s = self._local_gates(h)  # (N, L, E)
        g = self._global_gates(h, cond, n)  # (N, E)
        self.sow("intermediates", "local_gates", s)
        self.sow("intermediates", "global_gates", g)

        experts = nn.vmap(
            Attention,
            in_axes=(0, None),
            out_axes=0,
            variable_axes={"params": 0},
            split_rngs={"params": True},
            axis_size=self.num_experts,
            metadata_params={nn.PARTITION_NAME: "expert"},
        )(self.heads, head_dim, zero_init_out=True, implementation=self.implementation, dtype=self.dtype, name="experts")
        gated_inputs = jnp.moveaxis(s, -1, 0)[..., None] * h[None]  # X̂ · s_i: (E, N, L, C)
        e = experts(gated_inputs, cond.tokens)  # E_i(X̂ · s_i): (E, N, L, C)
        out = x + jnp.einsum("enlc,ne->nlc", e, g)  # X + Σ_i g_i · E_i(X̂ · s_i)
        return nn.with_logical_constraint(out, ("batch", "length", "act_embed"))

    def _local_gates(self, h: jax.Array) -> jax.Array:
        """``s = sigmoid(G_local(X̂))`` (N, L, E); ones for ``no_local``."""
        if self.variant == "no_local":
            return jnp.ones(h.shape[:2] + (self.num_experts,), h.dtype)
        logits = dense(self.num_experts, ("embed", "expert"), name="local_gate", dtype=self.dtype)(h)
        return jax.nn.sigmoid(logits.astype(jnp.float32)).astype(h.dtype)

    def _global_gates(self, h: jax.Array, cond: EmotionCondition, n: int) -> jax.Array:
        """``g (N, E)``: the palette where one is kept, else ``softmax(G_global(Pool(X̂)))[:E]`` over
        E experts + "none" (Pool = mean over a frame's tokens); uniform ``1/E`` for ``no_global``."""
        if self.variant == "no_global":
            return jnp.full((n, self.num_experts), 1.0 / self.num_experts, h.dtype)
        # Computed even when a palette replaces it everywhere: the parameter tree never depends on
        # the call, and the logits feed the gate's auxiliary loss in training.
        logits = dense(self.num_experts + 1, ("embed", "expert"), name="global_gate", dtype=self.dtype)(h.mean(axis=1))
        self.sow("intermediates", "global_gate_logits", logits)
        g = jax.nn.softmax(logits.astype(jnp.float32), axis=-1)[:, : self.num_experts].astype(h.dtype)
        palette = cond.palette
        if palette is None:
            return g
        if palette.ndim != 2 or palette.shape[-1] != self.num_experts or n % palette.shape[0]:
            raise ValueError(
                f"emotion palette must be (B, {self.num_experts}) weights with B dividing the "
                f"{n} frame-folded rows, got shape {palette.shape}"
            )
        rows = repeat_to_batch(palette.astype(h.dtype), n)
        if cond.palette_keep is None:
            return rows
        keep = repeat_to_batch(cond.palette_keep.astype(bool)[:, None], n)
        return jnp.where(keep, rows, g)
