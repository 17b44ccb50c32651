"""Post-training sets from the shapes world: SFT rows, refusals and verified preference pairs."""

import json
import random
import re
from collections import Counter

import pytest

from align.data import (
    REFUSALS,
    refusal_rows,
    validate_rows,
    world_preference_rows,
    world_sft_rows,
    wrong_answer,
)
from align.world import CATEGORIES, COLORS, SHAPES, build_world, is_refusal, normalize, verify
from align.world.language import NUMBER_WORDS


@pytest.fixture(scope="module")
def world():
    return build_world(None, sizes={"train": 40}, seed=3)["train"]


def answer_text(messages):
    (message,) = messages
    assert message["role"] == "assistant"
    return message["content"][0]["text"]


def numbers(text):
    tokens = normalize(text)
    found = {int(t) for t in tokens if t.isdigit()} | {NUMBER_WORDS.index(t) for t in tokens if t in NUMBER_WORDS}
    return found or ({0} if "no" in tokens else set())


def test_world_sft_rows_are_the_world_conversations(world):
    rows = world_sft_rows(world)
    assert rows.column_names == ["images", "messages"]
    assert rows["messages"] == world["messages"]
    clean, report = validate_rows(rows, "sft")
    assert len(clean) == len(world) and report.rejects == []


def test_refusal_phrasings_all_verify_as_refusals():
    record = {"category": "unanswerable", "answer_type": "refusal", "answer": "x", "question": "Who drew this?"}
    answerable = {"category": "color", "answer_type": "color", "answer": "red", "question": "What color?"}
    for text in REFUSALS:
        assert verify(record, text), text
        assert not verify(answerable, text), text


def test_refusal_rows(world):
    unanswerable = {
        image_id: {q["question"] for q in json.loads(questions) if q["category"] == "unanswerable"}
        for image_id, questions in zip(world["image_id"], world["questions"])
    }
    pictures = {image_id: images[0].tobytes() for image_id, images in zip(world["image_id"], world["images"])}
    rows = refusal_rows(world, n=100, seed=0)  # more rows than questions: repeats with other phrasings
    assert len(rows) == 100 and rows.column_names == ["images", "messages"]
    answers = []
    for images, messages in zip(rows["images"], rows["messages"]):
        user, assistant = messages
        assert user["content"][0] == {"type": "image", "text": None}
        question = user["content"][1]["text"]
        owners = [i for i, qs in unanswerable.items() if question in qs and pictures[i] == images[0].tobytes()]
        assert owners, f"{question!r} is not an unanswerable question of its image"
        answer = answer_text([assistant])
        assert verify({"answer_type": "refusal"}, answer)
        answers.append(answer)
    assert len(set(answers)) >= 5
    assert refusal_rows(world, n=10, seed=4)["messages"] == refusal_rows(world, n=10, seed=4)["messages"]
    clean, _ = validate_rows(rows, "sft")
    assert len(clean) == 100


def test_preference_pairs_chosen_verifies_rejected_does_not(world):
    rows = world_preference_rows(world, seed=0, per_image=3, long_fraction=0.5)
    assert rows.column_names == ["images", "prompt", "chosen", "rejected", "category", "record", "image_id"]
    # Nothing dropped: every picked question gave a pair.
    assert len(rows) == sum(min(3, len(json.loads(q))) for q in world["questions"])
    assert set(rows["category"]) == set(CATEGORIES)
    questions = dict(zip(world["image_id"], world["questions"]))
    forms = Counter()
    for row in rows:
        record = json.loads(row["record"])
        chosen, rejected = answer_text(row["chosen"]), answer_text(row["rejected"])
        assert record["category"] == row["category"]
        assert record in json.loads(questions[row["image_id"]])
        assert row["prompt"] == [
            {"role": "user", "content": [{"type": "image", "text": None}, {"type": "text", "text": record["question"]}]}
        ]
        assert verify(record, chosen), (record, chosen)
        assert not verify(record, rejected), (record, rejected)
        long = chosen == record["answer_long"]
        forms[long] += 1
        assert long or chosen == record["answer"]
        # Rejected is a wrong answer of the same category, in the same form as chosen.
        kind = record["answer_type"]
        if kind == "color":
            named = [t for t in normalize(rejected) if t in COLORS]
            assert len(named) == 1 and named[0] != record["answer"]
        elif kind == "shape":
            named = [t for t in normalize(rejected) if t in SHAPES]
            assert len(named) == 1 and named[0] != record["answer"]
        elif kind == "number":
            (wrong,) = numbers(rejected)
            assert 1 <= abs(wrong - int(record["answer"])) <= 2
        elif kind == "yes_no":
            said = normalize(rejected)[0]
            assert said == {"yes": "no", "no": "yes"}[record["answer"]]
        elif kind == "choice":
            other = next(c for c in record["choices"] if c != record["answer"])
            assert rejected in (other, f"The {other.removeprefix('the ')} is {re.sub(r'^The .* is ', '', chosen)}")
        else:
            assert kind == "refusal" and not is_refusal(rejected) and rejected.endswith(".")
        if not long and kind not in ("refusal", "choice"):  # a choice is the other object's name (checked above)
            assert len(rejected.split()) <= 3
    assert forms[True] > 0 and forms[False] > 0
    short_only = world_preference_rows(world, seed=0, per_image=3)
    assert all(answer_text(c) == json.loads(r)["answer"] for c, r in zip(short_only["chosen"], short_only["record"]))


