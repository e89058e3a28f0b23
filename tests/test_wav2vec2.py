"""wav2vec 2.0 and the speech-emotion encoder: parity with transformers on tiny random models, and the converters."""

from __future__ import annotations

import json
import logging

import flax.linen as nn
import jax
import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from moee_jax.checkpoint.convert.state_dict import ConversionError
from moee_jax.checkpoint.convert.wav2vec2 import convert_speech_emotion, convert_wav2vec2
from moee_jax.models.encoders.speech_emotion import SpeechEmotionConfig, SpeechEmotionEncoder
from moee_jax.models.encoders.wav2vec2 import Wav2Vec2Config, Wav2Vec2Model, min_num_samples
from tests.reference_models import rel_err

TINY = dict(
    hidden_size=32,
    num_hidden_layers=2,
    num_attention_heads=4,
    intermediate_size=37,
    conv_dim=(16, 16, 16),
    conv_kernel=(10, 3, 3),
    conv_stride=(5, 2, 2),
    num_conv_pos_embeddings=16,  # even: exercises the SamePad removal of the last step
    num_conv_pos_embedding_groups=4,
)
MODES = {
    "group": dict(feat_extract_norm="group", do_stable_layer_norm=False),
    "stable": dict(feat_extract_norm="layer", do_stable_layer_norm=True, conv_bias=True),
}
EMOTIONS = ("neutral", "happy", "sad", "angry", "fearful", "surprised")
SAMPLES, VALID = 400, 300  # 19 frames; the second sample has 14 valid ones
WEIGHTS = "model.safetensors"
TOL = 1e-4


