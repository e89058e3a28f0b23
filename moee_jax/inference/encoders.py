"""The pretrained encoders a trained model takes at animation time.

A run trained on a feature cache (:mod:`moee_jax.data.feature_cache`, ``data.features``) keeps the
cache's ``features.json`` in ``RUN/<stage>/``: which wav2vec2 made its audio features and which T5 its
text features. Animating it needs those encoders again: the folders given (``--audio_encoder``,
``--text_encoder``), else the folders recorded there when this machine has them. A folder whose
widths do not fit the model, or that holds another encoder than the recorded one (its config hash),
is refused with an :class:`~moee_jax.inference.inputs.InputError` naming the flag, and the file and
field it disagrees with. A run trained without a cache takes log-mel audio and no audio encoder; its
text source (if any) takes the T5 folder given.
"""

from __future__ import annotations

import dataclasses
import os
import pathlib

from moee_jax.data import feature_cache
from moee_jax.inference.inputs import InputError


@dataclasses.dataclass(frozen=True)
class ModelEncoders:
    """Which encoders a model takes and where they are (see the module docstring).

    ``audio`` / ``text``: the encoders recorded for the model (``features.json``'s ``audio_encoder`` /
    ``text_encoder``; ``audio`` None: the model takes log-mel audio); ``audio_folder`` /
    ``text_folder``: the folders to load (given, else recorded and present here; None: none known);
    ``text_length``: the cache's tokens per text (None: no record); ``manifest``: the record's file.
    """

    audio: dict | None = None
    text: dict | None = None
    audio_folder: str | None = None
    text_folder: str | None = None
    text_length: int | None = None
    manifest: str = ""

    @classmethod
    def of_model(
        cls,
        config,
        features: dict | None = None,
        manifest: str = "",
        *,
        audio_encoder: str | os.PathLike | None = None,
        text_encoder: str | os.PathLike | None = None,
        source: str = "",
    ) -> ModelEncoders:
        """The encoders of a model of ``config`` whose ``features.json`` is ``features`` (read from
        ``manifest``); without one, the cache folder of ``config.data.features`` is asked, when set."""
        folder = str(config.data.get("features", "") or "")
        if features is None and folder:
            try:
                features, manifest = feature_cache.read_manifest(folder), str(pathlib.Path(folder) / feature_cache.MANIFEST)
            except feature_cache.FeatureCacheError as e:
                raise InputError(
                    f"--checkpoint {source}: the model was trained on a feature cache (data.features={folder}) but its "
                    f"{feature_cache.MANIFEST} is not in the run's stage folder, and {e}"
                ) from None
        if features is None:
            given = None if audio_encoder is None else str(audio_encoder)
            if given is not None:
                raise InputError(
                    f"--audio_encoder {given}: this model was trained on log-mel audio, not on encoder features; drop the flag"
                )
            return cls(text_folder=None if text_encoder is None else str(text_encoder))
        audio, text = features["audio_encoder"], features["text_encoder"]
        if audio is None and audio_encoder is not None:
            raise InputError(
                f"--audio_encoder {audio_encoder}: {manifest}: field audio_encoder is null: the model takes log-mel audio; drop the flag"
            )
        return cls(
            audio=audio, text=text, audio_folder=_folder(audio_encoder, audio), text_folder=_folder(text_encoder, text),
            text_length=features.get("text_length"), manifest=manifest,
        )  # fmt: skip

    def load_audio(self, *, window: int, projection_inputs: int | None, speech_dim: int | None):
        """The wav2vec2 bundle of :attr:`audio_folder`, after checking it against the model: windows of
        ``window`` frames of all its hidden states must make the audio projection's
        ``projection_inputs`` per frame, its width the speech emotion source's ``speech_dim`` (None:
        no such source), and its config the recorded encoder's."""
        from moee_jax.checkpoint.pretrained import load_wav2vec2

        recorded = self.audio
        if self.audio_folder is None:
            raise InputError(
                f"--audio_encoder: the model was trained on wav2vec2 features ({self.manifest}: audio_encoder "
                f"{recorded['folder']}, not on this machine); pass --audio_encoder FOLDER, that wav2vec2 folder"
            )
        flag = f"--audio_encoder {self.audio_folder}"
        try:
            given = feature_cache.describe_audio_encoder(self.audio_folder)
        except (FileNotFoundError, ValueError) as e:
            raise InputError(f"{flag}: {e}") from None
        inputs = window * given["layers"] * given["dim"]
        if projection_inputs is not None and inputs != projection_inputs:
            raise InputError(
                f"{flag}: windows of {window} frames × {given['layers']} hidden states × width {given['dim']} make {inputs} "
                f"audio inputs per frame, but the model's audio projection takes {projection_inputs}; pass the wav2vec2 the "
                "model was trained with"
            )
        if speech_dim is not None and given["dim"] != speech_dim:
            raise InputError(
                f"{flag}: its features are {given['dim']} wide but the model's speech emotion source takes {speech_dim} "
                "(model.emotion.speech_dim); pass the wav2vec2 the model was trained with"
            )
        self._check(recorded, given, "audio_encoder", "--audio_encoder")
        try:
            return load_wav2vec2(self.audio_folder)
        except (FileNotFoundError, ValueError) as e:
            raise InputError(f"{flag}: {e}") from None

    def load_text(self, *, text_dim: int | None):
        """The T5 bundle of :attr:`text_folder`, checked against the model's ``text_dim`` and the
        recorded encoder (when there is a record)."""
        from moee_jax.checkpoint.pretrained import load_t5_encoder

        flag = f"--text_encoder {self.text_folder}"
        try:
            given = feature_cache.describe_text_encoder(self.text_folder)
        except (FileNotFoundError, ValueError) as e:
            raise InputError(f"{flag}: {e}") from None
        if text_dim is not None and given["dim"] != text_dim:
            raise InputError(
                f"{flag}: its features are {given['dim']}-wide but the model's text branch takes {text_dim}; pass the T5 "
                "encoder the model was trained with"
            )
        if self.text is not None:
            self._check(self.text, given, "text_encoder", "--text_encoder")
        try:
            return load_t5_encoder(self.text_folder)
        except (FileNotFoundError, ValueError) as e:
            raise InputError(f"{flag}: {e}") from None

    def _check(self, recorded: dict, given: dict, field: str, flag: str) -> None:
        try:
            feature_cache.check_encoder(recorded, given, field=field, manifest=self.manifest, given_as=flag)
        except feature_cache.FeatureCacheError as e:
            raise InputError(f"{flag}: {e}") from None


def _folder(given: str | os.PathLike | None, recorded: dict | None) -> str | None:
    """The folder given, else the recorded one when it exists here."""
    if given is not None:
        return str(given)
    if recorded is not None and pathlib.Path(recorded["folder"]).is_dir():
        return recorded["folder"]
    return None


def projection_inputs(params: dict) -> int | None:
    """Inputs per frame of the audio projection in ``params`` (its first layer's fan-in), if any."""
    try:
        kernel = params["conditioning"]["audio_projection"]["proj1"]["kernel"]
    except (KeyError, TypeError):
        return None
    return int(getattr(kernel, "value", kernel).shape[0])