def test_count_errors_are_mostly_off_by_one(world):
    rows = world_preference_rows(world, seed=1, per_image=12)
    gaps = Counter()
    for row in rows:
        record = json.loads(row["record"])
        if record["answer_type"] == "number":
            (wrong,) = numbers(answer_text(row["rejected"]))
            gaps[abs(wrong - int(record["answer"]))] += 1
    assert set(gaps) <= {1, 2} and gaps[1] > 2 * gaps[2]


def test_preference_rows_are_deterministic_and_valid(world):
    a, b = world_preference_rows(world, seed=5), world_preference_rows(world, seed=5)
    assert a["chosen"] == b["chosen"] and a["rejected"] == b["rejected"]
    assert world_preference_rows(world, seed=6)["record"] != a["record"]
    clean, report = validate_rows(a, "preference")
    assert len(clean) == len(a) and report.rejects == []


def test_count_pairs_reject_each_number_about_as_often_as_they_choose_it():
    rng = random.Random(0)
    answers = rng.choices(range(7), weights=[18, 42, 18, 10, 5, 4, 3], k=2000)  # the world's count answers, roughly
    records = [{"answer": str(n), "answer_type": "number", "category": "count", "query": None} for n in answers]

    def draw(balance):
        draws = random.Random(1)
        wrong = [int(wrong_answer(r, {"objects": []}, draws, long=False, count_balance=balance)) for r in records]
        assert all(w >= 0 and w != n and abs(w - n) <= 2 for w, n in zip(wrong, answers))
        excess = Counter(wrong)
        excess.subtract(answers)  # per number, times rejected minus times chosen
        return wrong, excess, sum(w > n for w, n in zip(wrong, answers)) / len(answers)

    balance = Counter()
    wrong, excess, up = draw(balance)
    assert balance == excess  # the counter holds rejected minus chosen (missing numbers count as zero)
    _, plain, plain_up = draw(None)
    # The plain draw (always up from 0, either way otherwise) rejects the larger number in most pairs, and 1 far less
    # often than it is chosen; balanced, the larger in about half, and every number within 2% of the pairs.
    assert plain_up > 0.56 and abs(up - 0.5) < 0.03, (plain_up, up)
    assert max(map(abs, plain.values())) > 0.1 * len(answers) and max(map(abs, excess.values())) < 0.02 * len(answers)
    assert sum(abs(w - n) == 1 for w, n in zip(wrong, answers)) > 0.8 * len(answers)  # mostly off by one


def _turns(messages):
    """(question, answer) pairs of a conversation."""
    questions = [next(c["text"] for c in m["content"] if c["type"] == "text") for m in messages if m["role"] == "user"]
    return list(zip(questions, [m["content"][0]["text"] for m in messages if m["role"] == "assistant"]))


def test_reasoned_answers_name_the_favoured_object_then_verify(world):
    from align.world import Scene, reasoned_answer, relation_holds, yes_no_objects

    checked = 0
    for scene_json, questions in zip(world["scene"], world["questions"]):
        scene = Scene.from_json(scene_json)
        for record in json.loads(questions):
            if record["category"] != "spatial" or record["answer_type"] != "yes_no":
                with pytest.raises(ValueError, match="not a yes/no spatial question"):
                    reasoned_answer(record)
                continue
            subject, other = yes_no_objects(record)
            assert record["question"].startswith(f"Is the {subject} ") and record["question"].endswith(f" the {other}?")
            a, b = (next(o for o in scene.objects if o.id == i) for i in record["objects"])
            holds = relation_holds(a, b, record["relation"], scene.spatial_px)
            good, bad = reasoned_answer(record), reasoned_answer(record, correct=False)
            # The object the relation favours comes first, the yes/no follows from it, and verify reads it.
            assert good.startswith(f"The {subject if holds else other} is ") and good.endswith("yes." if holds else "no.")
            assert bad.startswith(f"The {other if holds else subject} is ") and bad.endswith("no." if holds else "yes.")
            assert verify(record, good) and not verify(record, bad)
            checked += 1
    assert checked > 10


