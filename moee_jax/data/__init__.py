"""Data: synthetic talking faces, audio loading and per-frame features, face / lip / mouth masks."""
