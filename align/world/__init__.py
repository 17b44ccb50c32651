"""The shapes world: procedural images with a scene graph, captions, checkable questions and a verifier.

Small enough to train and evaluate tiny VLMs on a CPU, with answers that are right or wrong beyond
doubt. `build_world` writes the dataset; `caption_rows`, `question_rows`, `prompt_rows` and `text_corpus` derive the
views each training stage needs; `verify` scores a free-text answer against a question record, and
`record_for_question` turns a free-text question in the world's grammar into one.
"""

from .dataset import (
    DEFAULT_SIZES,
    WORLD_FEATURES,
    build_world,
    caption_rows,
    generate_split,
    make_example,
    object_documents,
    prompt_rows,
    question_rows,
    text_corpus,
)
from .geometry import object_patch
from .language import (
    ANSWER_TYPES,
    CATEGORIES,
    REFUSAL,
    SPATIAL_PAIRS,
    make_captions,
    make_conversation,
    make_questions,
    reasoned_answer,
    reasoned_messages,
    spatial_pair,
    yes_no_objects,
)
from .parse import question_category, record_for_question
from .render import render
from .scene import (
    COLORS,
    SHAPES,
    SIZES,
    Scene,
    SceneObject,
    WorldConfig,
    generate_scene,
    image_rng,
    relation_holds,
)
from .verify import is_refusal, normalize, verify, well_formed

__all__ = [
    "ANSWER_TYPES",
    "CATEGORIES",
    "COLORS",
    "DEFAULT_SIZES",
    "REFUSAL",
    "SHAPES",
    "SIZES",
    "SPATIAL_PAIRS",
    "WORLD_FEATURES",
    "Scene",
    "SceneObject",
    "WorldConfig",
    "build_world",
    "caption_rows",
    "generate_scene",
    "generate_split",
    "image_rng",
    "is_refusal",
    "make_captions",
    "make_conversation",
    "make_example",
    "make_questions",
    "normalize",
    "object_documents",
    "object_patch",
    "prompt_rows",
    "question_category",
    "question_rows",
    "reasoned_answer",
    "reasoned_messages",
    "record_for_question",
    "relation_holds",
    "render",
    "spatial_pair",
    "text_corpus",
    "verify",
    "well_formed",
    "yes_no_objects",
]
