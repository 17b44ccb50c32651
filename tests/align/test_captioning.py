"""The caption pairs of adapter pretraining and the caption evaluation (generation batching and the metric wiring)."""

import pytest
import torch
from datasets import Dataset

from align.captioning import CAPTION_PROMPT, caption_training_rows, evaluate_captions, load_training_pairs
from align.world import build_world


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    path = tmp_path_factory.mktemp("world")
    return path, build_world(str(path), sizes={"train": 6, "test": 5})


class CopyingCaptioner(torch.nn.Module):
    """A stand-in VLM whose greedy caption of image i is `captions[i]`: it checks the prompts are left-padded in
    batches and returns the prompt followed by the caption's tokens, as `generate` does."""

    def __init__(self, tokenizer, captions):
        super().__init__()
        self.tokenizer, self.captions, self.seen = tokenizer, list(captions), 0
        self.anchor = torch.nn.Parameter(torch.zeros(1))  # where the model lives (`next(model.parameters())`)

    def generate(self, input_ids, attention_mask, pixel_values, max_new_tokens, do_sample, **kwargs):
        assert not do_sample and pixel_values.shape[0] == input_ids.shape[0]
        assert (attention_mask[:, -1] == 1).all()  # left padding: every prompt ends at the last position
        rows = []
        for _ in range(input_ids.shape[0]):
            ids = self.tokenizer(self.captions[self.seen], add_special_tokens=False)["input_ids"][:max_new_tokens]
            rows.append(ids + [self.tokenizer.eos_token_id] * (max_new_tokens - len(ids)))
            self.seen += 1
        return torch.cat([input_ids, torch.tensor(rows)], dim=1)


def test_training_pairs_are_caption_requests_answered_by_the_caption(world):
    path, built = world
    rows = caption_training_rows(built["train"], style="short", limit=4)
    assert rows.column_names == ["images", "messages"] and len(rows) == 4
    user, assistant = rows[0]["messages"]
    assert user["content"][0]["type"] == "image" and assistant["content"][0]["text"] == built["train"][0]["caption"]
    detailed = load_training_pairs(world_path=path, style="detailed")
    assert detailed[1]["messages"][1]["content"][0]["text"] == built["train"][1]["caption_detailed"]
    with pytest.raises(ValueError, match="unknown caption style"):
        caption_training_rows(built["train"], style="poetic")


def test_question_repeats_weigh_a_category_of_the_mixture(world):
    """`question_repeats` asks each question of a category N times: once among its image's other questions, N-1 times
    in conversations of that category alone; the other categories and the captions keep their counts."""
    import json

    from align.world import question_rows, spatial_pair
    from align.world.language import is_spatial_yes_no

    path, built = world

    def answered(rows):
        counts = {}
        for messages in rows["messages"]:
            for turn in messages:
                if turn["role"] == "user":
                    text = next(c["text"] for c in turn["content"] if c["type"] == "text")
                    counts[text] = counts.get(text, 0) + 1
        return counts

    plain = load_training_pairs(world_path=path, style="detailed", questions=["color", "count"], question_turns=12)
    heavy = load_training_pairs(world_path=path, style="detailed", questions=["color", "count"], question_turns=12,
                                question_repeats={"count": 3})
    extra = len(question_rows(built["train"], categories=["count"], max_turns=12))
    assert extra > 0 and len(heavy) == len(plain) + 2 * extra
    counts, before = answered(heavy), answered(plain)
    categories = {r["question"]: r["category"] for q in built["train"]["questions"] for r in json.loads(q)}
    for text, times in before.items():
        assert counts[text] == times * (3 if categories.get(text) == "count" else 1), text
    # One form of a category: the yes/no spatial questions three times, the choice ones once.
    forms = load_training_pairs(world_path=path, style="detailed", questions=["spatial"], question_turns=12,
                                question_repeats={"spatial:yes_no": 3})
    once = answered(load_training_pairs(world_path=path, style="detailed", questions=["spatial"], question_turns=12))
    kinds = {r["question"]: r["answer_type"] for q in built["train"]["questions"] for r in json.loads(q)}
    assert {kinds.get(text) for text in once} == {"yes_no", "choice", None}  # None: the caption requests
    for text, times in answered(forms).items():
        assert times == once[text] * (3 if kinds.get(text) == "yes_no" else 1), text
    yes_no = question_rows(built["train"], categories=["spatial"], max_turns=12, answer_types=["yes_no"])
    assert {kinds[t] for t in answered(yes_no)} == {"yes_no"}
    # One kind of yes/no spatial pair: those naming two objects of one shape four times, every other question once.
    pairs = {r["question"]: spatial_pair(r) for q in built["train"]["questions"] for r in json.loads(q) if is_spatial_yes_no(r)}
    assert "one_shape" in pairs.values()
    one_shape = load_training_pairs(world_path=path, style="detailed", questions=["spatial"], question_turns=12,
                                    question_repeats={"spatial:yes_no:one_shape": 4})
    for text, times in answered(one_shape).items():
        assert times == once[text] * (4 if pairs.get(text) == "one_shape" else 1), text
    only = answered(question_rows(built["train"], max_turns=1, spatial_pairs=["one_shape"]))
    assert only and all(pairs[t] == "one_shape" for t in only)
    with pytest.raises(ValueError, match="spatial_pairs must name some of"):
        question_rows(built["train"], spatial_pairs=["one_color"])
    for key in ("spatial:choice:one_shape", "spatial:yes_no:one_color", "spatial::one_shape"):
        with pytest.raises(ValueError, match=f"the pair '.*' in '{key}'"):
            load_training_pairs(world_path=path, questions=["spatial"], question_repeats={key: 2})
    with pytest.raises(ValueError, match="answer_types has unknown names \\['which'\\]"):
        question_rows(built["train"], categories=["spatial"], answer_types=["which"])
    with pytest.raises(ValueError, match="the answer type 'which'"):
        load_training_pairs(world_path=path, questions=["spatial"], question_repeats={"spatial:which": 2})
    with pytest.raises(ValueError, match="'spatial', which is not among the questions"):
        load_training_pairs(world_path=path, questions=["color"], question_repeats={"spatial": 2})
    with pytest.raises(ValueError, match="at least 1"):
        load_training_pairs(world_path=path, questions=["color"], question_repeats={"color": 0})
    # The questions of scenes with several objects: every color question of those images three times, once otherwise.
    several = question_rows(built["train"], categories=["color"], max_turns=12, min_objects=2)
    every = question_rows(built["train"], categories=["color"], max_turns=12)
    objects = {row["image_id"]: len(json.loads(row["scene"])["objects"]) for row in built["train"]}
    assert 0 < len(several) < len(every) and all(objects[i] >= 2 for i in several["image_id"])
    assert {i for i in every["image_id"] if objects[i] >= 2} == set(several["image_id"])
    plain = load_training_pairs(world_path=path, style="short", questions=["color"], question_turns=12)
    heavy = load_training_pairs(world_path=path, style="short", questions=["color"], question_turns=12,
                                question_repeats={"color:several": 3})
    assert len(heavy) == len(plain) + 2 * len(several)
    with pytest.raises(ValueError, match="'shape', which is not among the questions"):
        load_training_pairs(world_path=path, questions=["color"], question_repeats={"shape:several": 2})


