import torch

from mcit.models.encode import IGNORE_INDEX, num_image_tokens
from tests.conftest import make_tiny as _encoder


def test_image_tokens_match_the_processor(tmp_path):
    model, processor, enc, samples = _encoder(tmp_path)
    from PIL import Image

    text = "USER: <image>\nwhat color is the circle? ASSISTANT:"
    expanded = processor(images=[Image.open(samples[1].image)], text=[text])["input_ids"][0]
    image_id = model.config.image_token_index
    assert num_image_tokens(processor) == 36 == sum(1 for t in expanded if t == image_id)
    assert enc.prompt_ids(samples[1])[1:] == list(expanded)


def test_labels_mask_prompt_image_and_padding(tmp_path):
    model, processor, enc, samples = _encoder(tmp_path)
    batch = enc.train_batch(samples)
    tok = processor.tokenizer
    image_id = model.config.image_token_index
    for row, sample in enumerate(samples):
        ids, labels = batch["input_ids"][row], batch["labels"][row]
        supervised = ids[labels != IGNORE_INDEX].tolist()
        assert tok.decode(supervised, skip_special_tokens=True) == sample.answer
        assert supervised[-1] == tok.eos_token_id
        assert not (labels[ids == image_id] != IGNORE_INDEX).any()
        assert (labels[batch["attention_mask"][row] == 0] == IGNORE_INDEX).all()
    # right padding for training: the shorter row ends in pad
    assert batch["attention_mask"][0, -1] == 0 and batch["attention_mask"][1, -1] == 1
    assert batch["attention_mask"][0, 0] == 1
    loss = model(**batch).loss
    assert torch.isfinite(loss)


def test_generation_batches_are_left_padded(tmp_path):
    model, processor, enc, samples = _encoder(tmp_path)
    batch = enc.generation_batch(samples)
    assert batch["attention_mask"][:, -1].all()  # every prompt ends at the last column
    assert batch["attention_mask"][0, 0] == 0  # the shorter prompt is padded on the left
    out = model.generate(**batch, max_new_tokens=3, do_sample=False)
    assert out.shape[0] == 2


def test_memoised_ids_follow_the_prompt_placeholders(tmp_path):
    model, processor, enc, samples = _encoder(tmp_path)
    first = enc.train_batch(samples)
    assert torch.equal(enc.train_batch(samples)["input_ids"], first["input_ids"])  # served from the memo
    enc.prefix_tokens = 3  # a prompt method reserves placeholders after setup: the ids must follow
    shifted = enc.train_batch(samples)
    assert shifted["input_ids"].shape[1] == first["input_ids"].shape[1] + 3
    assert (shifted["input_ids"][:, 1:4] == processor.tokenizer.pad_token_id).all()
    assert torch.equal(shifted["labels"][:, 4:], first["labels"][:, 1:])
