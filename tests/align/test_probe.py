"""align.probe: the linear probe on a case with a known answer, and the probe command on a tiny VLM."""

import json
import re
from collections import Counter
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from align.probe import (
    CONTEXT_VALUES,
    COUNT_VALUES,
    VALUES,
    context_probe,
    count_rows,
    fit_probe,
    format_context_probe,
    format_readout,
    main,
    multi_object_rows,
    object_patch_features,
    object_probe,
    readout_curve,
    reset_adapters,
    sincos_grid_positions,
    single_object_rows,
    spatial_rows,
    yes_no_winner,
)
from tests.align.training_helpers import tiny_vlm, tiny_world


def test_fit_probe_reads_a_linearly_encoded_label_and_not_noise():
    generator = torch.Generator().manual_seed(0)
    labels = torch.randint(0, 3, (300,), generator=generator)
    features = torch.randn(300, 8, generator=generator)
    features[:, 2] += 4.0 * labels  # the label, linearly readable from one feature among noise
    assert fit_probe(features[:200], labels[:200], features[200:], labels[200:], classes=3) > 0.95
    noise = torch.randn(300, 8, generator=generator)
    assert fit_probe(noise[:200], labels[:200], noise[200:], labels[200:], classes=3) < 0.6


@pytest.fixture(scope="module")
def setup(tiny_parts, tmp_path_factory):
    root = tmp_path_factory.mktemp("probe")
    return {"vlm": tiny_vlm(root / "vlm", tiny_parts["siglip"], tiny_parts["llama"]), "world": tiny_world(root / "world", images=80)}


def test_probe_command_on_a_tiny_vlm(setup, tmp_path, capsys):
    import datasets

    output = tmp_path / "probe.json"
    result = main(["--model", setup["vlm"], "--world", setup["world"], "--images", "40", "--output", str(output)])
    rows = single_object_rows(datasets.load_from_disk(setup["world"])["train"], 40)
    cut = int(len(rows) * 0.7)
    test_labels = [row["object"]["color"] for row in rows[cut:]]
    majority = Counter(row["object"]["color"] for row in rows[:cut]).most_common(1)[0][0]

    assert result["images"] == len(rows) and result["test_images"] == len(rows) - cut
    assert result["majority"] == pytest.approx(test_labels.count(majority) / len(test_labels))
    assert len(result["last_position"]) == 4 + 1  # the tiny Llama's 4 layers, plus the embeddings
    for value in (result["model_answer"], result["tower"], result["visual_tokens"], *result["last_position"]):
        assert 0.0 <= value <= 1.0 and (value * len(test_labels)) == pytest.approx(round(value * len(test_labels)))
    assert json.loads(output.read_text())["attribute"] == "color" and set(VALUES["color"]) >= set(test_labels)
    assert "| probe: last prompt position, after layer 4 |" in capsys.readouterr().out


def test_bad_arguments_are_named(setup):
    with pytest.raises(SystemExit):
        main(["--model", setup["vlm"], "--world", setup["world"], "--split", "nowhere"])
    with pytest.raises(SystemExit):
        main(["--model", setup["vlm"], "--world", setup["world"], "--holdout", "1.5"])


def test_readout_trains_only_the_adapters_and_the_answer_loss_falls(setup):
    import datasets

    from align.loading import load_run

    model, processor = load_run(setup["vlm"])
    rows = single_object_rows(datasets.load_from_disk(setup["world"])["train"], 40)
    snapshot = {name: parameter.detach().clone() for name, parameter in model.named_parameters()}
    result = readout_curve(model, processor, rows, "color", steps=30, eval_every=15, lr=1e-2, batch_size=8)

    changed = {name for name, parameter in model.named_parameters() if not torch.equal(parameter, snapshot[name])}
    assert changed and all(name.startswith("model.projectors.") for name in changed)
    assert [point["step"] for point in result["curve"]] == [0, 15, 30] and result["curve"][0]["loss"] is None
    assert result["curve"][2]["loss"] < result["curve"][1]["loss"]
    tests = result["test_images"]
    assert result["train_images"] + tests == len(rows)
    seen = min(tests, 200)  # the training accuracy is on as many training images as held-out ones
    for point in result["curve"]:
        assert (point["accuracy"] * tests) == pytest.approx(round(point["accuracy"] * tests))
        assert (point["train_accuracy"] * seen) == pytest.approx(round(point["train_accuracy"] * seen))
    assert "| step | held-out accuracy | training accuracy | training loss |" in format_readout(result)
    assert result["trainable_parameters"] == sum(p.numel() for p in model.model.projectors.parameters())
    assert not any(parameter.requires_grad for parameter in model.model.language_model.parameters())


