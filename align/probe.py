"""Where does a VLM lose what the image shows? Linear probes along its path, on the shapes world.

    python -m align.probe --model runs/demo/sft --attribute color
    python -m align.probe --model runs/demo/dpo --load_in_4bit --attribute shape --images 2000

For the world's single-object images, a question about the object's `attribute` ("What color is the circle?") is
put to the model, and a linear classifier (multinomial logistic regression, fit on a share of the images and
scored on the rest) predicts the attribute's value from:

- the vision tower's patch features, mean-pooled (what the encoder knows);
- the projected visual tokens, mean-pooled (what the projector passes on);
- the LLM's hidden state at the last prompt position, after the embeddings and after each decoder layer (what
  reaches the position where the answer's first token is predicted).

Next to them: the model's own answer, the value it gives the highest log-likelihood among the attribute's values,
and the majority baseline. A probe far above the majority at the last position while the model's answer stays at
the majority means the information reaches the answer position but is not read out; a probe at the majority
already on the projected tokens points at the projector. Prints a table and writes it with the figures as JSON
(`--output`).

    python -m align.probe --readout --model runs/demo/stage1-prepend --steps 300 --reset_projector

The read-out probe asks how fast the adapters can learn to answer from the image: only the projectors (and
cross-attention adapters) train, on the attribute question of the single-object training images with the loss on
the answer (TRL's vision collator, as in SFT), the towers and the LLM frozen; every `--eval_every` steps the
closed-set accuracy on the held-out images is measured. `--reset_projector` starts from freshly initialised
projectors (the feature standardisation they keep is a measurement, not a weight), to compare projector designs
on one LLM or LLMs under one projector. `--llm_lr` trains the LLM too, in full at its own learning rate: whether
the whole VLM learns to read the image once the LLM can adapt to visual tokens. `--scenes multi` asks the same
question of scenes with two or more objects, about an object whose other attribute is unique in its scene ("What
color is the circle?" with one circle among several objects): whether the VLM learns to find an object as well
as to read it. `--scenes spatial` asks the world's own spatial questions instead ("Is the red circle left of the
blue square?", "Which is further left, the red circle or the blue square?"; closed sets yes/no and the two named
objects): two objects to find and their places to compare; `--scenes count` the world's count questions ("How many
red objects are there?"; the closed set 0 to 10): how far counting can go on these visual tokens.
`--token_positions sincos` adds a fixed 2-D sine-cosine code of each visual token's row and column in the patch grid
to the projected tokens (MAE's 2-D embedding, at the scale of a unit-variance token), so the visual tokens say where
they are whatever the tower's features keep of it: whether what a spatial question lacks is the place in the tokens
or the comparison in the LLM.

    python -m align.probe --encoder .cache/zoo/siglip

The object probe (`--encoder`): does a vision tower's patch grid say what is where? For every object of the world's
images, the tower's feature at the patch holding a pixel inside the object's shape; a linear probe per attribute
(color, shape, size), fit on the objects of 70% of the images and scored on the others, against the same probe on
a random-init twin of the tower and the majority value. A VLM can only name "the circle" among several objects if
the circle's patches say "circle": an attribute the trained tower encodes no better than its random twin is one no
adapter or LLM downstream can recover.

    python -m align.probe --llm .cache/zoo/llama

The in-context probe (`--llm`): does the text LLM alone answer from the image's detailed caption put before the
question, in its own pretraining format?
"""

from __future__ import annotations

import argparse
import json
import logging
from collections import Counter
from pathlib import Path

import datasets
import torch
import torch.nn.functional as F

from align.loading import load_run
from align.world.geometry import object_patch  # the zoo's SigLIP build imports it from here, too
from align.world.language import yes_no_objects
from align.world.scene import DEFAULT_COLORS, DEFAULT_SHAPES, MAX_OBJECTS

logger = logging.getLogger(__name__)

QUESTIONS = {"color": "What color is the {shape}?", "shape": "What shape is the {color} object?"}
VALUES = {"color": DEFAULT_COLORS, "shape": DEFAULT_SHAPES}
# Closed answer sets of the question categories the in-context probe asks (the default world's values).
CONTEXT_VALUES = {**VALUES, "count": tuple(str(n) for n in range(7)), "existence": ("yes", "no")}


def single_object_rows(world: datasets.Dataset, limit: int | None) -> list[dict]:
    """The rows of a world split whose scene holds exactly one object, with that object."""
    rows = []
    for row in world:
        objects = json.loads(row["scene"])["objects"]
        if len(objects) == 1:
            rows.append({"image": row["images"][0], "object": objects[0], "objects": objects})
        if limit is not None and len(rows) >= limit:
            break
    return rows


def multi_object_rows(world: datasets.Dataset, limit: int | None, attribute: str) -> list[dict]:
    """The rows of a world split whose scene holds two or more objects, each with its first object whose other
    attribute (shape for a color question, color for a shape question) no other object of the scene shares, so
    that `QUESTIONS[attribute]` names it alone; scenes without one are skipped."""
    other = "shape" if attribute == "color" else "color"
    rows = []
    for row in world:
        objects = json.loads(row["scene"])["objects"]
        values = Counter(obj[other] for obj in objects)
        unique = [obj for obj in objects if values[obj[other]] == 1]
        if len(objects) >= 2 and unique:
            rows.append({"image": row["images"][0], "object": unique[0], "objects": objects})
        if limit is not None and len(rows) >= limit:
            break
    return rows


SPATIAL_VALUES = ("yes", "no")


