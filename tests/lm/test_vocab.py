"""The joint id space and the sample sequence layout."""

from __future__ import annotations

import pytest
import torch

from loong.lm.vocab import VocabConfig, Vocabulary


@pytest.fixture
def vocab() -> Vocabulary:
    return Vocabulary(VocabConfig(text_vocab_size=40, video_vocab_size=64, n_special=10))


def test_paper_vocabulary_size_and_ranges():
    vocab = Vocabulary(VocabConfig())
    assert vocab.vocab_size == 40_202
    assert vocab.video_id_range == (32_000, 40_192)
    specials = [vocab.bos, vocab.eos, vocab.bov, vocab.eov, vocab.pad]
    assert len(set(specials)) == 5
    assert all(40_192 <= s < 40_202 for s in specials)
    assert vocab.reserved_ids == tuple(range(40_197, 40_202))
    assert not set(specials) & set(vocab.reserved_ids)


def test_too_few_specials_is_rejected():
    with pytest.raises(ValueError, match="n_special"):
        VocabConfig(n_special=4)


def test_layout_round_trip_and_frame_index(vocab):
    text = [3, 1, 4, 1, 5]
    indices = torch.randint(0, 64, (3, 2, 4))  # (t, h, w)
    layout = vocab.layout(text, indices)
    ids, frames = layout.token_ids, layout.frame_index
    assert ids.dtype == frames.dtype == torch.long
    assert ids.shape == frames.shape == (1 + 5 + 1 + 24 + 2,)
    assert ids[0] == vocab.bos and ids[1:6].tolist() == text and ids[6] == vocab.bov
    assert ids[-2:].tolist() == [vocab.eov, vocab.eos]
    is_video = vocab.is_video(ids)
    assert is_video.sum() == 24 and is_video[7:31].all()
    assert torch.equal(vocab.ids_to_video(ids[is_video], grid=(2, 4)), indices)
    # Each token carries its own latent frame, in raster order; text and specials carry −1.
    assert torch.equal(frames[is_video], torch.arange(3).repeat_interleave(8))
    assert (frames[~is_video] == -1).all()


def test_prompt_and_open_layouts(vocab):
    prompt = vocab.layout([7, 8], None)
    assert prompt.token_ids.tolist() == [vocab.bos, 7, 8, vocab.bov]
    assert prompt.frame_index.tolist() == [-1] * 4
    open_video = vocab.layout([7], torch.zeros(1, 2, 2, dtype=torch.long), eov=False)
    assert open_video.token_ids[-1] == vocab.video_offset
    assert vocab.eov not in open_video.token_ids.tolist()


def test_out_of_range_ids_name_the_id_and_the_range(vocab):
    with pytest.raises(ValueError, match=r"id 104 is not a video id.*\[40, 104\)"):
        vocab.ids_to_video(torch.tensor([40, 41, 104, 42]), grid=(2, 2))
    with pytest.raises(ValueError, match=r"video index 64 .*\[0, 64\)"):
        vocab.video_to_ids(torch.tensor([[[1, 64]]]))
    with pytest.raises(ValueError, match=r"text id 40 .*\[0, 40\)"):
        vocab.layout([1, 40], None)
    with pytest.raises(ValueError, match="whole 2×2 frames"):
        vocab.ids_to_video(torch.tensor([40, 41, 42]), grid=(2, 2))


def test_collate_right_pads_with_pad_and_masks(vocab):
    a = vocab.layout([1, 2, 3], torch.zeros(1, 2, 2, dtype=torch.long))  # 11 tokens
    b = vocab.layout([4], None)  # 3 tokens
    batch = vocab.collate([a, b])
    assert batch.token_ids.shape == batch.frame_index.shape == batch.attention_mask.shape
    assert batch.token_ids.shape == (2, 11)
    assert batch.attention_mask.sum(1).tolist() == [11, 3]
    assert (batch.token_ids[1, 3:] == vocab.pad).all()
    assert (batch.frame_index[1, 3:] == -1).all()
    assert vocab.collate([a, b], pad_to=16).token_ids.shape == (2, 16)
    with pytest.raises(ValueError, match="pad_to"):
        vocab.collate([a, b], pad_to=8)
