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

from align.evaluation import load_model_for_eval

logger = logging.getLogger(__name__)

QUESTIONS = {"color": "What color is the {shape}?", "shape": "What shape is the {color} object?"}
VALUES = {
    "color": ("red", "green", "blue", "yellow", "purple", "orange"),
    "shape": ("circle", "square", "triangle"),
}


def single_object_rows(world: datasets.Dataset, limit: int | None) -> list[dict]:
    """The rows of a world split whose scene holds exactly one object, with that object."""
    rows = []
    for row in world:
        objects = json.loads(row["scene"])["objects"]
        if len(objects) == 1:
            rows.append({"image": row["images"][0], "object": objects[0]})
        if limit is not None and len(rows) >= limit:
            break
    return rows


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


def _chat(processor, question: str, answer: str | None = None) -> str:
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]
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
def closed_set_answer(model, processor, question: str, image, values: tuple[str, ...]) -> int:
    """Index of the value whose answer (with the end-of-turn marker) the model finds most likely."""
    texts = [_chat(processor, question, value) for value in values]
    enc = processor(text=texts, images=[[image]] * len(values), return_tensors="pt", padding=True).to(model.device)
    logprobs = torch.log_softmax(model(**enc).logits[:, :-1].float(), dim=-1)
    targets, mask = enc["input_ids"][:, 1:], enc["attention_mask"][:, 1:]
    scores = (logprobs.gather(-1, targets[..., None])[..., 0] * mask).sum(1)
    return int(scores.argmax())


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


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="A VLM folder or an adapter folder.")
    parser.add_argument("--load_in_4bit", action="store_true", help="Load an adapter's base in 4 bit (QLoRA runs).")
    parser.add_argument("--world", default=None, help="Shapes world folder (default: the zoo's).")
    parser.add_argument("--split", default="train", help="World split the images come from.")
    parser.add_argument("--attribute", choices=sorted(QUESTIONS), default="color")
    parser.add_argument("--images", type=int, default=1000, help="Single-object images to use (at most).")
    parser.add_argument("--holdout", type=float, default=0.3, help="Share of the images the probes are scored on.")
    parser.add_argument("--output", default=None, help="Write the figures as JSON here.")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if not 0 < args.holdout < 1:
        parser.error(f"--holdout must be in (0, 1), got {args.holdout}")
    if args.images < 4:
        parser.error(f"--images must be at least 4, got {args.images}")

    from align.zoo import default_cache_dir

    world_path = args.world or str(default_cache_dir() / "world")
    if not Path(world_path).is_dir():
        parser.error(f"--world: {world_path} is not a folder (build the zoo with `python -m align.zoo`)")
    world = datasets.load_from_disk(world_path)
    if args.split not in world:
        parser.error(f"--split: {world_path} has no split {args.split!r} (it has {sorted(world)})")
    quantization = None
    if args.load_in_4bit:
        from transformers import BitsAndBytesConfig

        quantization = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4")
    model, processor = load_model_for_eval(args.model, quantization_config=quantization)
    rows = single_object_rows(world[args.split], args.images)
    result = {"model": args.model, **probe_model(model, processor, rows, args.attribute, args.holdout)}
    print(format_probe(result))
    if args.output:
        Path(args.output).write_text(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
