"""Pretrained encoders ported to Flax: speech (wav2vec 2.0, speech-emotion), text and audio front-ends."""
