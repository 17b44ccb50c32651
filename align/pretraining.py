"""Adapter pretraining's arguments (`recipes/pretrain.py`): which VLM a run builds or loads, what trains, the data
and the vision-feature cache; the training knobs are TRL's `SFTConfig`. The work itself is `model.pretrain`
(stages, feature cache, standardisation) on the pairs of `align.captioning`; the class lives here, in the library
beside the data it configures, so the recipe stays as thin as the others.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from align.captioning import CAPTION_STYLES, split_repeat_key
from align.data.world import open_world
from align.runs import RunArguments
from align.world import CATEGORIES
from model import FUSIONS, PROJECTORS, STAGES
from model.pretrain import FEATURE_CACHE_MODES, towers_frozen
from model.prune.calibration import read_calibration_texts


@dataclass
class PretrainScriptArguments(RunArguments):
    """Model building, data and feature-cache knobs of adapter pretraining (training knobs are `SFTConfig`'s)."""

    vision: list[str] | None = field(
        default=None,
        metadata={"help": "Path(s) of the vision tower(s) to build a new VLM from (unused with model_name_or_path).",
                  "nargs": "+"},
    )
    text: str | None = field(
        default=None, metadata={"help": "Path of the causal LLM to build a new VLM from (unused with model_name_or_path)."}
    )
    fusion: str = field(default="prepend", metadata={"help": f"How images reach the LLM: {sorted(FUSIONS)}."})
    projector: str = field(default="mlp", metadata={"help": f"Projector of a new VLM: {sorted(PROJECTORS)}."})
    projector_depth: int = field(default=2, metadata={"help": "Blocks of the attention and resampler projectors."})
    projector_queries: int = field(default=16, metadata={"help": "Visual tokens per image of the resampler projector."})
    pool: int = field(default=1, metadata={"help": "Average-pool the patch grid by this factor per side."})
    cross_attention_every: int = field(
        default=4, metadata={"help": "One cross-attention adapter every this many decoder layers."}
    )
    vision_feature_layer: int = field(default=-1, metadata={"help": "Hidden state of the towers that is projected."})
    stage: str = field(default="align", metadata={"help": f"What trains: {sorted(STAGES)} (see model.stages)."})
    standardize_features: bool = field(
        default=True,
        metadata={
            "help": "Before training, fit the projectors' input standardisation (per-channel mean and std of the "
            "towers' features) on the training images, when the VLM has none yet (a VLM loaded from an earlier "
            "stage keeps the one its projectors were trained with)."
        },
    )
    standardize_images: int = field(
        default=2048, metadata={"help": "Distinct training images the feature standardisation is measured on."}
    )
    use_feature_cache: str = field(
        default="auto",
        metadata={
            "help": "Train on cached vision features: 'auto' whenever the stage freezes the towers (pixels "
            "otherwise), 'true' to require it (an error for a stage that trains the towers), 'false' for pixels.",
            "choices": list(FEATURE_CACHE_MODES),
        },
    )
    feature_cache_dir: str | None = field(
        default=None,
        metadata={"help": "Root folder of the feature cache, shared between runs (default: <output_dir>/feature_cache)."},
    )
    world_path: str | None = field(
        default=None, metadata={"help": "The shapes world (default: the zoo's, .cache/zoo/world)."}
    )
    dataset_path: str | None = field(
        default=None,
        metadata={"help": "Image-caption data to train on instead of the world's captions: a save_to_disk dataset "
                  "in TRL's internal format (images + messages), or a TRL JSON/JSONL, LLaVA-Instruct or ShareGPT file "
                  "(converted on load; refused rows in rejects_conversion.jsonl)."},
    )
    dataset_split: str = field(default="train", metadata={"help": "Split of the world or dataset to train on."})
    train_samples: int | None = field(default=None, metadata={"help": "Train on the first N rows only (of the world: its first N images)."})
    caption_style: str = field(
        default="short", metadata={"help": f"World captions to train on: {list(CAPTION_STYLES)}."}
    )
    world_questions: list[str] = field(
        default_factory=list,
        metadata={"help": "Grounded pretraining: also train on every question of these world categories about the same "
                  f"images (conversations of up to question_turns turns), next to the captions; any of {list(CATEGORIES)}. "
                  "Empty: captions only.", "nargs": "*"},
    )
    question_turns: int = field(default=4, metadata={"help": "Question-answer turns per conversation of world_questions."})
    question_repeats: list[str] = field(
        default_factory=list,
        metadata={"help": "Weigh the world_questions mixture, as `category=N`: each question of the category is asked N "
                  "times (once among its image's other questions, N-1 times in conversations of that category "
                  "alone). E.g. `spatial=4`; `category:answer_type=N` weighs one form of the category's questions, "
                  "e.g. `spatial:yes_no=8` (align.world.ANSWER_TYPES); `spatial:yes_no:one_shape=N` the yes/no spatial "
                  "questions naming two objects of one shape (align.world.SPATIAL_PAIRS); `category:several=N` the "
                  "category's questions of scenes with two objects or more (e.g. `color:several=8`: the questions that "
                  "need the object found among several).", "nargs": "*"},
    )
    spatial_reasoning: bool = field(
        default=False,
        metadata={"help": "Answer the world's yes/no spatial questions with their reason first: the object the "
                  "relation favours, then yes or no (\"The red circle is further left, so yes.\"; "
                  "align.world.reasoned_answer). Needs world_questions."},
    )
    text_fraction: float = field(
        default=0.0,
        metadata={"help": "Keep the LLM's text while it trains (stages finetune, full): this fraction of the training "
                  "rows are text-only documents, every token a label as in the LLM's own pretraining, batched beside "
                  "the image rows. From text_dataset_path, or else the world's LM documents (align.zoo.lm_documents "
                  "of dataset_split: the embedded LLM's own pretraining text). 0: image rows only."},
    )
    text_dataset_path: str | None = field(
        default=None,
        metadata={"help": "Text-only documents for text_fraction: a JSONL file ({\"text\": ...} or a JSON string per "
                  "line) or a text file, one document per line."},
    )
    text_max_length: int = field(default=256, metadata={"help": "Text-only documents are cut to this many tokens."})
    eval_captions: int = field(
        default=0,
        metadata={"help": "Caption this many held-out world images before and after training and write the "
                  "caption_match figures to metrics.json (0: skip)."},
    )
    eval_split: str = field(default="test", metadata={"help": "World split the captions are evaluated on."})
    eval_batch_size: int = field(default=16, metadata={"help": "Images per generate call when evaluating captions."})
    eval_max_new_tokens: int = field(default=64, metadata={"help": "Longest caption generated when evaluating."})

    def __post_init__(self):
        # YAML reads `true`/`false` as booleans.
        if isinstance(self.use_feature_cache, bool):
            self.use_feature_cache = str(self.use_feature_cache).lower()
        if self.standardize_images < 1:
            raise ValueError(f"standardize_images must be positive, got {self.standardize_images}")
        if self.stage not in STAGES:
            raise ValueError(f"stage must be one of {sorted(STAGES)}, got {self.stage!r}")
        if self.use_feature_cache not in FEATURE_CACHE_MODES:
            raise ValueError(f"use_feature_cache must be one of {list(FEATURE_CACHE_MODES)}, got {self.use_feature_cache!r}")
        if self.use_feature_cache == "true" and not towers_frozen(self.stage):
            raise ValueError(
                f"use_feature_cache=true cannot be used with stage {self.stage!r}, which trains the vision towers "
                "(their features change every step); use use_feature_cache=auto or false"
            )
        if self.fusion not in FUSIONS:
            raise ValueError(f"fusion must be one of {sorted(FUSIONS)}, got {self.fusion!r}")
        if self.projector not in PROJECTORS:
            raise ValueError(f"projector must be one of {sorted(PROJECTORS)}, got {self.projector!r}")
        if self.caption_style not in CAPTION_STYLES:
            raise ValueError(f"caption_style must be one of {list(CAPTION_STYLES)}, got {self.caption_style!r}")
        if self.train_samples is not None and self.train_samples <= 0:
            raise ValueError(f"train_samples must be positive or unset, got {self.train_samples}")
        unknown = set(self.world_questions) - set(CATEGORIES)
        if unknown:
            raise ValueError(f"world_questions has unknown categories {sorted(unknown)}; supported: {list(CATEGORIES)}")
        if self.world_questions and self.dataset_path is not None:
            raise ValueError("world_questions come from the shapes world: leave dataset_path unset to use them")
        if self.question_turns < 1:
            raise ValueError(f"question_turns must be >= 1, got {self.question_turns}")
        self.question_repeat_counts()  # a malformed or unknown entry is refused here, before any work
        if self.spatial_reasoning and "spatial" not in self.world_questions:
            raise ValueError("spatial_reasoning answers the world's spatial questions: add spatial to world_questions")
        if not 0.0 <= self.text_fraction < 1.0:
            raise ValueError(f"text_fraction must be in [0, 1), got {self.text_fraction}")
        if self.text_fraction > 0 and "language_model" not in STAGES[self.stage]:
            raise ValueError(f"text_fraction trains the LLM on text, but stage {self.stage!r} freezes the LLM; use "
                             "stage finetune or full, or text_fraction 0")
        if self.text_fraction > 0 and self.dataset_path is not None and self.text_dataset_path is None:
            raise ValueError("text rows beside your own dataset_path need their documents: set text_dataset_path "
                             "(the default documents are the shapes world's)")
        if self.text_dataset_path is not None and self.text_fraction == 0:
            raise ValueError("text_dataset_path is read for text rows only: set text_fraction above 0")
        if self.text_max_length < 2:
            raise ValueError(f"text_max_length must be at least 2 tokens, got {self.text_max_length}")
        if self.eval_captions < 0:
            raise ValueError(f"eval_captions must be >= 0 (0 skips the evaluation), got {self.eval_captions}")

    def text_documents(self, tokenizer) -> list[str]:
        """The documents of the text rows: `text_dataset_path`'s, or the world's LM documents of `dataset_split`."""
        if self.text_dataset_path is not None:
            return read_calibration_texts(self.text_dataset_path, option="text_dataset_path")
        from align.zoo.documents import lm_documents

        split = self.dataset_split
        return lm_documents({split: open_world(self.world_path, split, hint="set world_path")}, split, tokenizer)

    def question_repeat_counts(self) -> dict[str, int]:
        """`question_repeats` as {key: times}, a key `category`, `category:answer_type` or `spatial:yes_no:<pair>`;
        raises ValueError naming a malformed or unknown entry."""
        counts = {}
        for entry in self.question_repeats:
            key, sep, times = entry.partition("=")
            if not sep or not times.strip().isdigit():
                raise ValueError(f"question_repeats entries are category=N or category:answer_type=N (e.g. spatial=4, "
                                 f"spatial:yes_no=8), got {entry!r}")
            split_repeat_key(key, self.world_questions)
            if int(times) < 1:
                raise ValueError(f"question_repeats for {key!r} must be at least 1, got {entry!r}")
            counts[key] = int(times)
        return counts