def test_readout_with_llm_lr_trains_the_llm_too_at_its_own_rate(setup):
    import datasets

    from align.loading import load_run

    model, processor = load_run(setup["vlm"])
    rows = single_object_rows(datasets.load_from_disk(setup["world"])["train"], 40)
    snapshot = {name: parameter.detach().clone() for name, parameter in model.named_parameters()}
    result = readout_curve(model, processor, rows, "color", steps=2, eval_every=2, lr=1e-2, batch_size=4, llm_lr=1e-3)
    changed = {name for name, parameter in model.named_parameters() if not torch.equal(parameter, snapshot[name])}
    assert any(name.startswith("model.language_model.") for name in changed)
    assert not any(name.startswith("model.vision_towers.") for name in changed)
    llm = {id(p): p for module in (model.model.language_model, model.lm_head) for p in module.parameters()}
    adapters = sum(p.numel() for p in model.model.projectors.parameters())
    assert result["trainable_parameters"] == adapters + sum(p.numel() for p in llm.values())
    assert result["llm_lr"] == 1e-3 and "adapters and the LLM (LLM lr 0.001)" in format_readout(result)
    assert result["present_guess"] == 1.0  # one object: its color is the only one present


def test_reset_adapters_keeps_the_feature_standardisation(tiny_parts):
    from model import build_vlm

    vlm, _ = build_vlm(tiny_parts["siglip"], tiny_parts["llama"])
    width = vlm.config.vision_configs[0].hidden_size
    vlm.model.projectors.set_feature_statistics(0, torch.full((width,), 0.5), torch.full((width,), 2.0), count=7)
    reset_adapters(vlm)
    mean, std, count = vlm.model.projectors.feature_statistics(0)
    assert count == 7 and torch.all(mean == 0.5) and torch.all(std == 2.0)


def test_reset_adapters_reinitialises_projectors_and_closes_gates(tiny_parts):
    from model import build_vlm

    for fusion in ("prepend", "cross_attention"):
        vlm, _ = build_vlm(tiny_parts["siglip"], tiny_parts["llama"], fusion=fusion, cross_attention_every=2)
        adapters = [vlm.model.projectors] + ([vlm.model.cross_attention] if fusion == "cross_attention" else [])
        with torch.no_grad():
            for module in adapters:
                for parameter in module.parameters():
                    parameter.fill_(0.5)
        llm = {name: p.clone() for name, p in vlm.model.language_model.named_parameters()}
        reset_adapters(vlm)
        is_gate = ("attn_gate", "mlp_gate")
        weights = [p for module in adapters for name, p in module.named_parameters() if not name.endswith(is_gate)]
        assert all(not torch.all(p == 0.5) for p in weights)
        gates = [p for module in adapters for name, p in module.named_parameters() if name.endswith(is_gate)]
        assert (len(gates) > 0) == (fusion == "cross_attention") and all(torch.all(g == 0) for g in gates)
        assert all(torch.equal(p, llm[name]) for name, p in vlm.model.language_model.named_parameters())


