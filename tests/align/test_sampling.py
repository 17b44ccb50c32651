"""Best-of-N with a shared prefill (`align.sampling.generate_groups`): the same candidates as
`generate(num_return_sequences=N)` (greedy: token for token; sampled with a seed: the same draws, and the same
distribution over many prompts), each image encoded once and each prompt prefilled once, for both fusions and
under LoRA."""

import datasets
import pytest
import torch
from peft import LoraConfig, get_peft_model

from align.evaluation import question_rows
from align.sampling import generate_groups
from model import VLMForConditionalGeneration, VLMProcessor
from tests.align.training_helpers import tiny_vlm, tiny_world


@pytest.fixture(scope="module")
def setup(tiny_parts, tmp_path_factory):
    root = tmp_path_factory.mktemp("sampling")
    world = datasets.load_from_disk(tiny_world(root / "world", images=4))["train"]
    return {
        "prepend": tiny_vlm(root / "vlm", tiny_parts["siglip"], tiny_parts["llama"]),
        "cross_attention": tiny_vlm(root / "vlm-cross", tiny_parts["siglip"], tiny_parts["llama"], "cross_attention"),
        "rows": question_rows(world, 6),
        "questions": question_rows(world),
    }


def _model(setup, fusion: str, lora: bool):
    model = VLMForConditionalGeneration.from_pretrained(setup[fusion]).eval()
    if fusion == "cross_attention":
        # Zero-gated adapters add nothing at start: open the gates so the images change the text.
        with torch.no_grad():
            for name, parameter in model.named_parameters():
                if "gate" in name:
                    parameter.fill_(1.0)
    if lora:
        config = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
        model = get_peft_model(model, config).eval()
    return model, VLMProcessor.from_pretrained(setup[fusion])


def _inputs(processor, rows):
    texts = [processor.apply_chat_template(r["prompt"], add_generation_prompt=True, tokenize=False) for r in rows]
    images = [list(r["images"]) for r in rows]
    return processor(images=images, text=texts, padding=True, padding_side="left", return_tensors="pt")


def _settings(processor, **kwargs):
    tokenizer = processor.tokenizer
    return {"max_new_tokens": 6, "pad_token_id": tokenizer.pad_token_id, "eos_token_id": tokenizer.eos_token_id, **kwargs}


@pytest.mark.parametrize(("fusion", "lora"), [("prepend", False), ("cross_attention", False), ("prepend", True)])
def test_shared_prefill_gives_generates_candidates(setup, fusion, lora):
    model, processor = _model(setup, fusion, lora)
    rows = [setup["rows"][i] for i in range(3)]
    inputs = _inputs(processor, rows)
    n = 4
    tower = (model.get_base_model() if lora else model).model.vision_towers[0]
    encoded = []
    hook = tower.register_forward_hook(lambda module, args, output: encoded.append(args[0].shape[0]))
    try:
        greedy = generate_groups(model, dict(inputs), n, **_settings(processor, do_sample=False))
        assert encoded == [3]  # 3 prompts, 3 images: once each, not once per candidate
        # Greedy decoding has one answer per prompt (generate refuses num_return_sequences without sampling).
        expected = model.generate(**inputs, use_cache=True, **_settings(processor, do_sample=False))
        torch.testing.assert_close(greedy, expected.repeat_interleave(n, dim=0), rtol=0, atol=0)

        sampled = {}
        for name, run in (
            ("shared", lambda: generate_groups(model, dict(inputs), n, **_settings(processor, do_sample=True, top_k=0))),
            ("generate", lambda: model.generate(
                **inputs, num_return_sequences=n, use_cache=True, **_settings(processor, do_sample=True, top_k=0))),
        ):
            torch.manual_seed(3)
            sampled[name] = run()
    finally:
        hook.remove()
    # The same random draws from the same distributions: the same candidates.
    assert torch.equal(sampled["shared"], sampled["generate"])
    assert len({tuple(row.tolist()) for row in sampled["shared"]}) > 1