SPATIAL_KINDS = {
    "all": ("yes_no", "choice"), "yes_no": ("yes_no",), "choice": ("choice",), "yes_no_winner": ("yes_no",),
}


def yes_no_winner(record: dict) -> tuple[str, tuple[str, str]]:
    """A yes/no spatial record ("Is the red circle to the left of the blue square?") answered by the object the
    relation favours instead of yes or no: ("the red circle", ("the red circle", "the blue square")) when it holds,
    the other object when it does not (the world asks only when one of the two holds beyond doubt)."""
    subject, other = yes_no_objects(record)
    values = (f"the {subject}", f"the {other}")
    return values[0] if record["answer"] == "yes" else values[1], values


def spatial_rows(world: datasets.Dataset, limit: int | None, kind: str = "all") -> list[dict]:
    """The world's spatial questions of a split, one row per question (at most `limit`): `image`, `question`,
    `answer` and `values`, the closed answer set (yes/no, or the two objects a choice question names).
    `kind` keeps one form only: "yes_no" ("Is the red circle left of the blue square?") or "choice" ("Which is
    further left, the red circle or the blue square?"); "yes_no_winner" asks the yes/no questions but takes the
    object the relation favours as the answer (`yes_no_winner`): the choice form's answer under the yes/no form's
    wording, which tells finding the winner apart from comparing it with the question's subject."""
    if kind not in SPATIAL_KINDS:
        raise ValueError(f"kind must be one of {list(SPATIAL_KINDS)}, got {kind!r}")

    def pick(record: dict) -> tuple[str, tuple[str, ...]] | None:
        if record["category"] != "spatial" or record["answer_type"] not in SPATIAL_KINDS[kind]:
            return None
        if kind == "yes_no_winner":
            return yes_no_winner(record)
        return record["answer"], tuple(record["choices"]) if record["answer_type"] == "choice" else SPATIAL_VALUES

    return _question_rows(world, limit, pick)


# The read-out probe's settings that ask the world's own questions of a category (`--scenes`), not an attribute.
QUESTION_SCENES = ("spatial", "count")
# A count question's closed set: every number of objects a scene can hold.
COUNT_VALUES = tuple(str(number) for number in range(MAX_OBJECTS + 1))


def count_rows(world: datasets.Dataset, limit: int | None) -> list[dict]:
    """The world's count questions of a split ("How many red objects are there?", "How many squares can you see?"),
    one row per question (at most `limit`), as `spatial_rows` gives them; the closed set is `COUNT_VALUES`."""
    return _question_rows(world, limit, lambda r: (r["answer"], COUNT_VALUES) if r["category"] == "count" else None)


def _question_rows(world: datasets.Dataset, limit: int | None, pick) -> list[dict]:
    """One row per question record of `world` that `pick` answers with (answer, closed set), at most `limit`."""
    rows = []
    for row in world:
        for record in json.loads(row["questions"]):
            picked = pick(record)
            if picked is None:
                continue
            answer, values = picked
            rows.append({"image": row["images"][0], "question": record["question"], "answer": answer, "values": values})
            if limit is not None and len(rows) >= limit:
                return rows
    return rows


def _as_questions(rows: list[dict], attribute: str) -> list[dict]:
    """Attribute rows (`single_object_rows`, `multi_object_rows`) as question rows: `question`, `answer`, `values`
    added; rows that already carry them (`spatial_rows`) pass as they are."""
    other = "shape" if attribute == "color" else "color"
    return [
        row if "question" in row else {
            **row, "question": QUESTIONS[attribute].format(**{other: row["object"][other]}),
            "answer": row["object"][attribute], "values": VALUES[attribute],
        }
        for row in rows
    ]