def test_spatial_pair_tells_one_shape_names_from_two_shapes():
    from align.world import spatial_pair

    def record(question, relation):
        return {"category": "spatial", "answer_type": "yes_no", "question": question, "relation": relation, "answer": "no"}

    assert spatial_pair(record("Is the red square above the orange square?", "above")) == "one_shape"
    assert spatial_pair(record("Is the large green triangle to the left of the small green triangle?", "left_of")) == "one_shape"
    assert spatial_pair(record("Is the red square below the circle?", "below")) == "two_shapes"
    with pytest.raises(ValueError, match="not a yes/no spatial question"):
        spatial_pair({"category": "spatial", "answer_type": "choice", "question": "Which is higher, the a or the b?"})


def test_conclusion_pairs_differ_in_the_yes_or_no_alone(world):
    """`conclusion_fraction` of the reasoned yes/no spatial pairs reject the right reason with the wrong yes or no;
    at 0 the pairs are those of before (no random draw moves them), and `categories` keeps those categories."""
    from align.data import wrong_conclusion
    from align.world import reasoned_answer

    record = {"category": "spatial", "answer_type": "yes_no", "relation": "above", "answer": "no",
              "question": "Is the red square above the orange square?"}
    assert reasoned_answer(record) == "The orange square is higher, so no."
    assert wrong_conclusion(record) == "The orange square is higher, so yes."
    assert wrong_conclusion({**record, "answer": "yes"}) == "The red square is higher, so no."

    before = world_preference_rows(world, seed=1, per_image=4, reasoned=True)
    texts = ["record", "chosen", "rejected"]
    same = world_preference_rows(world, seed=1, per_image=4, reasoned=True, conclusion_fraction=0.0)
    assert same.select_columns(texts)[:] == before.select_columns(texts)[:]
    every = world_preference_rows(world, seed=1, per_image=4, reasoned=True, conclusion_fraction=1.0)
    spatial = 0
    for record, chosen, rejected, old in zip(every["record"], every["chosen"], every["rejected"], before["rejected"]):
        record, chosen, rejected = json.loads(record), answer_text(chosen), answer_text(rejected)
        if record["category"] == "spatial" and record["answer_type"] == "yes_no":
            # The same words up to the conclusion, then the other yes or no.
            assert rejected.rpartition(" ")[0] == chosen.rpartition(" ")[0] and rejected != chosen
            assert verify(record, chosen) and not verify(record, rejected)
            spatial += 1
        else:
            assert rejected == answer_text(old)
    assert spatial > 0
    only = world_preference_rows(world, seed=1, per_image=4, categories=["spatial"])
    assert set(only["category"]) == {"spatial"}
    with pytest.raises(ValueError, match="needs reasoned=True"):
        world_preference_rows(world, conclusion_fraction=0.5)
    with pytest.raises(ValueError, match="in \\[0, 1\\]"):
        world_preference_rows(world, reasoned=True, conclusion_fraction=1.5)
    with pytest.raises(ValueError, match="categories must name some of"):
        world_preference_rows(world, categories=["colour"])


def test_reasoned_sft_rows_and_pairs_change_only_the_yes_no_spatial_answers(world):
    plain, reasoned = world_sft_rows(world), world_sft_rows(world, reasoned=True)
    assert reasoned.column_names == ["images", "messages"] and len(reasoned) == len(plain)
    assert reasoned["images"] == plain["images"]
    changed = 0
    for before, after, questions in zip(plain["messages"], reasoned["messages"], world["questions"]):
        records = {r["question"]: r for r in json.loads(questions)}
        for (question, short), (same, answer) in zip(_turns(before), _turns(after)):
            record = records[question]
            assert same == question and verify(record, answer)
            if record["category"] == "spatial" and record["answer_type"] == "yes_no":
                assert answer != short and answer.endswith(f", so {short}.")
                changed += 1
            else:
                assert answer == short
    assert changed > 0
    assert validate_rows(reasoned, "sft")[1].rejects == []

    pairs = world_preference_rows(world, seed=1, per_image=4, reasoned=True)
    assert len(pairs) == len(world_preference_rows(world, seed=1, per_image=4))
    spatial = [(json.loads(r), answer_text(c), answer_text(j)) for r, c, j in zip(pairs["record"], pairs["chosen"], pairs["rejected"])
               if json.loads(r)["answer_type"] == "yes_no" and json.loads(r)["category"] == "spatial"]
    assert spatial and all(c.startswith("The ") and ", so " in j and verify(r, c) and not verify(r, j) for r, c, j in spatial)
