import torch

from mcit.data.format import Sample
from mcit.models.encode import IGNORE_INDEX, Encoder, num_image_tokens
from mcit.models.tiny import build_tiny_llava, build_word_tokenizer


def _encoder(tmp_path):
    from PIL import Image

    from mcit.config import TinyModelConfig

    Image.new("RGB", (48, 48), (10, 20, 30)).save(tmp_path / "i.png")
    tok = build_word_tokenizer(["what color is the circle ?", "red blue", "a long answer here"])
    spec = TinyModelConfig(text_hidden=32, text_heads=2, vision_hidden=16, vision_heads=2, text_layers=1, vision_layers=1)
    model, processor = build_tiny_llava(spec, tok)
    enc = Encoder(processor, "USER: {question} ASSISTANT:", max_length=32)
    samples = [
        Sample("1", tmp_path / "i.png", "what color?", "red", ["red"]),
        Sample("2", tmp_path / "i.png", "what color is the circle?", "a long answer here", ["x"]),
    ]
    return model, processor, enc, samples


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