def sincos_grid_positions(grid: int, width: int) -> torch.Tensor:
    """`[grid * grid, width]` fixed 2-D sine-cosine codes (MAE, arXiv:2111.06377): half the channels code the row,
    half the column, each as sines and cosines of `width / 4` frequencies; row-major, as the patch tokens."""
    if width % 4:
        raise ValueError(f"2-D sine-cosine positions need a width divisible by 4, got {width}")
    omega = 1.0 / 10000 ** (torch.arange(width // 4, dtype=torch.float64) / (width // 4))
    angles = torch.arange(grid, dtype=torch.float64)[:, None] * omega[None]
    axis = torch.cat([angles.sin(), angles.cos()], dim=1)  # [grid, width / 2]
    rows = axis[:, None, :].expand(grid, grid, -1)
    columns = axis[None, :, :].expand(grid, grid, -1)
    return torch.cat([rows, columns], dim=-1).reshape(grid * grid, width).float()


def add_token_positions(vlm) -> torch.utils.hooks.RemovableHandle:
    """Add `sincos_grid_positions` of each tower's pooled patch grid to the projected visual tokens (a forward hook
    on the projectors; scaled by sqrt(2), so each channel has unit variance over the grid). Returns the hook's handle."""
    config = vlm.config
    if config.projector == "resampler":
        raise ValueError("--token_positions needs one visual token per patch; the resampler's queries have no grid place")
    width = config.text_config.hidden_size
    codes = []
    for index in range(len(config.vision_configs)):
        patches = config.vision_patches_after_pool(index)
        grid = int(round(patches**0.5))
        codes.append(sincos_grid_positions(grid, width) * 2**0.5)
    positions = torch.cat(codes).to(vlm.device)

    def hook(module, inputs, output):
        return output + positions.to(output.dtype)

    return vlm.model.projectors.register_forward_hook(hook)


def fit_probe(train_x: torch.Tensor, train_y: torch.Tensor, test_x: torch.Tensor, test_y: torch.Tensor,
              classes: int, steps: int = 300, seed: int = 0) -> float:
    """Test accuracy of a multinomial logistic regression fit on standardized `train_x` (full-batch Adam)."""
    torch.manual_seed(seed)
    mean, std = train_x.mean(0), train_x.std(0) + 1e-6
    train_x, test_x = (train_x - mean) / std, (test_x - mean) / std
    probe = torch.nn.Linear(train_x.shape[1], classes)
    optimizer = torch.optim.Adam(probe.parameters(), lr=1e-2, weight_decay=1e-4)
    for _ in range(steps):
        optimizer.zero_grad()
        F.cross_entropy(probe(train_x), train_y).backward()
        optimizer.step()
    with torch.no_grad():
        return (probe(test_x).argmax(-1) == test_y).float().mean().item()


def _user_turn(question: str, question_first: bool = False) -> dict:
    """The user message: the image, then the question (or the question first, which lets the visual tokens attend
    to it in a causal LLM)."""
    content = [{"type": "image"}, {"type": "text", "text": question}]
    return {"role": "user", "content": content[::-1] if question_first else content}


def _chat(processor, question: str, answer: str | None = None, question_first: bool = False) -> str:
    messages = [_user_turn(question, question_first)]
    if answer is None:
        return processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    messages.append({"role": "assistant", "content": [{"type": "text", "text": answer}]})
    return processor.apply_chat_template(messages, tokenize=False)


@torch.no_grad()
def collect(model, processor, rows: list[dict], attribute: str, batch_size: int = 32) -> dict[str, torch.Tensor]:
    """Probe inputs of every row: mean-pooled tower features, mean-pooled visual tokens, and the last prompt
    position's hidden state per layer; plus the model's closed-set answer (index into `VALUES[attribute]`)."""
    vlm = model.get_base_model() if hasattr(model, "get_base_model") else model
    values = VALUES[attribute]
    other = "shape" if attribute == "color" else "color"
    tower, tokens, hidden, answers = [], [], [], []
    for start in range(0, len(rows), batch_size):
        batch = rows[start : start + batch_size]
        questions = [QUESTIONS[attribute].format(**{other: row["object"][other]}) for row in batch]
        images = [[row["image"]] for row in batch]
        enc = processor(text=[_chat(processor, q) for q in questions], images=images, return_tensors="pt", padding=True)
        enc = enc.to(vlm.device)
        features = vlm.model.get_vision_features(enc["pixel_values"])
        tower.append(torch.cat([f.mean(1) for f in features], dim=-1).float().cpu())
        tokens.append(vlm.model.project_vision_features(features).mean(1).float().cpu())
        out = model(**enc, output_hidden_states=True)
        hidden.append(torch.stack([h[:, -1] for h in out.hidden_states], dim=1).float().cpu())
        answers += [closed_set_answer(model, processor, q, row["image"], values) for q, row in zip(questions, batch)]
    return {"tower": torch.cat(tower), "tokens": torch.cat(tokens), "hidden": torch.cat(hidden), "answers": torch.tensor(answers)}


@torch.no_grad()
def closed_set_scores(
    model, processor, question: str, image, values: tuple[str, ...], question_first: bool = False
) -> torch.Tensor:
    """Log-likelihood of each value's answer (with the end-of-turn marker) after the question, `[len(values)]`.

    Only the answer's tokens are scored, after the prompt all candidates share, in a right-padded batch. Summing over
    the whole left-padded sequence instead, as this probe did before, also scored the first real token (`<s>`)
    from a padding position in every candidate that needed padding: a penalty of several nats on the shorter
    answers ("red", "green") that decided many closed-set answers by their length.
    """
    prompt = processor(text=[_chat(processor, question, None, question_first)], images=[[image]], return_tensors="pt")
    start = prompt["input_ids"].shape[1]
    texts = [_chat(processor, question, value, question_first) for value in values]
    enc = processor(
        text=texts, images=[[image]] * len(values), return_tensors="pt", padding=True, padding_side="right"
    ).to(model.device)
    if not bool((enc["input_ids"][:, :start] == prompt["input_ids"].to(model.device)).all()):
        raise ValueError(f"the answers to {question!r} do not tokenize as continuations of its prompt")
    logprobs = torch.log_softmax(model(**enc).logits[:, start - 1 : -1].float(), dim=-1)
    targets, mask = enc["input_ids"][:, start:], enc["attention_mask"][:, start:]
    return (logprobs.gather(-1, targets[..., None])[..., 0] * mask).sum(1).cpu()


def closed_set_answer(
    model, processor, question: str, image, values: tuple[str, ...], question_first: bool = False
) -> int:
    """Index of the value whose answer the model finds most likely (`closed_set_scores`)."""
    return int(closed_set_scores(model, processor, question, image, values, question_first).argmax())


def probe_model(model, processor, rows: list[dict], attribute: str, holdout: float = 0.3, seed: int = 0) -> dict:
    """Probe accuracies along the model's path (see the module docstring), the model's own closed-set accuracy and
    the majority baseline, on the last `holdout` share of `rows`."""
    values = VALUES[attribute]
    labels = torch.tensor([values.index(row["object"][attribute]) for row in rows])
    cut = int(len(rows) * (1 - holdout))
    if cut < 2 or cut >= len(rows):
        raise ValueError(f"need single-object images on both sides of the holdout split, got {len(rows)} images")
    data = collect(model, processor, rows, attribute)
    train_y, test_y = labels[:cut], labels[cut:]

    def probe(x):
        return fit_probe(x[:cut], train_y, x[cut:], test_y, len(values), seed=seed)

    majority = Counter(train_y.tolist()).most_common(1)[0][0]
    result = {
        "attribute": attribute, "images": len(rows), "test_images": len(rows) - cut,
        "majority": (test_y == majority).float().mean().item(),
        "model_answer": (data["answers"][cut:] == test_y).float().mean().item(),
        "tower": probe(data["tower"]), "visual_tokens": probe(data["tokens"]),
        "last_position": [probe(data["hidden"][:, layer]) for layer in range(data["hidden"].shape[1])],
    }
    return result


OBJECT_ATTRIBUTES = ("color", "shape", "size")
# Where the object is: the column and row of its patch in the tower's grid. A spatial question ("Is the circle left
# of the square?") needs both objects' places from their patches; what a patch's feature says of its own place is
# what the VLM can read of it beyond the order of its visual tokens.
POSITION_ATTRIBUTES = ("column", "row")


@torch.no_grad()
def object_patch_features(encoder, image_processor, world: datasets.Dataset, images: int, batch_size: int = 64):
    """For every object of the first `images` images, the tower's output feature (`last_hidden_state`, what a VLM
    takes by default) at the patch holding a pixel inside the object's shape, with the object's attributes and the
    index of its image, and the column and row of that patch (`POSITION_ATTRIBUTES`). Patch tokens are the last
    grid*grid positions (a CLIP tower's class token comes first)."""
    from align.world.scene import Scene

    encoder.eval()
    size, patch = encoder.config.image_size, encoder.config.patch_size
    grid = size // patch
    features, attributes, image_ids = [], {a: [] for a in OBJECT_ATTRIBUTES + POSITION_ATTRIBUTES}, []
    rows = world.select(range(min(images, len(world))))
    for start in range(0, len(rows), batch_size):
        chunk = rows[start : start + batch_size]
        pixels = image_processor(images=[im[0].convert("RGB") for im in chunk["images"]], return_tensors="pt")
        hidden = encoder(pixel_values=pixels["pixel_values"]).last_hidden_state
        hidden = hidden[:, hidden.shape[1] - grid * grid :]
        for b, scene_json in enumerate(chunk["scene"]):
            scene = Scene.from_json(scene_json)
            for obj in scene.objects:
                index = object_patch(obj, scene.image_size, size, patch)
                features.append(hidden[b, index])
                for a in OBJECT_ATTRIBUTES:
                    attributes[a].append(getattr(obj, a))
                attributes["row"].append(index // grid)
                attributes["column"].append(index % grid)
                image_ids.append(start + b)
    if not features:
        raise ValueError("the world split has no objects to probe")
    return torch.stack(features), attributes, torch.tensor(image_ids)


def object_probe(encoder, image_processor, world: datasets.Dataset, images: int = 1000, holdout: float = 0.3,
                 seed: int = 0) -> dict:
    """Held-out accuracy of a linear probe per object attribute on the tower's patch features (`--encoder`), with
    the majority value of the scored objects; fit on the objects of the first images, scored on the rest."""
    features, attributes, image_ids = object_patch_features(encoder, image_processor, world, images)
    cut = int(round((1 - holdout) * (int(image_ids.max()) + 1)))
    train, test = image_ids < cut, image_ids >= cut
    if not train.any() or not test.any():
        raise ValueError(f"{images} images leave no objects on one side of the {holdout} hold-out; use more images")
    result = {"objects": len(image_ids), "scored": int(test.sum())}
    for name, values in attributes.items():
        classes = sorted(set(values))
        labels = torch.tensor([classes.index(v) for v in values])
        majority = labels[test].bincount(minlength=len(classes)).max().item() / int(test.sum())
        accuracy = fit_probe(features[train], labels[train], features[test], labels[test], len(classes), seed=seed)
        result[name] = {"probe": accuracy, "majority": majority}
    return result


def encoder_object_probe(path: str, world: datasets.Dataset, images: int = 1000, holdout: float = 0.3) -> dict:
    """The object probe on the tower saved at `path` and on a random-init twin of it (same config, seed 0)."""
    from transformers import AutoImageProcessor, AutoModel

    encoder = AutoModel.from_pretrained(path)
    image_processor = AutoImageProcessor.from_pretrained(path)
    torch.manual_seed(0)
    twin = AutoModel.from_config(encoder.config)
    return {
        "encoder": path,
        "trained": object_probe(encoder, image_processor, world, images, holdout),
        "random_init": object_probe(twin, image_processor, world, images, holdout),
    }


def format_object_probe(result: dict) -> str:
    trained, random_init = result["trained"], result["random_init"]
    lines = [
        f"objects: {trained['objects']}, scored on {trained['scored']} (those of the held-out images)",
        "",
        "| attribute, from the object's patch | majority | trained tower | random-init twin |",
        "|---|---:|---:|---:|",
    ]
    for name in OBJECT_ATTRIBUTES + POSITION_ATTRIBUTES:
        lines.append(f"| {name} | {trained[name]['majority']:.1%} | {trained[name]['probe']:.1%} "
                     f"| {random_init[name]['probe']:.1%} |")
    return "\n".join(lines)


def format_probe(result: dict) -> str:
    lines = [
        f"| {result['attribute']} of single-object images ({result['test_images']} held out) | accuracy |",
        "|---|---:|",
        f"| majority value | {result['majority']:.1%} |",
        f"| the model's answer (most likely value) | {result['model_answer']:.1%} |",
        f"| probe: vision tower, mean-pooled | {result['tower']:.1%} |",
        f"| probe: visual tokens, mean-pooled | {result['visual_tokens']:.1%} |",
    ]
    for layer, accuracy in enumerate(result["last_position"]):
        where = "embeddings" if layer == 0 else f"after layer {layer}"
        lines.append(f"| probe: last prompt position, {where} | {accuracy:.1%} |")
    return "\n".join(lines)


def context_prompt(question: str, caption: str | None) -> str:
    """A question in the LLM's pretraining format (`align.world.dataset.text_corpus`), after the caption if given."""
    return (f"{caption}\n" if caption else "") + f"Question: {question} Answer:"


@torch.no_grad()
def closed_set_text_answers(lm, tokenizer, items: list[tuple[str, tuple[str, ...]]]) -> list[int]:
    """For each `(prompt, values)`: the index of the value the LLM finds most likely after the prompt (as " value",
    the pretraining spelling). One right-padded batch holds every prompt-value pair."""
    prefix = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    rows, spans = [], []
    for prompt, values in items:
        prompt_ids = prefix + tokenizer(prompt, add_special_tokens=False)["input_ids"]
        for value in values:
            candidate = tokenizer(" " + value, add_special_tokens=False)["input_ids"]
            rows.append(prompt_ids + candidate)
            spans.append((len(prompt_ids), candidate))
    width = max(map(len, rows))
    ids = torch.tensor([row + [pad] * (width - len(row)) for row in rows], device=lm.device)
    logprobs = torch.log_softmax(lm(input_ids=ids).logits.float(), dim=-1)
    device = logprobs.device
    scores = [
        logprobs[i, torch.arange(start - 1, start - 1 + len(candidate), device=device), torch.tensor(candidate, device=device)]
        .sum().item()
        for i, (start, candidate) in enumerate(spans)
    ]
    answers, offset = [], 0
    for _, values in items:
        chunk = scores[offset : offset + len(values)]
        answers.append(max(range(len(values)), key=chunk.__getitem__))
        offset += len(values)
    return answers


def context_probe(lm, tokenizer, world: datasets.Dataset, images: int | None = None) -> dict:
    """Per category of `CONTEXT_VALUES`: the LLM's closed-set accuracy on the questions of `world`'s first `images`
    images with the detailed caption before the question and without it, and the majority answer's accuracy."""
    outcomes: dict[str, dict[str, list]] = {}
    rows = world if images is None else world.select(range(min(images, len(world))))
    for row in rows:
        records = [r for r in json.loads(row["questions"]) if r["answer"] in CONTEXT_VALUES.get(r["category"], ())]
        if not records:
            continue
        items = [
            (context_prompt(r["question"], caption), CONTEXT_VALUES[r["category"]])
            for caption in (row["caption_detailed"], None) for r in records
        ]
        answers = closed_set_text_answers(lm, tokenizer, items)
        for i, record in enumerate(records):
            values = CONTEXT_VALUES[record["category"]]
            entry = outcomes.setdefault(record["category"], {"answers": [], "with": [], "without": []})
            entry["answers"].append(record["answer"])
            entry["with"].append(values[answers[i]] == record["answer"])
            entry["without"].append(values[answers[len(records) + i]] == record["answer"])
    if not outcomes:
        raise ValueError(f"no questions of the categories {sorted(CONTEXT_VALUES)} in the given images")
    result = {}
    for category, entry in outcomes.items():
        n = len(entry["answers"])
        result[category] = {
            "questions": n,
            "majority": Counter(entry["answers"]).most_common(1)[0][1] / n,
            "without_caption": sum(entry["without"]) / n,
            "with_caption": sum(entry["with"]) / n,
        }
    return result


def format_context_probe(result: dict) -> str:
    lines = [
        "| category | questions | majority answer | LLM, question only | LLM, caption + question |",
        "|---|---:|---:|---:|---:|",
    ]
    for category, r in result.items():
        lines.append(
            f"| {category} | {r['questions']} | {r['majority']:.1%} | {r['without_caption']:.1%} | {r['with_caption']:.1%} |"
        )
    return "\n".join(lines)


def _adapter_modules(vlm) -> list[torch.nn.Module]:
    """The projectors, and the cross-attention adapters of a cross-attention VLM."""
    return [module for module in (vlm.model.projectors, getattr(vlm.model, "cross_attention", None)) if module is not None]


def reset_adapters(vlm) -> None:
    """Initialise a VLM's projectors and cross-attention adapters afresh, as `build_vlm` does (the model's own
    `_init_weights`; cross-attention gates closed again); the projectors' feature standardisation is kept."""
    statistics = {k: v.clone() for k, v in vlm.model.projectors.state_dict().items() if k.startswith("feature_")}
    for module in _adapter_modules(vlm):
        for submodule in module.modules():
            # Loaded weights are marked initialised, and transformers' init functions skip those.
            submodule._is_hf_initialized = False
            for parameter in submodule.parameters(recurse=False):
                parameter._is_hf_initialized = False
            vlm._init_weights(submodule)
    vlm.model.projectors.load_state_dict(statistics, strict=False)


def readout_curve(
    vlm, processor, rows: list[dict], attribute: str, steps: int = 300, eval_every: int = 100, lr: float = 1e-3,
    batch_size: int = 16, holdout: float = 0.3, seed: int = 0, reset: bool = False, llm_lr: float | None = None,
    scenes: str = "single", question_first: bool = False, token_positions: str = "none",
    held_out: list[dict] | None = None,
) -> dict:
    """Train only the adapters of `vlm` to answer the `attribute` question of the first `1 - holdout` share of
    `rows` (`single_object_rows`, or `multi_object_rows` with `scenes="multi"`: named in the result; or rows that
    carry their own `question`, `answer` and closed set `values`: `spatial_rows` with `scenes="spatial"`, `count_rows`
    with `scenes="count"`), and measure the closed-set accuracy on the rest every `eval_every` steps.
    `token_positions="sincos"` adds `add_token_positions` to the visual tokens for the whole run (the hook is removed
    at the end).
    With `held_out` (rows of the same kind, e.g. from another split or another world), the probe trains on every
    row of `rows` and is scored on `held_out`, images it has never seen, instead (`holdout` is then unused).
    With `llm_lr`, the LLM (decoder and head) trains too, in full at that learning rate: whether the whole VLM
    learns to read the image when the LLM can adapt to the visual tokens.

    Returns:
        `attribute`, `train_images`, `test_images`, `majority` (the training majority's share of the held-out
        answers), `trainable_parameters`, `reset`, and `curve`: `[{"step", "accuracy", "train_accuracy", "loss"}]`
        from step 0, where `train_accuracy` is measured on as many training images as held-out ones (at most 200)
        and `loss` is the mean training loss since the previous point (None at step 0).
    """
    from trl.chat_template_utils import get_training_chat_template, has_generation_markers
    from trl.trainer.sft_trainer import DataCollatorForVisionLanguageModeling

    if steps < 1 or eval_every < 1 or batch_size < 1:
        raise ValueError(f"steps, eval_every and batch_size must be positive, got {steps}, {eval_every}, {batch_size}")
    if token_positions not in ("none", "sincos"):
        raise ValueError(f"token_positions must be 'none' or 'sincos', got {token_positions!r}")
    rows = _as_questions(rows, attribute)
    if held_out is not None:
        train, test = rows, _as_questions(held_out, attribute)
        if len(train) < 2 or not test:
            raise ValueError(f"need at least 2 training rows and 1 held-out row, got {len(train)} and {len(test)}")
    else:
        cut = int(len(rows) * (1 - holdout))
        if cut < 2 or cut >= len(rows):
            raise ValueError(f"need {scenes}-object images on both sides of the holdout split, got {len(rows)} images")
        train, test = rows[:cut], rows[cut:]
    torch.manual_seed(seed)
    if reset:
        reset_adapters(vlm)
    vlm.requires_grad_(False)
    parameters = [parameter for module in _adapter_modules(vlm) for parameter in module.parameters()]
    groups = [{"params": parameters, "lr": lr}]
    if llm_lr is not None:
        llm = [parameter for module in (vlm.model.language_model, vlm.lm_head) for parameter in module.parameters()]
        groups.append({"params": list({id(p): p for p in llm}.values()), "lr": llm_lr})  # a tied head once
    for group in groups:
        for parameter in group["params"]:
            parameter.requires_grad_(True)
    optimizer = torch.optim.AdamW(groups, lr=lr, weight_decay=0.0)
    # The SFT recipe's masking: TRL's collator with the loss on the assistant turn only.
    template = None if has_generation_markers(processor.chat_template) else get_training_chat_template(processor)
    collator = DataCollatorForVisionLanguageModeling(processor, assistant_only_loss=True, chat_template=template)
    order = torch.Generator().manual_seed(seed)

    # As many training images as held-out ones (at most 200), scored the same way: a training accuracy far above
    # the held-out one means the probe memorises its training scenes rather than learning to read.
    seen = train[: min(len(test), 200)]

    def accuracy(rows: list[dict]) -> float:
        vlm.eval()
        right = sum(
            row["values"][closed_set_answer(vlm, processor, row["question"], row["image"], row["values"], question_first)]
            == row["answer"]
            for row in rows
        )
        return right / len(rows)

    handle = add_token_positions(vlm) if token_positions == "sincos" else None
    majority = Counter(row["answer"] for row in train).most_common(1)[0][0]
    curve, losses = [{"step": 0, "accuracy": accuracy(test), "train_accuracy": accuracy(seen), "loss": None}], []
    for step in range(1, steps + 1):
        vlm.train()
        picks = torch.randint(len(train), (batch_size,), generator=order).tolist()
        examples = [
            {"images": [train[i]["image"]], "messages": [
                _user_turn(train[i]["question"], question_first),
                {"role": "assistant", "content": [{"type": "text", "text": train[i]["answer"]}]},
            ]}
            for i in picks
        ]
        batch = collator(examples).to(vlm.device)
        loss = vlm(**batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
        if step % eval_every == 0 or step == steps:
            curve.append({"step": step, "accuracy": accuracy(test), "train_accuracy": accuracy(seen),
                          "loss": sum(losses) / len(losses)})
            logger.info("read-out step %d: held-out accuracy %.3f, training accuracy %.3f, loss %.3f", step,
                        curve[-1]["accuracy"], curve[-1]["train_accuracy"], curve[-1]["loss"])
            losses = []
    vlm.eval()
    if handle is not None:
        handle.remove()
    result = {
        "attribute": attribute, "train_images": len(train), "test_images": len(test),
        "majority": sum(row["answer"] == majority for row in test) / len(test),
        # A uniform guess among each question's closed set (50% for the two-way spatial questions).
        "chance": sum(1 / len(row["values"]) for row in test) / len(test),
        "trainable_parameters": sum(p.numel() for group in groups for p in group["params"]), "reset": reset,
        "llm_lr": llm_lr, "standardized": bool(vlm.model.projectors.standardized), "scenes": scenes,
        "question_first": question_first, "token_positions": token_positions,
        "held_out": "given" if held_out is not None else "tail", "curve": curve,
    }
    if all("objects" in row for row in test):
        # A guess made uniformly among the attribute's values present in the scene: what seeing the image without
        # finding the named object gets (100% for single-object scenes).
        result["present_guess"] = sum(1 / len({obj[attribute] for obj in row["objects"]}) for row in test) / len(test)
    return result



def format_readout(result: dict) -> str:
    what = "adapters only" if result.get("llm_lr") is None else f"adapters and the LLM (LLM lr {result['llm_lr']:g})"
    standardized = {True: "standardised features", False: "raw features"}.get(result.get("standardized"), "")
    lines = [
        f"Read-out probe: {result['attribute']}, {what} ({result['trainable_parameters']:,} parameters"
        f"{', freshly initialised' if result['reset'] else ''}; {standardized}"
        f"{'; 2-D sine-cosine positions on the visual tokens' if result.get('token_positions') == 'sincos' else ''}), "
        f"{result['train_images']} training / {result['test_images']} held-out "
        + ("(another split's images) " if result.get("held_out") == "given" else "")
        + ("questions" if result.get("scenes") in QUESTION_SCENES else f"{result.get('scenes', 'single')}-object images")
        + f"; majority {result['majority']:.1%}"
        + (f"; chance {result['chance']:.1%}" if "chance" in result else "")
        + (f"; a guess among the values present in the scene {result['present_guess']:.1%}" if "present_guess" in result else ""),
        "",
        "| step | held-out accuracy | training accuracy | training loss |",
        "|---:|---:|---:|---:|",
    ]
    for point in result["curve"]:
        loss = "" if point["loss"] is None else f"{point['loss']:.3f}"
        seen = "" if point.get("train_accuracy") is None else f"{point['train_accuracy']:.1%}"
        lines.append(f"| {point['step']} | {point['accuracy']:.1%} | {seen} | {loss} |")
    return "\n".join(lines)


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    target = parser.add_mutually_exclusive_group(required=True)
    target.add_argument("--model", help="A VLM folder or an adapter folder: the probes along its path.")
    target.add_argument("--llm", help="An LLM folder with its tokenizer: does it answer from a caption in context?")
    target.add_argument("--encoder", help="A vision tower folder (SigLIP, CLIP): does its patch grid say what is where?")
    parser.add_argument("--load_in_4bit", action="store_true", help="Load an adapter's base in 4 bit (QLoRA runs).")
    parser.add_argument("--world", default=None, help="Shapes world folder (default: the zoo's).")
    parser.add_argument("--split", default=None, help="World split the images come from (default: train; test for --llm).")
    parser.add_argument("--attribute", choices=sorted(QUESTIONS), default="color")
    parser.add_argument("--images", type=int, default=None,
                        help="Images to use, at most (default: 1000 single-object images; 300 images for --llm; "
                        "the first 1000 images for --encoder).")
    parser.add_argument("--holdout", type=float, default=0.3, help="Share of the images the probes are scored on.")
    parser.add_argument("--output", default=None, help="Write the figures as JSON here.")
    readout = parser.add_argument_group("read-out probe (--readout): train the adapters, measure the accuracy")
    readout.add_argument("--readout", action="store_true", help="Run the read-out probe instead of the linear probes.")
    readout.add_argument("--steps", type=int, default=300, help="Training steps of the read-out probe.")
    readout.add_argument("--eval_every", type=int, default=100, help="Measure the held-out accuracy every N steps.")
    readout.add_argument("--lr", type=float, default=1e-3, help="AdamW learning rate of the adapters.")
    readout.add_argument("--batch_size", type=int, default=16, help="Questions per training step.")
    readout.add_argument("--reset_projector", action="store_true",
                         help="Start from freshly initialised projectors (and closed cross-attention adapters).")
    readout.add_argument("--llm_lr", type=float, default=None,
                         help="Train the LLM too (in full) at this learning rate; by default it stays frozen.")
    readout.add_argument("--seed", type=int, default=0, help="Seed of the initialisation and the batches.")
    readout.add_argument("--scenes", choices=("single", "multi", *QUESTION_SCENES), default="single",
                         help="Ask about the object of single-object images, about an object named by a unique "
                         "attribute in scenes of two or more (multi_object_rows), or the world's spatial or count "
                         "questions (spatial_rows, count_rows; --attribute is then unused and --images counts questions).")
    readout.add_argument("--spatial_kind", choices=tuple(SPATIAL_KINDS), default="all",
                         help="With --scenes spatial: every spatial question, or only the yes/no ones or only the "
                         "choice ones (which of two named objects is further left, higher, ...).")
    readout.add_argument("--token_positions", choices=("none", "sincos"), default="none",
                         help="Add fixed 2-D sine-cosine codes of each visual token's row and column to the projected "
                         "tokens (add_token_positions).")
    readout.add_argument("--question_first", action="store_true",
                         help="Put the question before the image in the user turn, so the visual tokens can attend "
                         "to it (the LLM is causal), instead of after it.")
    readout.add_argument("--eval_split", default=None,
                         help="Score the probe on this split's questions (images no training row shows) and train on "
                         "every row of --split, instead of holding out the last --holdout share of --split.")
    readout.add_argument("--eval_world", default=None,
                         help="The world folder --eval_split is read from (default: --world), e.g. one generated "
                         "with another seed by `python -m align.world`.")
    readout.add_argument("--eval_images", type=int, default=None,
                         help="Held-out rows taken from --eval_split, at most (default: as many as --images allows).")
    readout.add_argument("--save_model", default=None,
                         help="Write the VLM the read-out probe trained here (model and processor), for the recipes "
                              "(evaluate, sft) to take up: the probe's binding as a pretraining step of its own.")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if not 0 < args.holdout < 1:
        parser.error(f"--holdout must be in (0, 1), got {args.holdout}")
    if args.images is not None and args.images < 4:
        parser.error(f"--images must be at least 4, got {args.images}")
    if args.llm_lr is not None and (not args.readout or args.llm_lr <= 0):
        parser.error(f"--llm_lr needs --readout and a positive value, got {args.llm_lr}")
    if args.readout and (args.llm or args.encoder or args.load_in_4bit):
        parser.error("--readout trains a full VLM's adapters: give --model a VLM folder (not --llm or --encoder, no --load_in_4bit)")
    if args.spatial_kind != "all" and args.scenes != "spatial":
        parser.error("--spatial_kind picks among spatial questions: it needs --scenes spatial")
    if (args.scenes != "single" or args.token_positions != "none") and not args.readout:
        parser.error("--scenes multi/spatial/count and --token_positions are read-out probe settings (with --readout)")
    for name in ("steps", "eval_every", "batch_size"):
        if getattr(args, name) < 1:
            parser.error(f"--{name} must be positive, got {getattr(args, name)}")
    split = args.split or ("test" if args.llm else "train")
    if (args.eval_world or args.eval_images) and not args.eval_split:
        parser.error("--eval_world and --eval_images choose the held-out rows of --eval_split: give --eval_split")
    if args.eval_split and not args.readout:
        parser.error("--eval_split scores the read-out probe: it needs --readout")
    if args.save_model and not args.readout:
        parser.error("--save_model writes the VLM the read-out probe trained: it needs --readout")
    if args.eval_images is not None and args.eval_images < 1:
        parser.error(f"--eval_images must be positive, got {args.eval_images}")
    if args.eval_split and args.eval_world is None and args.eval_split == split:
        parser.error(f"--eval_split {args.eval_split} is the training split: the held-out images would be trained on")

    from align.data.world import open_world

    try:
        world = {split: open_world(args.world, split, hint="set --world")}
        held_out_world = None if not args.eval_split else open_world(
            args.eval_world or args.world, args.eval_split, hint="set --eval_world" if args.eval_world else "set --world")
    except ValueError as error:
        parser.error(str(error))
    if args.llm:
        return _main_llm(args, world[split])
    if args.encoder:
        if not Path(args.encoder).is_dir():
            parser.error(f"--encoder: {args.encoder} is not a folder (a vision tower saved with save_pretrained)")
        result = encoder_object_probe(args.encoder, world[split], args.images or 1000, args.holdout)
        print(format_object_probe(result))
        if args.output:
            Path(args.output).write_text(json.dumps(result, indent=2))
        return result
    quantization = None
    if args.load_in_4bit:
        from transformers import BitsAndBytesConfig

        quantization = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4")
    model, processor = load_run(args.model, quantization_config=quantization)
    attribute = args.scenes if args.scenes in QUESTION_SCENES else args.attribute

    def question_rows(source: datasets.Dataset, limit: int) -> list[dict]:
        if args.scenes == "spatial":
            return spatial_rows(source, limit, args.spatial_kind)
        if args.scenes == "count":
            return count_rows(source, limit)
        if args.scenes == "multi":
            return multi_object_rows(source, limit, args.attribute)
        return single_object_rows(source, limit)

    rows = question_rows(world[split], args.images or 1000)
    held_out = None if held_out_world is None else question_rows(held_out_world, args.eval_images or args.images or 1000)
    if args.readout:
        if hasattr(model, "peft_config"):
            raise SystemExit(f"--readout: {args.model} is an adapter; give a full VLM folder (a stage-1 output or a "
                             "merged export), whose projectors train")
        result = {"model": args.model, **readout_curve(
            model, processor, rows, attribute, steps=args.steps, eval_every=args.eval_every, lr=args.lr,
            batch_size=args.batch_size, holdout=args.holdout, seed=args.seed, reset=args.reset_projector,
            llm_lr=args.llm_lr, scenes=args.scenes, question_first=args.question_first,
            token_positions=args.token_positions, held_out=held_out,
        )}
        print(format_readout(result))
        if args.save_model:
            model.save_pretrained(args.save_model)
            processor.save_pretrained(args.save_model)
            logger.info("wrote the trained VLM and its processor to %s", args.save_model)
    else:
        result = {"model": args.model, **probe_model(model, processor, rows, args.attribute, args.holdout)}
        print(format_probe(result))
    if args.output:
        Path(args.output).write_text(json.dumps(result, indent=2))
    return result


def _main_llm(args, world: datasets.Dataset) -> dict:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if not Path(args.llm).is_dir():
        raise SystemExit(f"--llm: {args.llm} is not a folder (an LLM saved with save_pretrained, with its tokenizer)")
    tokenizer = AutoTokenizer.from_pretrained(args.llm)
    lm = AutoModelForCausalLM.from_pretrained(args.llm).eval()
    result = {"llm": args.llm, "categories": context_probe(lm, tokenizer, world, args.images or 300)}
    print(format_context_probe(result["categories"]))
    if args.output:
        Path(args.output).write_text(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