def randomize(torch, model, seed: int):
    """Perturb every parameter: default zero biases / unit norm scales would hide misplaced tensors."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=gen)
            if name.endswith("norm.weight"):
                p.copy_(1.0 + 0.1 * noise)
            elif name.endswith("original0"):  # weight-norm magnitude g
                p.mul_(1.0 + 0.1 * noise)
            elif name == "layer_weights":
                p.add_(0.5 * noise)
            else:
                p.add_(0.05 * noise)
    return model.eval()


def padded_batch():
    """Two waveforms (2, SAMPLES): the second zero-padded after VALID samples, with its sample mask."""
    rng = np.random.default_rng(0)
    waveform = rng.standard_normal((2, SAMPLES)).astype(np.float32)
    mask = np.ones((2, SAMPLES), np.int32)
    waveform[1, VALID:] = 0.0
    mask[1, VALID:] = 0
    return waveform, mask


def torch_forward(torch, model, waveform, mask=None):
    with torch.no_grad():
        return model(
            torch.from_numpy(waveform),
            attention_mask=None if mask is None else torch.from_numpy(mask),
            output_hidden_states=True,
        )


def valid_frames(x, frames):
    """Concatenate the valid frames of (B, L, ...) ``x`` under the (B, L) bool mask ``frames``."""
    return np.concatenate([np.asarray(x)[b][frames[b]] for b in range(len(frames))])


@pytest.fixture(scope="module")
def batch():
    return padded_batch()


@pytest.fixture(scope="module", params=sorted(MODES))
def mode(request):
    return request.param


@pytest.fixture(scope="module")
def torch_model(torch, mode):
    from transformers import Wav2Vec2Config as HFConfig
    from transformers import Wav2Vec2Model as HFModel

    torch.manual_seed(0)
    return randomize(torch, HFModel(HFConfig(**TINY, **MODES[mode])), seed=1)


@pytest.fixture(scope="module")
def model_dir(torch_model, tmp_path_factory):
    path = tmp_path_factory.mktemp("wav2vec2")
    torch_model.save_pretrained(path, safe_serialization=True)
    return path


@pytest.fixture(scope="module")
def model(model_dir):
    return Wav2Vec2Model(Wav2Vec2Config.from_hf(json.loads((model_dir / "config.json").read_text())))


@pytest.fixture(scope="module")
def params(model_dir, model):
    return convert_wav2vec2(model_dir, model)


@pytest.fixture(scope="module")
def apply(model):
    return jax.jit(lambda p, x, m: model.apply({"params": p}, x, m))


@pytest.fixture(scope="module")
def unmasked(torch, torch_model, params, apply, batch):
    waveform, _ = batch
    return torch_forward(torch, torch_model, waveform), apply(params, waveform, None)


@pytest.fixture(scope="module")
def masked(torch, torch_model, params, apply, batch):
    waveform, mask = batch
    return torch_forward(torch, torch_model, waveform, mask), apply(params, waveform, mask)


def test_last_hidden_state_matches_transformers(unmasked):
    ref, ours = unmasked
    assert ours.last_hidden_state.shape == tuple(ref.last_hidden_state.shape)
    assert rel_err(ours.last_hidden_state, ref.last_hidden_state.numpy()) < TOL


def test_every_hidden_state_matches_transformers(unmasked):
    ref, ours = unmasked
    assert ours.hidden_states.shape[0] == len(ref.hidden_states) == TINY["num_hidden_layers"] + 1
    for i, (a, b) in enumerate(zip(ours.hidden_states, ref.hidden_states)):
        assert rel_err(a, b.numpy()) < TOL, f"hidden state {i}"


def test_extract_features_match_transformers(unmasked):
    ref, ours = unmasked
    assert rel_err(ours.extract_features, ref.extract_features.numpy()) < TOL


def test_frame_mask_matches_transformers(torch, torch_model, masked, batch):
    _, ours = masked
    _, mask = batch
    ref = torch_model._get_feature_vector_attention_mask(ours.frame_mask.shape[1], torch.from_numpy(mask))
    np.testing.assert_array_equal(np.asarray(ours.frame_mask), ref.numpy())
    assert 0 < ours.frame_mask[1].sum() < ours.frame_mask.shape[1]


def test_valid_frames_match_transformers_with_attention_mask(masked):
    ref, ours = masked
    frames = np.asarray(ours.frame_mask)
    assert rel_err(valid_frames(ours.last_hidden_state, frames), valid_frames(ref.last_hidden_state, frames)) < TOL
    for i, (a, b) in enumerate(zip(ours.hidden_states, ref.hidden_states)):
        assert rel_err(valid_frames(a, frames), valid_frames(b.numpy(), frames)) < TOL, f"hidden state {i}"


def test_config_from_transformers_object_equals_config_from_config_json(torch_model, model):
    assert Wav2Vec2Config.from_hf(torch_model.config) == model.config


def test_legacy_weight_g_weight_v_names_convert_identically(model_dir, model, params, tmp_path):
    legacy = {
        k.replace("parametrizations.weight.original0", "weight_g").replace("parametrizations.weight.original1", "weight_v"): v
        for k, v in load_file(str(model_dir / WEIGHTS)).items()
    }
    assert "encoder.pos_conv_embed.conv.weight_g" in legacy and "encoder.pos_conv_embed.conv.weight_v" in legacy
    save_file(legacy, str(tmp_path / WEIGHTS))
    jax.tree.map(np.testing.assert_array_equal, convert_wav2vec2(tmp_path / WEIGHTS, model), params)


def test_missing_key_is_named_in_conversion_error(model_dir, model, tmp_path):
    state = load_file(str(model_dir / WEIGHTS))
    del state["encoder.layers.1.feed_forward.output_dense.bias"]
    save_file(state, str(tmp_path / WEIGHTS))
    with pytest.raises(ConversionError, match="encoder/layers_1/feed_forward/output_dense/bias"):
        convert_wav2vec2(tmp_path / WEIGHTS, model)


def test_head_keys_of_a_prefixed_checkpoint_are_skipped_and_logged(model_dir, model, params, tmp_path, caplog):
    state = {f"wav2vec2.{k}": v for k, v in load_file(str(model_dir / WEIGHTS)).items()}
    state["lm_head.weight"] = np.zeros((8, TINY["hidden_size"]), np.float32)
    state["quantizer.codevectors"] = np.zeros((1, 4, 8), np.float32)
    state["project_q.weight"] = np.zeros((8, 8), np.float32)
    save_file(state, str(tmp_path / WEIGHTS))
    with caplog.at_level(logging.INFO, logger="moee_jax.checkpoint.convert.wav2vec2"):
        converted = convert_wav2vec2(tmp_path / WEIGHTS, model)
    jax.tree.map(np.testing.assert_array_equal, converted, params)
    for key in ("lm_head.weight", "quantizer.codevectors", "project_q.weight", "wav2vec2.masked_spec_embed"):
        assert key in caplog.text


def test_unknown_key_of_a_prefixed_checkpoint_is_rejected(model_dir, model, tmp_path):
    state = {f"wav2vec2.{k}": v for k, v in load_file(str(model_dir / WEIGHTS)).items()}
    state["mystery_head.weight"] = np.zeros((2, 2), np.float32)
    save_file(state, str(tmp_path / WEIGHTS))
    with pytest.raises(ConversionError, match="mystery_head.weight"):
        convert_wav2vec2(tmp_path / WEIGHTS, model)


# --- speech-emotion encoder (Wav2Vec2ForSequenceClassification) ---


@pytest.fixture(scope="module")
def torch_classifier(torch):
    from transformers import Wav2Vec2Config as HFConfig
    from transformers import Wav2Vec2ForSequenceClassification

    config = HFConfig(
        **TINY,
        **MODES["group"],
        use_weighted_layer_sum=True,
        classifier_proj_size=24,
        id2label=dict(enumerate(EMOTIONS)),
        label2id={name: i for i, name in enumerate(EMOTIONS)},
    )
    torch.manual_seed(0)
    return randomize(torch, Wav2Vec2ForSequenceClassification(config), seed=2)


@pytest.fixture(scope="module")
def classifier_dir(torch_classifier, tmp_path_factory):
    path = tmp_path_factory.mktemp("speech_emotion")
    torch_classifier.save_pretrained(path, safe_serialization=True)
    return path


@pytest.fixture(scope="module")
def classifier_params(classifier_dir):
    return convert_speech_emotion(classifier_dir)


def test_speech_emotion_config_reads_the_head_and_labels(classifier_dir):
    config = SpeechEmotionConfig.from_hf(json.loads((classifier_dir / "config.json").read_text()))
    assert (config.num_labels, config.classifier_proj_size, config.use_weighted_layer_sum) == (6, 24, True)
    assert config.labels == EMOTIONS


def test_speech_emotion_pooled_embedding_and_logits_match_transformers(torch, torch_classifier, classifier_dir, classifier_params, batch):
    waveform, mask = batch
    pooled_ref = []
    hook = torch_classifier.classifier.register_forward_hook(lambda m, args, out: pooled_ref.append(args[0].numpy()))
    try:
        ref = torch_forward(torch, torch_classifier, waveform, mask)
    finally:
        hook.remove()
    encoder = SpeechEmotionEncoder(SpeechEmotionConfig.from_hf(torch_classifier.config))
    ours = jax.jit(lambda p, x, m: encoder.apply({"params": p}, x, m))(classifier_params, waveform, mask)
    assert ours.pooled.shape == (2, 24) and ours.logits.shape == (2, len(EMOTIONS))
    assert rel_err(ours.pooled, pooled_ref[0]) < TOL
    assert rel_err(ours.logits, ref.logits.numpy()) < TOL


def test_convert_wav2vec2_takes_the_backbone_of_a_sequence_classifier(classifier_dir, classifier_params):
    jax.tree.map(np.testing.assert_array_equal, convert_wav2vec2(classifier_dir), classifier_params["wav2vec2"])


def test_every_param_carries_logical_axis_names():
    config = SpeechEmotionConfig(Wav2Vec2Config(**TINY, **MODES["stable"]), num_labels=3, use_weighted_layer_sum=True)
    waveform = jax.ShapeDtypeStruct((1, min_num_samples(config.backbone)), np.float32)
    params = jax.eval_shape(SpeechEmotionEncoder(config).init, jax.random.key(0), waveform)["params"]
    leaves = jax.tree.leaves(params, is_leaf=lambda x: isinstance(x, nn.Partitioned))
    unnamed = [leaf for leaf in leaves if not isinstance(leaf, nn.Partitioned) or len(leaf.names) != leaf.value.ndim]
    assert leaves and not unnamed