def test_readout_command_writes_its_curve(setup, tmp_path, capsys):
    output = tmp_path / "readout.json"
    result = main(["--readout", "--model", setup["vlm"], "--world", setup["world"], "--images", "40", "--steps", "4",
                   "--eval_every", "2", "--reset_projector", "--attribute", "shape", "--output", str(output)])
    assert [point["step"] for point in result["curve"]] == [0, 2, 4] and result["reset"] is True
    assert json.loads(output.read_text())["attribute"] == "shape"
    assert "| 4 |" in capsys.readouterr().out
    for bad in (["--llm", setup["vlm"]], ["--model", setup["vlm"], "--steps", "0"],
                ["--model", setup["vlm"], "--load_in_4bit"], ["--model", setup["vlm"], "--llm_lr", "0"]):
        with pytest.raises(SystemExit):
            main(["--readout", "--world", setup["world"], *bad])


def test_readout_saves_the_vlm_it_trained(setup, tmp_path):
    from align.loading import load_run

    saved = tmp_path / "bound"
    main(["--readout", "--model", setup["vlm"], "--world", setup["world"], "--images", "20", "--steps", "2",
          "--eval_every", "2", "--save_model", str(saved)])
    before, _ = load_run(setup["vlm"])
    after, processor = load_run(str(saved))
    assert processor is not None
    trained = dict(after.named_parameters())
    changed = {name for name, parameter in before.named_parameters() if not torch.equal(parameter, trained[name])}
    assert changed and all(name.startswith("model.projectors.") for name in changed)  # the adapters, nothing else
    with pytest.raises(SystemExit):
        main(["--model", setup["vlm"], "--world", setup["world"], "--save_model", str(tmp_path / "no")])


def test_multi_object_rows_name_an_object_by_its_unique_other_attribute(setup):
    import datasets

    world = datasets.load_from_disk(setup["world"])["train"]
    for attribute, other in (("color", "shape"), ("shape", "color")):
        rows = multi_object_rows(world, None, attribute)
        scenes = [json.loads(scene)["objects"] for scene in world["scene"]]
        eligible = [objs for objs in scenes if len(objs) >= 2 and any(
            sum(o[other] == obj[other] for o in objs) == 1 for obj in objs)]
        assert len(rows) == len(eligible) > 0
        for row, objects in zip(rows, eligible):
            assert row["object"] in objects and sum(o[other] == row["object"][other] for o in objects) == 1
            assert row["objects"] == objects
        assert len(multi_object_rows(world, 3, attribute)) == 3


def test_readout_on_multi_object_scenes(setup, capsys):
    import datasets

    result = main(["--readout", "--model", setup["vlm"], "--world", setup["world"], "--images", "20", "--steps", "2",
                   "--eval_every", "2", "--scenes", "multi"])
    assert result["scenes"] == "multi" and result["train_images"] + result["test_images"] == 20
    held_out = multi_object_rows(datasets.load_from_disk(setup["world"])["train"], 20, "color")[-result["test_images"]:]
    expected = sum(1 / len({o["color"] for o in row["objects"]}) for row in held_out) / len(held_out)
    assert result["present_guess"] == pytest.approx(expected) and 0 < expected < 1
    assert "held-out multi-object images" in capsys.readouterr().out and "values present in the scene" in format_readout(result)
    with pytest.raises(SystemExit):  # the linear probes pool whole images: single-object scenes only
        main(["--model", setup["vlm"], "--world", setup["world"], "--scenes", "multi"])


def test_readout_with_the_question_before_the_image(setup, monkeypatch):
    from align import probe

    rendered = []
    chat = probe._chat
    monkeypatch.setattr(probe, "_chat", lambda *a, **k: rendered.append(chat(*a, **k)) or rendered[-1])
    result = main(["--readout", "--model", setup["vlm"], "--world", setup["world"], "--images", "20", "--steps", "2",
                   "--eval_every", "2", "--scenes", "multi", "--question_first"])
    assert result["question_first"] is True
    # Scored with the question first, as trained (the training turns go through `_user_turn` the same way).
    assert rendered and all(text.index("?") < text.index("<image>") for text in rendered)
    assert probe._user_turn("Q?", question_first=True)["content"] == [{"type": "text", "text": "Q?"}, {"type": "image"}]
    assert probe._user_turn("Q?")["content"] == [{"type": "image"}, {"type": "text", "text": "Q?"}]