def test_a_dataset_path_must_be_in_trl_format(tmp_path):
    Dataset.from_dict({"text": ["a red circle"]}).save_to_disk(str(tmp_path / "text"))
    with pytest.raises(ValueError, match=r"lacks \['images', 'messages'\]"):
        load_training_pairs(dataset_path=tmp_path / "text")
    with pytest.raises(ValueError, match="not a folder"):
        load_training_pairs(dataset_path=tmp_path / "missing")


def test_a_llava_file_is_converted_and_its_bad_rows_listed(tmp_path):
    import json

    from PIL import Image

    Image.new("RGB", (32, 32), (255, 0, 0)).save(tmp_path / "red.png")
    rows = [
        {"id": "a", "image": "red.png", "conversations": [
            {"from": "human", "value": "<image>\nDescribe the image."}, {"from": "gpt", "value": "a red square."}]},
        {"id": "b", "image": "gone.png", "conversations": [
            {"from": "human", "value": "<image>\nDescribe the image."}, {"from": "gpt", "value": "a blue circle."}]},
    ]
    (tmp_path / "llava.json").write_text(json.dumps(rows))
    pairs = load_training_pairs(dataset_path=tmp_path / "llava.json", rejects_path=tmp_path / "rejects.jsonl")
    assert len(pairs) == 1
    user, assistant = pairs[0]["messages"]
    assert [c["type"] for c in user["content"]][0] == "image" and assistant["content"][0]["text"] == "a red square."
    (reject,) = [json.loads(line) for line in (tmp_path / "rejects.jsonl").read_text().splitlines()]
    assert reject["id"] == "b" and reject["reason"] == "missing image"


def test_perfect_captions_score_one_and_wrong_ones_zero(world, tiny_parts):
    from model.build import build_vlm

    _, built = world
    _, processor = build_vlm(tiny_parts["siglip"], tiny_parts["llama"])
    test = built["test"]
    perfect = evaluate_captions(CopyingCaptioner(processor.tokenizer, test["caption"]), processor, test, n=5, batch_size=2, max_new_tokens=128)
    assert perfect["caption_match"] == 1.0 and perfect["mention_f1"] == 1.0 and perfect["num_captions"] == 5
    assert perfect["bleu"] == pytest.approx(1.0) and perfect["examples"][0]["prediction"] == test[0]["caption"]

    wrong = evaluate_captions(
        CopyingCaptioner(processor.tokenizer, ["a pink star."] * 5), processor, test, n=3, batch_size=2
    )
    assert wrong["caption_match"] == 0.0 and wrong["mention_precision"] == 0.0 and wrong["num_captions"] == 3
    assert CAPTION_PROMPT == "Describe the image."


def test_spatial_reasoning_answers_the_yes_no_spatial_questions_with_their_reason(world):
    import json

    from align.world import reasoned_answer

    path, built = world
    plain = load_training_pairs(world_path=path, questions=["spatial", "color"], question_turns=12, seed=0)
    reasoned = load_training_pairs(world_path=path, questions=["spatial", "color"], question_turns=12, seed=0,
                                   spatial_reasoning=True)
    records = {r["question"]: r for q in built["train"]["questions"] for r in json.loads(q)}
    assert len(plain) == len(reasoned)
    answers = {}
    for messages in reasoned["messages"]:
        for turn, reply in zip(messages[::2], messages[1::2]):
            question = next(c["text"] for c in turn["content"] if c["type"] == "text")
            if question in records:
                answers[question] = reply["content"][0]["text"]
    yes_no = [q for q, r in records.items() if r["category"] == "spatial" and r["answer_type"] == "yes_no"]
    assert yes_no and all(answers[q] == reasoned_answer(records[q]) for q in yes_no)
    assert all(answers[q] == r["answer"] for q, r in records.items() if q in answers and q not in yes_no)
    with pytest.raises(ValueError, match="shapes world's"):
        load_training_pairs(dataset_path=path, spatial_reasoning=True)
