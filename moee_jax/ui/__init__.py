"""The web page of `moee serve` (:mod:`moee_jax.ui.app`)."""