def test_sampled_first_tokens_follow_the_models_distribution(setup):
    """Over many seeds, the first tokens the shared prefill samples follow the model's next-token distribution, as
    generate's do (total variation of 200 draws against the exact probabilities)."""
    model, processor = _model(setup, "prepend", False)
    inputs = _inputs(processor, [setup["rows"][0]])
    with torch.no_grad():
        logits = model(**inputs).logits[0, -1]
    # The random tiny model's next-token distribution is nearly flat: a low temperature gives it a few likely tokens.
    temperature = next(t for t in (1.0, 0.3, 0.1, 0.05, 0.03, 0.02, 0.01) if torch.softmax(logits / t, -1).max() > 0.25)
    exact = torch.softmax(logits / temperature, dim=-1)
    settings = _settings(processor, do_sample=True, top_k=0, max_new_tokens=1, temperature=temperature)
    length = inputs["input_ids"].shape[1]
    counts = {"shared": torch.zeros_like(exact), "generate": torch.zeros_like(exact)}
    for seed in range(25):
        torch.manual_seed(seed)
        counts["shared"] += torch.bincount(generate_groups(model, dict(inputs), 8, **settings)[:, length], minlength=len(exact))
        torch.manual_seed(1000 + seed)
        plain = model.generate(**inputs, num_return_sequences=8, use_cache=True, **settings)[:, length]
        counts["generate"] += torch.bincount(plain, minlength=len(exact))
    # The likely tokens one by one, the long tail as one bucket (its tokens are each too rare to count).
    likely = exact > 0.02
    assert likely.sum() >= 3  # several likely tokens, so the comparison means something

    def buckets(p):
        return torch.cat([p[likely], p[~likely].sum().reshape(1)])

    for name, count in counts.items():
        assert 0.5 * (buckets(count / count.sum()) - buckets(exact)).abs().sum() < 0.12, name


@pytest.mark.parametrize("lora", [False, True])
def test_sharing_images_gives_the_unshared_greedy_answers(setup, lora):
    """Questions of one image batched together (`generate_sharing_images`): each image encoded once, the same greedy
    tokens as the ordinary `generate` row by row, and `generate_answers(share_images=True)` the same answers."""
    from align.evaluation import generate_answers
    from align.sampling import generate_sharing_images

    model, processor = _model(setup, "prepend", lora)
    questions = list(setup["questions"])  # in the world's order: an image's questions together
    first_images = list(dict.fromkeys(r["image_id"] for r in questions))[:2]
    rows = [r for image in first_images for r in [q for q in questions if q["image_id"] == image][:3]]
    image_ids = [r["image_id"] for r in rows]
    assert len(set(image_ids)) == 2 and len(rows) == 6
    inputs = _inputs(processor, rows)
    groups = torch.tensor([sorted(set(image_ids)).index(i) for i in image_ids])
    tower = (model.get_base_model() if lora else model).model.vision_towers[0]
    encoded = []
    hook = tower.register_forward_hook(lambda module, args, output: encoded.append(args[0].shape[0]))
    try:
        shared = generate_sharing_images(model, dict(inputs), groups, **_settings(processor, do_sample=False))
    finally:
        hook.remove()
    assert encoded == [len(set(image_ids))]  # once per image, not once per question
    expected = model.generate(**inputs, use_cache=True, **_settings(processor, do_sample=False))
    expected = expected[:, inputs["input_ids"].shape[1] :]
    assert shared.shape == expected.shape
    for row in range(len(rows)):  # the same tokens up to the end of each answer (rows pad differently after it)
        stop = (expected[row] == processor.tokenizer.eos_token_id).nonzero()
        end = int(stop[0]) + 1 if len(stop) else expected.shape[1]
        assert torch.equal(shared[row, :end], expected[row, :end]), row
    plain = generate_answers(model, processor, rows, batch_size=4, max_new_tokens=6, log_every=0)
    assert generate_answers(model, processor, rows, batch_size=4, max_new_tokens=6, log_every=0, share_images=True) == plain

    # Rows said to share an image that they do not share are refused.
    with pytest.raises(ValueError, match="does not share its group's image"):
        generate_sharing_images(model, dict(inputs), torch.zeros(len(rows), dtype=torch.long), **_settings(processor))


def test_sharing_images_falls_back_for_cross_attention(setup):
    from align.evaluation import generate_answers

    model, processor = _model(setup, "cross_attention", False)
    rows = list(setup["rows"])
    plain = generate_answers(model, processor, rows, batch_size=4, max_new_tokens=6, log_every=0)
    assert generate_answers(model, processor, rows, batch_size=4, max_new_tokens=6, log_every=0, share_images=True) == plain
