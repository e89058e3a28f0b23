"""Data: audio loading and frame alignment (:mod:`.audio`), face / lip / mouth masks (:mod:`.masks`)."""