class _CopyLM(torch.nn.Module):
    """A language model with a known answer: it predicts, with equal odds, any token already in its context."""

    def __init__(self, vocab_size: int):
        super().__init__()
        self.vocab_size = vocab_size
        self.device = torch.device("cpu")

    def forward(self, input_ids):
        seen = torch.nn.functional.one_hot(input_ids, self.vocab_size).cummax(dim=1).values
        return SimpleNamespace(logits=10.0 * seen.float())


def _word_tokenizer(world):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = {"<pad>", "<s>", "[UNK]"}
    for row in world:
        for text in [row["caption_detailed"], *(f"Question: {r['question']} Answer: {r['answer']}" for r in json.loads(row["questions"]))]:
            words.update(word for word, _ in pre_tokenizers.Whitespace().pre_tokenize_str(text))
    for values in CONTEXT_VALUES.values():
        words.update(values)
    backend = Tokenizer(models.WordLevel({w: i for i, w in enumerate(sorted(words))}, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", bos_token="<s>", unk_token="[UNK]")


def test_context_probe_on_a_model_that_copies_from_its_context(setup):
    import datasets

    world = datasets.load_from_disk(setup["world"])["train"]
    single = world.filter(lambda row: len(json.loads(row["scene"])["objects"]) == 1)
    tokenizer = _word_tokenizer(world)
    result = context_probe(_CopyLM(len(tokenizer)), tokenizer, single)

    colors = [r["answer"] for row in single for r in json.loads(row["questions"]) if r["category"] == "color"]
    assert result["color"]["questions"] == len(colors) > 0
    # With one object, the caption names exactly one color: copying it is right every time.
    assert result["color"]["with_caption"] == 1.0
    # Without the caption no color is in context, every value ties, and the first one ("red") is the answer.
    assert result["color"]["without_caption"] == pytest.approx(colors.count(CONTEXT_VALUES["color"][0]) / len(colors))
    assert result["color"]["majority"] == pytest.approx(Counter(colors).most_common(1)[0][1] / len(colors))
    assert "| color |" in format_context_probe(result)


def test_context_probe_command_on_a_tiny_llm(setup, tiny_parts, tmp_path, capsys):
    import datasets

    output = tmp_path / "context.json"
    result = main(["--llm", tiny_parts["llama"], "--world", setup["world"], "--split", "train", "--images", "6", "--output", str(output)])
    rows = datasets.load_from_disk(setup["world"])["train"].select(range(6))
    records = [r for row in rows for r in json.loads(row["questions"]) if r["answer"] in CONTEXT_VALUES.get(r["category"], ())]
    assert sum(c["questions"] for c in result["categories"].values()) == len(records)
    for category, figures in result["categories"].items():
        answers = [r["answer"] for r in records if r["category"] == category]
        assert figures["majority"] == pytest.approx(Counter(answers).most_common(1)[0][1] / len(answers))
        for key in ("with_caption", "without_caption"):
            assert (figures[key] * len(answers)) == pytest.approx(round(figures[key] * len(answers)))
    assert json.loads(output.read_text())["llm"] == tiny_parts["llama"]
    assert "| category | questions |" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        main(["--llm", str(tmp_path / "missing"), "--world", setup["world"]])


class _PatchEncoder(torch.nn.Module):
    """A known encoder: each patch token is the patch's mean color and a one-hot of its index, after an optional
    class token (as CLIP's), so the object probe's patch lookup and its color read-out can be checked exactly."""

    def __init__(self, image_size=32, patch_size=8, class_token=False):
        super().__init__()
        self.config = SimpleNamespace(image_size=image_size, patch_size=patch_size)
        self.class_token = class_token

    def forward(self, pixel_values):
        patch = self.config.patch_size
        means = torch.nn.functional.avg_pool2d(pixel_values, patch).flatten(2).transpose(1, 2)  # (batch, grid*grid, 3)
        index = torch.eye(means.shape[1]).expand(len(means), -1, -1)
        tokens = torch.cat([means, index], dim=-1)
        if self.class_token:
            tokens = torch.cat([torch.zeros_like(tokens[:, :1]), tokens], dim=1)
        return SimpleNamespace(last_hidden_state=tokens)


@pytest.mark.parametrize("class_token", [False, True])
def test_object_features_come_from_the_patch_inside_each_object(setup, tiny_parts, class_token):
    import datasets
    from transformers import AutoImageProcessor

    from align.world.scene import Scene

    world = datasets.load_from_disk(setup["world"])["train"]
    processor = AutoImageProcessor.from_pretrained(tiny_parts["siglip"])
    features, attributes, image_ids = object_patch_features(_PatchEncoder(class_token=class_token), processor, world, 10)
    expected = [(i, o) for i in range(10) for o in Scene.from_json(world[i]["scene"]).objects]
    assert image_ids.tolist() == [i for i, _ in expected] and attributes["shape"] == [o.shape for _, o in expected]
    for k, (row, (_, obj)) in enumerate(zip(features, expected)):
        x, y = obj.center_pixel  # the tiny world is rendered at the tiny tower's 32 px
        assert row[3:].argmax().item() == (y // 8) * 4 + x // 8
        assert (attributes["column"][k], attributes["row"][k]) == (x // 8, y // 8)


def test_object_probe_reads_what_the_patch_holds_and_nothing_else(setup, tiny_parts):
    import datasets
    from transformers import AutoImageProcessor

    world = datasets.load_from_disk(setup["world"])["train"]
    processor = AutoImageProcessor.from_pretrained(tiny_parts["siglip"])
    result = object_probe(_PatchEncoder(), processor, world, images=80)
    assert result["color"]["probe"] > 0.8 > result["color"]["majority"]  # the patch's mean color names the object's
    # The one-hot of the patch's index says where it is; the mean color does not.
    assert result["column"]["probe"] > 0.9 > result["column"]["majority"]
    assert result["row"]["probe"] > 0.9 > result["row"]["majority"]
    assert result["objects"] > result["scored"] > 0
    for name in ("color", "shape", "size"):
        assert 0.0 < result[name]["majority"] <= 1.0 and 0.0 <= result[name]["probe"] <= 1.0


def test_encoder_probe_command(setup, tiny_parts, tmp_path, capsys):
    output = tmp_path / "encoder.json"
    result = main(["--encoder", tiny_parts["siglip"], "--world", setup["world"], "--images", "60", "--output", str(output)])
    assert set(result) == {"encoder", "trained", "random_init"}
    assert result["trained"]["objects"] == result["random_init"]["objects"] > 0
    for part in ("trained", "random_init"):
        for name in ("color", "shape", "size"):
            figures = result[part][name]
            scored = result[part]["scored"]
            assert (figures["probe"] * scored) == pytest.approx(round(figures["probe"] * scored))
    assert json.loads(output.read_text())["encoder"] == tiny_parts["siglip"]
    assert "| shape |" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        main(["--encoder", str(tmp_path / "missing"), "--world", setup["world"]])
    with pytest.raises(SystemExit):
        main(["--encoder", tiny_parts["siglip"], "--world", setup["world"], "--readout"])


def test_closed_set_answer_scores_each_answer_as_if_alone(setup):
    """The closed-set answer is the value whose answer tokens are most likely after the shared prompt, whatever the
    padding its batch needs: scored one by one, unpadded, the same value wins. (Scoring the whole left-padded
    sequence penalised the shorter answers by the log-probability of `<s>` after a pad token.)"""
    import datasets

    from align.loading import load_run
    from align.probe import _chat, closed_set_answer, closed_set_scores

    model, processor = load_run(setup["vlm"])
    rows = single_object_rows(datasets.load_from_disk(setup["world"])["train"], 6)
    values = VALUES["color"]
    lengths = {len(processor(text=[_chat(processor, "What color is the circle?", v)], images=[[rows[0]["image"]]])["input_ids"][0]) for v in values}
    assert len(lengths) > 1, "the test needs answers of different token lengths, so the batch is padded"
    for row in rows:
        question = f"What color is the {row['object']['shape']}?"
        prompt_length = processor(text=[_chat(processor, question)], images=[[row["image"]]], return_tensors="pt")["input_ids"].shape[1]
        alone = []
        for value in values:
            enc = processor(text=[_chat(processor, question, value)], images=[[row["image"]]], return_tensors="pt")
            with torch.no_grad():
                logprobs = torch.log_softmax(model(**enc).logits[0, prompt_length - 1 : -1].float(), dim=-1)
            alone.append(logprobs.gather(-1, enc["input_ids"][0, prompt_length:, None]).sum().item())
        scores = closed_set_scores(model, processor, question, row["image"], values)
        assert scores.tolist() == pytest.approx(alone, abs=1e-4)
        assert closed_set_answer(model, processor, question, row["image"], values) == max(range(len(values)), key=alone.__getitem__)


def test_the_vlm_path_equals_hand_built_inputs_embeds(setup):
    """A rung of README's ladder, exact: the read-out probe's examples through the processor, TRL's vision collator
    (assistant-only labels) and the VLM's forward give the same loss as the sequence built by hand from the tower's
    output, the projectors and the LLM's own embeddings, `[text before <image>] + visual tokens + [text after]`, with
    the loss on the answer's tokens, fed to the LLM as `inputs_embeds`."""
    import datasets
    from trl.trainer.sft_trainer import DataCollatorForVisionLanguageModeling

    from align.loading import load_run
    from align.probe import _user_turn

    vlm, processor = load_run(setup["vlm"])
    reset_adapters(vlm)
    rows = multi_object_rows(datasets.load_from_disk(setup["world"])["train"], 6, "color")
    examples = [{"images": [r["image"]], "messages": [
        _user_turn(f"What color is the {r['object']['shape']}?"),
        {"role": "assistant", "content": [{"type": "text", "text": r["object"]["color"]}]}]} for r in rows]
    batch = DataCollatorForVisionLanguageModeling(processor, assistant_only_loss=True)(examples)
    with torch.no_grad():
        loss = vlm(**batch).loss

        tokenizer, image = processor.tokenizer, processor.image_token_id
        features = vlm.model.get_vision_features(processor.image_processor([r["image"] for r in rows], return_tensors="pt")["pixel_values"])
        embed = vlm.get_input_embeddings()
        sequences, labels = [], []
        for row, feature in zip(rows, features[0]):
            user = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": f"What color is the {row['object']['shape']}?"}]}]
            full = user + [{"role": "assistant", "content": [{"type": "text", "text": row["object"]["color"]}]}]
            prompt = tokenizer(tokenizer.apply_chat_template(user, tokenize=False, add_generation_prompt=True), add_special_tokens=False)["input_ids"]
            ids = tokenizer(tokenizer.apply_chat_template(full, tokenize=False), add_special_tokens=False)["input_ids"]
            at, visual = ids.index(image), vlm.model.projectors([feature[None]])[0]
            sequences.append(torch.cat([embed(torch.tensor(ids[:at])), visual, embed(torch.tensor(ids[at + 1 :]))]))
            shift = len(visual) - 1
            label = torch.full((len(ids) + shift,), -100)
            # Trained: the answer and the end-of-turn token after it (the template's generation block), not the newline.
            stop = ids.index(tokenizer.eos_token_id, len(prompt)) + 1
            label[len(prompt) - 1 + shift : stop - 1 + shift] = torch.tensor(ids[len(prompt) : stop])
            labels.append(label)
        width = max(len(s) for s in sequences)
        embeds = torch.zeros(len(sequences), width, sequences[0].shape[-1])
        targets = torch.full((len(sequences), width), -100)
        for i, (sequence, label) in enumerate(zip(sequences, labels)):
            embeds[i, : len(sequence)], targets[i, : len(label)] = sequence, label
        logits = vlm.lm_head(vlm.model.language_model(inputs_embeds=embeds).last_hidden_state)
        by_hand = F.cross_entropy(logits.flatten(0, 1), targets.flatten(), ignore_index=-100)
    assert (batch["labels"] != -100).sum() == (targets != -100).sum()
    assert loss.item() == pytest.approx(by_hand.item(), abs=1e-5)


def test_spatial_rows_are_the_worlds_spatial_questions_with_their_closed_sets(setup):
    import datasets

    world = datasets.load_from_disk(setup["world"])["train"]
    records = [r for questions in world["questions"] for r in json.loads(questions) if r["category"] == "spatial"]
    rows = spatial_rows(world, None)
    assert len(rows) == len(records) > 0
    for row, record in zip(rows, records):
        assert row["question"] == record["question"] and row["answer"] == record["answer"]
        assert row["answer"] in row["values"] and len(row["values"]) == 2
        assert row["values"] == (("yes", "no") if record["answer_type"] == "yes_no" else tuple(record["choices"]))
    assert {len(r["values"]) for r in rows} == {2} and len(spatial_rows(world, 3)) == 3
    yes_no, choice = spatial_rows(world, None, "yes_no"), spatial_rows(world, None, "choice")
    assert yes_no and choice and len(yes_no) + len(choice) == len(rows)
    assert {r["values"] for r in yes_no} == {("yes", "no")} and all(r["values"] != ("yes", "no") for r in choice)
    with pytest.raises(ValueError, match="kind must be one of"):
        spatial_rows(world, None, "both")


def test_count_rows_are_the_worlds_count_questions(setup, capsys):
    import datasets

    world = datasets.load_from_disk(setup["world"])["train"]
    records = [r for questions in world["questions"] for r in json.loads(questions) if r["category"] == "count"]
    rows = count_rows(world, None)
    assert len(rows) == len(records) > 0 and len(count_rows(world, 3)) == 3
    for row, record in zip(rows, records):
        assert (row["question"], row["answer"]) == (record["question"], record["answer"])
        assert row["values"] == COUNT_VALUES and row["answer"] in row["values"]
    result = main(["--readout", "--model", setup["vlm"], "--world", setup["world"], "--images", "12", "--steps", "2",
                   "--eval_every", "2", "--scenes", "count"])
    assert result["attribute"] == "count" and result["train_images"] + result["test_images"] == 12
    assert result["chance"] == pytest.approx(1 / len(COUNT_VALUES))
    assert "held-out questions" in capsys.readouterr().out


def test_yes_no_winner_names_the_object_the_relation_favours(setup):
    import datasets

    from align.world.scene import Scene, relation_holds

    world = datasets.load_from_disk(setup["world"])["train"]
    winners = spatial_rows(world, None, "yes_no_winner")
    assert len(winners) == len(spatial_rows(world, None, "yes_no")) > 0
    checked = 0
    for row in world:
        scene = Scene.from_json(row["scene"])
        for record in json.loads(row["questions"]):
            if record["category"] != "spatial" or record["answer_type"] != "yes_no":
                continue
            winner, values = yes_no_winner(record)
            assert values == tuple(f"the {ref}" for ref in re.match(r"Is the (.+) (?:to the left of|to the right of|above|below) the (.+)\?", record["question"]).groups())
            subject, other = (next(o for o in scene.objects if o.id == i) for i in record["objects"])
            holds = relation_holds(subject, other, record["relation"], scene.spatial_px)
            assert winner == values[0 if holds else 1] and (record["answer"] == "yes") == holds
            checked += 1
    assert checked == len(winners)
    assert all(row["answer"] in row["values"] and row["values"] != ("yes", "no") for row in winners)


def test_readout_scored_on_another_worlds_images(setup, tmp_path, capsys):
    import datasets

    from align.world import WorldConfig, build_world
    from tests.align.training_helpers import IMAGE_SIZE

    other = tmp_path / "other"
    build_world(str(other), sizes={"validation": 30}, config=WorldConfig(image_size=IMAGE_SIZE), seed=1)
    result = main(["--readout", "--model", setup["vlm"], "--world", setup["world"], "--images", "12", "--steps", "2",
                   "--eval_every", "2", "--scenes", "spatial", "--spatial_kind", "yes_no_winner",
                   "--eval_split", "validation", "--eval_world", str(other), "--eval_images", "5"])
    # Every training row trains (no tail held out); the held-out rows are the other world's.
    assert result["train_images"] == 12 and result["test_images"] == 5 and result["held_out"] == "given"
    held_out = spatial_rows(datasets.load_from_disk(str(other))["validation"], 5, "yes_no_winner")
    assert result["chance"] == 0.5 and result["majority"] == pytest.approx(
        sum(row["answer"] == Counter(r["answer"] for r in spatial_rows(
            datasets.load_from_disk(setup["world"])["train"], 12, "yes_no_winner")).most_common(1)[0][0]
            for row in held_out) / 5)
    assert "(another split's images)" in capsys.readouterr().out
    for bad in (["--eval_split", "train"], ["--eval_world", str(other)], ["--eval_split", "validation"],
                ["--eval_split", "validation", "--eval_world", str(other), "--eval_images", "0"]):
        with pytest.raises(SystemExit):  # the training split, no split, a split the world lacks, no rows
            main(["--readout", "--model", setup["vlm"], "--world", setup["world"], "--scenes", "spatial", *bad])


def test_sincos_grid_positions_code_row_and_column_apart():
    codes = sincos_grid_positions(4, 16)
    assert codes.shape == (16, 16)
    grid = codes.view(4, 4, 16)
    # The first half of the channels depends on the row only, the second half on the column only.
    assert torch.equal(grid[:, 0, :8], grid[:, 3, :8]) and torch.equal(grid[0, :, 8:], grid[3, :, 8:])
    assert len({tuple(code.tolist()) for code in codes}) == 16  # every place has its own code
    with pytest.raises(ValueError, match="divisible by 4"):
        sincos_grid_positions(4, 10)


def test_readout_with_token_positions_adds_them_for_the_run_only(setup, capsys):
    from align import probe
    from align.loading import load_run

    model, processor = load_run(setup["vlm"])
    features = [torch.randn(2, model.config.vision_patches_after_pool(0), model.config.vision_configs[0].hidden_size)]
    with torch.no_grad():
        before = model.model.project_vision_features(features)
        handle = probe.add_token_positions(model)
        shifted = model.model.project_vision_features(features)
        handle.remove()
    grid = int(model.config.vision_patches_after_pool(0) ** 0.5)
    expected = sincos_grid_positions(grid, model.config.text_config.hidden_size) * 2**0.5
    torch.testing.assert_close(shifted - before, expected.expand_as(before), atol=1e-5, rtol=0)

    result = main(["--readout", "--model", setup["vlm"], "--world", setup["world"], "--images", "20", "--steps", "2",
                   "--eval_every", "2", "--scenes", "spatial", "--token_positions", "sincos"])
    assert result["scenes"] == "spatial" and result["token_positions"] == "sincos" and result["attribute"] == "spatial"
    assert result["train_images"] + result["test_images"] == 20 and "present_guess" not in result
    assert result["chance"] == 0.5  # every spatial question has two answers
    out = capsys.readouterr().out
    assert "held-out questions" in out and "2-D sine-cosine positions" in out
    with pytest.raises(SystemExit):  # a read-out setting
        main(["--model", setup["vlm"], "--world", setup["world"], "--token_positions", "sincos"])
