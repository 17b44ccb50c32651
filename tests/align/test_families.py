"""align.families and align.loading on tiny random stock VLMs built from config (no hub): each family's LoRA targets
are its LLM's projections only, its projector/merger/connector (Mllama: its cross-attention layers too) trains in full
beside LoRA, full fine-tuning freezes its vision side, QLoRA keeps that side out of 4-bit; a checkpoint whose
weights do not fit is refused with the keys; and the SFT, DPO and evaluation recipes run on a stock LLaVA, Idefics3,
Gemma 3, Qwen2-VL, Qwen2.5-VL and Mllama, each with its processor and (where TRL ships it) its own chat template."""

import copy
import json
import math
import re
from pathlib import Path

import datasets
import pytest
import torch
from peft import get_peft_model
from safetensors.torch import load_file, save_file
from transformers import (
    AutoConfig,
    AutoModelForImageTextToText,
    AutoTokenizer,
    Gemma3Config,
    Gemma3ImageProcessor,
    Gemma3Processor,
    Idefics3Config,
    Idefics3ImageProcessor,
    Idefics3Processor,
    LlavaConfig,
    LlavaProcessor,
    MllamaConfig,
    MllamaProcessor,
    Qwen2_5_VLConfig,
    Qwen2_5_VLProcessor,
    Qwen2VLConfig,
    Qwen2VLProcessor,
    SiglipImageProcessor,
)
from transformers.models.mllama.image_processing_pil_mllama import MllamaImageProcessorPil
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil
from trl import ModelConfig
from trl.chat_template_utils import (
    gemma3_chat_template,
    idefics3_chat_template,
    llava_next_chat_template,
    qwen2_5_vl_chat_template,
)

from align.families import FAMILIES, GENERIC, family_of, freeze_components
from align.loading import NoVideoProcessor, load_pretrained, load_processor, without_torchvision
from align.training import lora_config
from align.world import WorldConfig, build_world
from tests.align.training_helpers import IMAGE_SIZE, TINY_TRAINING, read_json, run_recipe

TEXT = dict(vocab_size=320, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=256, pad_token_id=0, bos_token_id=1, eos_token_id=2)
VISION = dict(image_size=32, patch_size=8, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2)
MROPE = {"type": "mrope", "mrope_section": [2, 1, 1]}
CONFIGS = {
    "llava": lambda: LlavaConfig(vision_config={"model_type": "siglip_vision_model", **VISION},
                                 text_config={"model_type": "llama", **TEXT}, image_token_index=5),
    "idefics3": lambda: Idefics3Config(vision_config=VISION, text_config={"model_type": "llama", **TEXT}, scale_factor=2,
                                       image_token_id=5),
    "gemma3": lambda: Gemma3Config(vision_config=VISION, text_config={"model_type": "gemma3_text", "head_dim": 8, **TEXT},
                                   mm_tokens_per_image=4, image_token_index=5, boi_token_index=6, eoi_token_index=7),
    "qwen2_vl": lambda: Qwen2VLConfig(
        vision_config=dict(depth=2, embed_dim=32, hidden_size=32, num_heads=2, patch_size=8, spatial_merge_size=2),
        text_config={**TEXT, "rope_scaling": MROPE}, image_token_id=5, video_token_id=6, vision_start_token_id=7),
    "qwen2_5_vl": lambda: Qwen2_5_VLConfig(
        vision_config=dict(depth=2, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=32, patch_size=8,
                           spatial_merge_size=2, fullatt_block_indexes=[1], window_size=16),
        text_config={**TEXT, "rope_scaling": MROPE}, image_token_id=5, video_token_id=6, vision_start_token_id=7),
    "mllama": lambda: MllamaConfig(
        vision_config=dict(image_size=32, patch_size=8, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                           num_global_layers=1, attention_heads=2, max_num_tiles=1, supported_aspect_ratios=[[1, 1]],
                           vision_output_dim=64, intermediate_layers_indices=[0]),
        text_config={**TEXT, "num_hidden_layers": 4, "cross_attention_layers": [1]}, image_token_index=5),
}
# Where each family keeps its LLM layers, its vision tower and its projector/merger/connector.
LAYOUT = {
    "llava": ("model.language_model", "model.vision_tower", "multi_modal_projector"),
    "idefics3": ("model.text_model", "model.vision_model", "connector"),
    "gemma3": ("model.language_model", "model.vision_tower", "multi_modal_projector"),
    "qwen2_vl": ("model.language_model", "model.visual", "merger"),
    "qwen2_5_vl": ("model.language_model", "model.visual", "merger"),
    "mllama": ("model.language_model", "model.vision_model", "multi_modal_projector"),
}


@pytest.fixture(scope="module")
def models():
    torch.manual_seed(0)
    return {name: AutoModelForImageTextToText.from_config(config()) for name, config in CONFIGS.items()}


@pytest.mark.parametrize("name", list(CONFIGS))
def test_lora_adapts_the_llm_only_and_trains_the_connector_in_full(models, name):
    model = models[name]
    family = family_of(model)
    assert family.name == ("qwen2_vl" if name.startswith("qwen2") else name)
    llm, tower, connector = LAYOUT[name]
    args = ModelConfig(use_peft=True, lora_r=4, lora_alpha=8)
    config = lora_config(args, model)
    # Mllama's cross-attention decoder layer (index 1 here) trains in full, as the suite's adapters do.
    in_full = [f"{llm.removeprefix('model.')}.layers.1"] if name == "mllama" else []
    assert config.modules_to_save == [connector, *in_full]
    targeted = [n for n, _ in model.named_modules() if re.fullmatch(config.target_modules, n)]
    assert targeted and all(n.startswith(f"{llm}.layers.") for n in targeted)
    assert not any(n.startswith(f"{llm}.layers.1.") for n in targeted) if in_full else True
    layers = len(model.get_submodule(f"{llm}.layers")) - len(in_full)
    assert len(targeted) >= 7 * layers  # q, k, v, o, gate, up, down of every decoder layer LoRA adapts

    wrapped = get_peft_model(model, config)
    trainable = {n for n, p in wrapped.named_parameters() if p.requires_grad}
    assert any(f".{connector}.modules_to_save." in n for n in trainable)
    assert not any(tower.removeprefix("model.") + "." in n and connector not in n for n in trainable)
    wrapped.unload()  # leave the shared model as it was


@pytest.mark.parametrize("name", ["llava", "idefics3", "qwen2_vl"])
def test_full_fine_tuning_freezes_the_vision_side_by_stage(models, name):
    model = models[name]
    llm, tower, connector = LAYOUT[name]
    summary = freeze_components(model, "finetune")
    assert summary["vision_towers"]["trainable"] is False and summary["projectors"]["trainable"] is True
    for module_name, parameter in model.named_parameters():
        if module_name.startswith(tower + ".") and f".{connector}." not in module_name:
            assert not parameter.requires_grad, module_name
        elif f".{connector}." in module_name or module_name.startswith(llm + "."):
            assert parameter.requires_grad, module_name
    freeze_components(model, "align")  # projector only
    assert not any(p.requires_grad for n, p in model.named_parameters() if n.startswith(llm + "."))
    model.requires_grad_(True)


def test_qlora_keeps_the_vision_side_out_of_4bit_and_unknown_types_are_generic(models, caplog):
    assert FAMILIES["qwen2_vl"].not_quantized() == ["model.visual", "model.visual.merger", "lm_head"]
    assert FAMILIES["idefics3"].not_quantized() == ["model.vision_model", "model.connector", "lm_head"]
    assert FAMILIES["mllama"].not_quantized(models["mllama"])[-2:] == ["model.language_model.layers.1", "lm_head"]

    class Config:
        model_type = "some_new_vlm"

    assert family_of(Config()) is GENERIC and "no rules for model_type 'some_new_vlm'" in caplog.text


@pytest.mark.parametrize("name", ["qwen2_5_vl", "mllama"])
def test_a_4bit_load_quantizes_the_llm_only(models, tmp_path, name):
    """bitsandbytes matches `llm_int8_skip_modules` from the start of a module's name (or as its end): bare names
    such as `visual` matched nothing and the whole vision side went to 4 bit."""
    import bitsandbytes as bnb
    from transformers import BitsAndBytesConfig

    models[name].save_pretrained(tmp_path / name)
    quantization = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_compute_dtype=torch.float32)
    model = load_pretrained(tmp_path / name, quantization_config=quantization, dtype=torch.float32)
    quantized = {n for n, m in model.named_modules() if isinstance(m, bnb.nn.Linear4bit)}
    llm, tower, connector = LAYOUT[name]
    assert quantized and all(n.startswith(f"{llm}.layers.") for n in quantized)
    assert not any(n.startswith(f"{llm}.layers.1.") for n in quantized) if name == "mllama" else True
    full = [n for n, m in model.named_modules() if type(m) is torch.nn.Linear]
    assert any(n.startswith(tower + ".") for n in full) and "lm_head" in full


def test_a_checkpoint_that_does_not_fit_is_refused_with_its_keys(models, tmp_path):
    models["llava"].save_pretrained(tmp_path / "llava")
    assert type(load_pretrained(tmp_path / "llava")).__name__ == "LlavaForConditionalGeneration"
    weights = load_file(tmp_path / "llava" / "model.safetensors")
    (dropped,) = [key for key in weights if key.endswith("multi_modal_projector.linear_1.weight")]
    weights[dropped.replace("linear_1", "extra")] = weights.pop(dropped)
    save_file(weights, tmp_path / "llava" / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ValueError, match=r"(?s)does not fit LlavaForConditionalGeneration.*missing keys \(1\): "
                                         r"\S*multi_modal_projector.linear_1.weight.*unexpected keys \(1\): "
                                         r"\S*multi_modal_projector.extra.weight"):
        load_pretrained(tmp_path / "llava")


@pytest.fixture(scope="module")
def stock_vlms(tiny_tokenizer, tmp_path_factory):
    """Tiny random stock VLMs saved like hub checkpoints with their own processors and, where TRL ships the
    original (so that its assistant-only loss patches it as it would the real checkpoint's), their own chat
    templates: a LLaVA (SigLIP tower, Llama LLM, `LlavaProcessor`, LLaVA-NeXT's `[INST]` template), an Idefics3
    (`Idefics3Processor`, Idefics3's template), a Gemma 3 (`Gemma3Processor`, Gemma 3's template), a Qwen2-VL and a
    Qwen2.5-VL (Qwen2.5-VL's template) and a Mllama (Llama 3.2 Vision's format)."""
    root = tmp_path_factory.mktemp("stock")
    tokenizer = copy.deepcopy(tiny_tokenizer)
    tokenizer.add_special_tokens({"additional_special_tokens": ["<fake_token_around_image>", "<global-img>", "<end_of_utterance>"]})
    image_token = tokenizer.convert_tokens_to_ids("<image>")
    text = {**TEXT, "model_type": "llama", "vocab_size": len(tokenizer), "pad_token_id": tokenizer.pad_token_id,
            "bos_token_id": tokenizer.bos_token_id, "eos_token_id": tokenizer.eos_token_id}
    torch.manual_seed(0)
    llava_tokenizer = _with_tokens(tokenizer, root / "llava-tokenizer", ["</s>"], llava_next_chat_template,
                                   image_token="<image>", eos_token="</s>")
    llava = LlavaConfig(vision_config={"model_type": "siglip_vision_model", **VISION},
                        text_config={**text, "vocab_size": len(llava_tokenizer), "eos_token_id": llava_tokenizer.eos_token_id},
                        image_token_index=image_token, vision_feature_layer=-1, vision_feature_select_strategy="full")
    AutoModelForImageTextToText.from_config(llava).save_pretrained(root / "llava")
    LlavaProcessor(
        image_processor=SiglipImageProcessor(size={"height": 32, "width": 32}), tokenizer=llava_tokenizer, patch_size=8,
        vision_feature_select_strategy="full", num_additional_image_tokens=0, chat_template=llava_next_chat_template,
    ).save_pretrained(root / "llava")
    idefics3_tokenizer = _with_tokens(tokenizer, root / "idefics3-tokenizer", ["<|begin_of_text|>"],
                                      idefics3_chat_template, image_token="<image>", eos_token="<end_of_utterance>")
    idefics3 = Idefics3Config(vision_config=VISION, scale_factor=2, image_token_id=image_token, text_config={
        **text, "vocab_size": len(idefics3_tokenizer), "eos_token_id": idefics3_tokenizer.eos_token_id})
    AutoModelForImageTextToText.from_config(idefics3).save_pretrained(root / "idefics3")
    Idefics3Processor(
        image_processor=Idefics3ImageProcessor(do_image_splitting=False, size={"longest_edge": 32},
                                               max_image_size={"longest_edge": 32}),
        tokenizer=idefics3_tokenizer, image_seq_len=4, chat_template=idefics3_chat_template,  # 16 patches / scale_factor²
    ).save_pretrained(root / "idefics3")
    # Gemma 3: its processor writes `boi_token` where the template puts an image and expands it with `image_token`s.
    gemma_tokenizer = _with_tokens(
        tokenizer, root / "gemma3-tokenizer", ["<start_of_turn>", "<end_of_turn>", "<start_of_image>",
                                               "<image_soft_token>", "<end_of_image>"], gemma3_chat_template,
        boi_token="<start_of_image>", eoi_token="<end_of_image>", image_token="<image_soft_token>",
        eos_token="<end_of_turn>",
    )
    gemma3 = Gemma3Config(
        vision_config=VISION, text_config={**text, "model_type": "gemma3_text", "head_dim": 8,
                                           "vocab_size": len(gemma_tokenizer), "eos_token_id": gemma_tokenizer.eos_token_id},
        mm_tokens_per_image=4, image_token_index=gemma_tokenizer.convert_tokens_to_ids("<image_soft_token>"),
        boi_token_index=gemma_tokenizer.convert_tokens_to_ids("<start_of_image>"),
        eoi_token_index=gemma_tokenizer.convert_tokens_to_ids("<end_of_image>"),
    )
    AutoModelForImageTextToText.from_config(gemma3).save_pretrained(root / "gemma3")
    Gemma3Processor(
        image_processor=Gemma3ImageProcessor(size={"height": 32, "width": 32}, do_pan_and_scan=False),
        tokenizer=gemma_tokenizer, image_seq_length=4, chat_template=gemma3_chat_template,
    ).save_pretrained(root / "gemma3")
    _save_qwen(root, tokenizer, text, Qwen2VLConfig, Qwen2VLProcessor, "qwen2_vl")
    _save_qwen(root, tokenizer, text, Qwen2_5_VLConfig, Qwen2_5_VLProcessor, "qwen2_5_vl")
    _save_mllama(root, tokenizer, text)
    world = root / "world"  # with a validation split: the reward recipe measures held-out pairs
    build_world(str(world), sizes={"train": 8, "validation": 3}, config=WorldConfig(image_size=IMAGE_SIZE), seed=0)
    return {**{name: str(root / name) for name in STOCK}, "world": str(world)}


STOCK = ("llava", "idefics3", "gemma3", "qwen2_vl", "qwen2_5_vl", "mllama")


def _with_tokens(tokenizer, folder: Path, tokens: list[str], chat_template: str, **special):
    """A copy of `tokenizer` with `tokens` added and `chat_template`, reloaded with `special` tokens named as a
    stock checkpoint's tokenizer names them (`image_token`, ...)."""
    tokenizer = copy.deepcopy(tokenizer)
    tokenizer.add_special_tokens({"additional_special_tokens": tokens})
    tokenizer.chat_template = chat_template
    tokenizer.save_pretrained(folder)
    named = {k: v for k, v in special.items() if k in ("bos_token", "eos_token")}
    return AutoTokenizer.from_pretrained(folder, **named, extra_special_tokens={
        k: v for k, v in special.items() if k not in named})


def _save_qwen(root: Path, tokenizer, text: dict, config_class, processor_class, name: str) -> None:
    """A Qwen2-VL or Qwen2.5-VL with Qwen2.5-VL's own chat template (as TRL ships it), its PIL image processor and,
    where torchvision is missing, `NoVideoProcessor` (what `load_processor` gives such a folder)."""
    tokenizer = _with_tokens(
        tokenizer, root / f"{name}-tokenizer", ["<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>",
                                                "<|image_pad|>", "<|video_pad|>"], qwen2_5_vl_chat_template,
        image_token="<|image_pad|>", video_token="<|video_pad|>", vision_bos_token="<|vision_start|>",
        vision_eos_token="<|vision_end|>", eos_token="<|im_end|>",
    )
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in ("<|image_pad|>", "<|video_pad|>", "<|vision_start|>")}
    vision = dict(depth=2, hidden_size=32, num_heads=2, patch_size=8, spatial_merge_size=2, temporal_patch_size=2)
    if name == "qwen2_vl":
        vision.update(embed_dim=32)
    else:
        vision.update(intermediate_size=64, out_hidden_size=32, fullatt_block_indexes=[1], window_size=16)
    config = config_class(
        vision_config=vision, text_config={**text, "vocab_size": len(tokenizer), "rope_scaling": MROPE,
                                           "eos_token_id": tokenizer.eos_token_id},
        image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"],
    )
    AutoModelForImageTextToText.from_config(config).save_pretrained(root / name)
    video = NoVideoProcessor({"video_processor_type": "Qwen2VLVideoProcessor", "patch_size": 8, "merge_size": 2,
                              "temporal_patch_size": 2})
    without_torchvision(processor_class)(
        image_processor=Qwen2VLImageProcessorPil(min_pixels=32 * 32, max_pixels=32 * 32, patch_size=8, merge_size=2,
                                                 temporal_patch_size=2),
        tokenizer=tokenizer, video_processor=video, chat_template=qwen2_5_vl_chat_template,
    ).save_pretrained(root / name)


def _save_mllama(root: Path, tokenizer, text: dict) -> None:
    """A Mllama (Llama 3.2 Vision layout: a cross-attention decoder layer among four) whose processor carries the
    Llama 3.2 Vision conversation format without `{% generation %}` markers, as the stock one has none."""
    template = FAMILIES["mllama"].chat_template_for_training()
    stock = re.sub(r"\{%-? ?(end)?generation ?-?%\}", "", template)
    tokenizer = _with_tokens(
        tokenizer, root / "mllama-tokenizer", ["<|image|>", "<|begin_of_text|>", "<|start_header_id|>",
                                               "<|end_header_id|>", "<|eot_id|>", "<|python_tag|>"], stock,
        image_token="<|image|>", bos_token="<|begin_of_text|>", eos_token="<|eot_id|>",
    )
    config = MllamaConfig(
        vision_config=dict(image_size=32, patch_size=8, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                           num_global_layers=1, attention_heads=2, max_num_tiles=1, supported_aspect_ratios=[[1, 1]],
                           vision_output_dim=64, intermediate_layers_indices=[0]),
        text_config={**text, "vocab_size": len(tokenizer), "num_hidden_layers": 4, "cross_attention_layers": [1],
                     "bos_token_id": tokenizer.bos_token_id, "eos_token_id": tokenizer.eos_token_id},
        image_token_index=tokenizer.convert_tokens_to_ids("<|image|>"),
    )
    AutoModelForImageTextToText.from_config(config).save_pretrained(root / "mllama")
    MllamaProcessor(image_processor=MllamaImageProcessorPil(size={"height": 32, "width": 32}, max_image_tiles=1),
                    tokenizer=tokenizer, chat_template=stock).save_pretrained(root / "mllama")


@pytest.mark.slow
@pytest.mark.parametrize("name", STOCK)
def test_sft_dpo_and_evaluation_recipes_on_stock_vlms(stock_vlms, tmp_path, name):
    connector = {"qwen2_vl": "merger", "qwen2_5_vl": "merger"}.get(name, LAYOUT[name][2])
    lora = {**TINY_TRAINING, "use_peft": True, "lora_r": 8, "lora_alpha": 16, "max_length": None, "max_steps": 2,
            "world_path": stock_vlms["world"]}
    sft = run_recipe("sft.py", {**lora, "model_name_or_path": stock_vlms[name], "output_dir": str(tmp_path / "sft"),
                                "assistant_only_loss": True}, tmp_path)
    adapter = read_json(tmp_path / "sft" / "adapter_config.json")
    if name == "mllama":  # its cross-attention decoder layer trains in full too, and LoRA leaves it alone
        assert "trained in full: language_model.layers.1, multi_modal_projector" in sft.stdout
        assert adapter["modules_to_save"] == ["multi_modal_projector", "language_model.layers.1"]
        assert "mllama training template" in sft.stdout + sft.stderr
    else:
        assert f"trained in full: {connector}" in sft.stdout
        assert adapter["modules_to_save"] == [connector]
    metrics = read_json(tmp_path / "sft" / "metrics.json")
    assert metrics["global_step"] == 2 and metrics["loss"]["last"] > 0

    run_recipe("dpo.py", {**lora, "model_name_or_path": str(tmp_path / "sft"), "output_dir": str(tmp_path / "dpo"),
                          "beta": 0.1, "precompute_ref_log_probs": True}, tmp_path)
    assert read_json(tmp_path / "dpo" / "metrics.json")["global_step"] == 2

    evaluated = run_recipe("evaluate.py", {
        "model_name_or_path": str(tmp_path / "dpo"), "world_path": stock_vlms["world"], "dataset_split": "train",
        "output_dir": str(tmp_path / "eval"), "num_questions": 6, "batch_size": 3, "max_new_tokens": 4, "num_samples": 2,
    }, tmp_path)
    assert f"({family_of(AutoConfig.from_pretrained(stock_vlms[name])).name})" in evaluated.stdout + evaluated.stderr
    scores = read_json(tmp_path / "eval" / "metrics.json")
    assert scores["total"] == 6 and scores["num_samples"] == 2 and 0 <= scores["pass@2"] <= 1
    rows = [json.loads(line) for line in (tmp_path / "eval" / "predictions.jsonl").read_text().splitlines()]
    assert all(len(row["samples"]) == 2 for row in rows)


@pytest.mark.slow
@pytest.mark.parametrize("name", STOCK)
def test_reward_rejection_sampling_distillation_and_export_on_stock_vlms(stock_vlms, tmp_path, name):
    """The other recipes on each family: a reward model (the scalar head on the stock backbone) trained and reloaded
    for scoring, best-of-N sampling (`generate(num_return_sequences=N)` on a stock model), distillation from a
    stock teacher, and the PEFT and merged exports of that LoRA run, reloaded in fresh processes and compared."""
    from align.reward import load_reward_model, reward_scores

    lora = {**TINY_TRAINING, "use_peft": True, "lora_r": 8, "lora_alpha": 16, "max_length": None, "max_steps": 2,
            "world_path": stock_vlms["world"], "model_name_or_path": stock_vlms[name]}
    run_recipe("reward.py", {**lora, "output_dir": str(tmp_path / "reward"), "lora_task_type": "SEQ_CLS",
                             "pairs_per_image": 1, "eval_images": 2}, tmp_path)
    assert read_json(tmp_path / "reward" / "metrics.json")["global_step"] == 2
    reward, processor = load_reward_model(tmp_path / "reward")
    assert type(reward.get_base_model()).__name__ == "ImageTextForRewardModeling"
    world = datasets.load_from_disk(stock_vlms["world"])["validation"]
    rows = [{"images": row["images"], "prompt": [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What color?"}]}],
             "completion": answer} for row in world.select(range(2)) for answer in ("red", "two")]
    scores = reward_scores(reward, processor, rows, batch_size=3)
    assert len(scores) == 4 and all(math.isfinite(s) for s in scores)
    assert scores[:1] == pytest.approx(reward_scores(reward, processor, rows[:1]), abs=1e-5)  # batch-independent

    sampled = tmp_path / "rs"
    run_recipe("rejection_sampling.py", {
        "model_name_or_path": stock_vlms[name], "world_path": stock_vlms["world"], "dataset_split": "train",
        "output_dir": str(sampled), "num_prompts": 4, "num_candidates": 3, "max_new_tokens": 4, "prompts_per_batch": 2,
        "dtype": "float32",
    }, tmp_path)
    candidates = [json.loads(line) for line in (sampled / "candidates.jsonl").read_text().splitlines()]
    assert sorted(c["index"] for c in candidates) == [0, 1, 2, 3] and all(len(c["candidates"]) == 3 for c in candidates)

    run_recipe("distill.py", {**lora, "output_dir": str(tmp_path / "distill"), "teacher_model_name_or_path": stock_vlms[name],
                              "assistant_only_loss": True, "alpha": 0.5}, tmp_path)
    distilled = read_json(tmp_path / "distill" / "metrics.json")
    assert distilled["global_step"] == 2 and distilled["loss"]["last"] > 0

    out = tmp_path / "export"
    run_recipe("export.py", {"model_name_or_path": str(tmp_path / "distill"), "output_dir": str(out), "verify": True},
               tmp_path)
    manifest = read_json(out / "export.json")
    assert sorted(manifest["written"]) == ["card", "merged", "peft"]
    assert f"stock {AutoConfig.from_pretrained(stock_vlms[name]).model_type} checkpoint" in manifest["skipped"]["llava"]
    report = read_json(out / "verification.json")
    stock_class = json.loads((Path(stock_vlms[name]) / "config.json").read_text())["architectures"][0]
    assert report["ok"] and report["formats"]["merged"]["class"] == stock_class


@pytest.mark.slow
@pytest.mark.parametrize("name", ["llava", "qwen2_5_vl"])
def test_grpo_on_stock_vlms(stock_vlms, tmp_path, name):
    """GRPO samples each group with `generate(num_return_sequences=N)` on a stock model (the shared prefill is the
    suite VLM's) and trains as on the suite's; on Mllama, whose inputs TRL's GRPO drops, it is refused by name."""
    config = {
        **TINY_TRAINING, "use_peft": True, "lora_r": 8, "lora_alpha": 16, "max_steps": 2,
        "model_name_or_path": stock_vlms[name], "world_path": stock_vlms["world"], "output_dir": str(tmp_path / "grpo"),
        "num_prompts": 8, "num_generations": 4, "per_device_train_batch_size": 8, "max_completion_length": 4,
    }
    run_recipe("grpo.py", config, tmp_path)
    metrics = read_json(tmp_path / "grpo" / "metrics.json")
    assert metrics["global_step"] == 2 and [step for step, _ in metrics["reward"]["history"]] == [1, 2]
    connector = {"llava": "multi_modal_projector", "qwen2_5_vl": "merger"}[name]
    assert read_json(tmp_path / "grpo" / "adapter_config.json")["modules_to_save"] == [connector]
    if name == "llava":
        with pytest.raises(AssertionError, match="GRPO does not run on mllama models"):
            run_recipe("grpo.py", {**config, "model_name_or_path": stock_vlms["mllama"],
                                   "output_dir": str(tmp_path / "grpo-mllama")}, tmp_path)


def test_mllama_cross_attention_mask_is_extended_over_the_completions(stock_vlms):
    """TRL's preference collator leaves Mllama's `cross_attention_mask` at the prompts' length; extended, each row
    equals the mask the processor gives the whole conversation (prompt + completion) on its own."""
    from PIL import Image
    from trl.data_utils import apply_chat_template
    from trl.trainer.dpo_trainer import DataCollatorForVisionPreference

    from align.dpo import MllamaPreferenceCollator

    processor = load_processor(stock_vlms["mllama"])
    image = Image.new("RGB", (32, 32), "red")

    def pair(question, chosen, rejected):
        return {"images": [image], "prompt": [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}],
                "chosen": [{"role": "assistant", "content": chosen}], "rejected": [{"role": "assistant", "content": rejected}]}

    examples = [pair("What color is it?", "red", "a blue circle"), pair("How many objects are there here?", "two", "1")]
    collator = MllamaPreferenceCollator(DataCollatorForVisionPreference(processor), processor.tokenizer.bos_token_id)
    batch = collator(copy.deepcopy(examples))
    assert batch["cross_attention_mask"].shape[:2] == batch["input_ids"].shape
    for row, (example, side) in enumerate([(e, s) for s in ("chosen", "rejected") for e in examples]):
        text = apply_chat_template({k: example[k] for k in ("prompt", "chosen", "rejected")}, processor)
        alone = processor(images=[[image]], text=text["prompt"] + text[side], add_special_tokens=False, return_tensors="pt")
        length = alone["input_ids"].shape[1]
        assert torch.equal(batch["input_ids"][row, :length], alone["input_ids"][0])
        assert torch.equal(batch["cross_attention_mask"][row, :length], alone["cross_attention_mask"][0])
        assert not batch["cross_attention_mask"][row, length:].any()  # padding reads nothing


def test_a_qwen_processor_loads_without_torchvision(stock_vlms, tmp_path):
    """transformers 5 cannot create a Qwen2-VL/2.5-VL processor without torchvision (its video part); the loader
    builds it from the image processor's PIL backend, keeps the video settings and refuses videos by name."""
    from transformers.utils import is_torchvision_available

    processor = load_processor(stock_vlms["qwen2_5_vl"])
    assert type(processor).__name__ == "Qwen2_5_VLProcessor" and processor.chat_template == qwen2_5_vl_chat_template
    if not is_torchvision_available():
        assert isinstance(processor.video_processor, NoVideoProcessor)
        with pytest.raises(ValueError, match="without torchvision"):
            processor.video_processor([])
    processor.save_pretrained(tmp_path)
    assert read_json(tmp_path / "processor_config.json")["video_processor"]["video_processor_type"] == "Qwen2VLVideoProcessor"
    assert load_processor(tmp_path).image_processor.to_dict() == processor.image_processor.to_dict()


@pytest.mark.parametrize("name", ["llava", "idefics3", "gemma3", "mllama", "qwen2_5_vl"])
def test_a_repeated_image_goes_through_a_stock_tower_once(stock_vlms, name):
    """`RowMemo` on a stock tower (what DPO and GRPO put there: TRL hands each pair's or group's image over once per
    row): the same logits, with each distinct image encoded once. Qwen2-VL's tower takes flattened patches, not
    images as rows, and is left alone."""
    from PIL import Image

    from align.towers import memoize_stock_towers

    model = load_pretrained(stock_vlms[name]).eval()
    processor = load_processor(stock_vlms[name])
    red, blue = Image.new("RGB", (32, 32), "red"), Image.new("RGB", (32, 32), "blue")
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What color is it?"}]}]
    text = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    inputs = processor(images=[[red], [blue], [red], [red]], text=[text] * 4, padding=True, return_tensors="pt",
                       add_special_tokens=False)
    with torch.no_grad():
        expected = model(**inputs).logits
        memos = memoize_stock_towers(model)
        if name == "qwen2_5_vl":
            assert memos == []
            return
        got = model(**inputs).logits
    assert len(memos) == 1 and memos[0].images_encoded == 2
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def test_a_stock_reward_model_whose_weights_do_not_fit_is_refused(stock_vlms, tmp_path):
    """A saved reward model on a stock backbone reloads whole, or not at all: an unexpected key is named."""
    from align.reward import load_reward_model
    from model import ImageTextForRewardModeling

    ImageTextForRewardModeling.from_vlm(load_pretrained(stock_vlms["llava"])).save_pretrained(tmp_path)
    load_processor(stock_vlms["llava"]).save_pretrained(tmp_path)
    reloaded, _ = load_reward_model(tmp_path)
    assert type(reloaded).__name__ == "ImageTextForRewardModeling"
    weights = load_file(tmp_path / "model.safetensors")
    weights["model.multi_modal_projector.extra.weight"] = weights["score.weight"].clone()
    save_file(weights, tmp_path / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ValueError, match=r"unexpected keys \(1\): model.multi_modal_projector.extra.weight"):
        load_reward_model(tmp_path)


@pytest.mark.parametrize("name", ["llava", "qwen2_5_vl", "gemma3"])
def test_reward_model_likelihood_feature_on_stock_vlms(stock_vlms, tmp_path, name):
    """The likelihood feature on a stock backbone: the VLM's LM head is kept (tied where the VLM ties it), the
    untrained reward model scores each answer by the VLM's own log-likelihood of it, and a saved full folder
    reloads with the feature."""
    from align.loading import load_run
    from align.reward import (
        answer_start_ids,
        likelihood_scores,
        load_reward_model,
        reward_model_from_folder,
        reward_scores,
    )

    reward = reward_model_from_folder(stock_vlms[name], likelihood=True).eval()
    processor = load_processor(stock_vlms[name])
    assert reward.likelihood_feature and reward.config.answer_start_ids == answer_start_ids(processor)
    policy, _ = load_run(stock_vlms[name])
    torch.testing.assert_close(reward.lm_head.weight, policy.get_output_embeddings().weight)
    world = datasets.load_from_disk(stock_vlms["world"])["validation"]
    prompt = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What color is it?"}]}]
    rows = [{"images": row["images"], "prompt": prompt, "completion": answer}
            for row in world.select(range(2)) for answer in ("red", "two circles")]
    expected = likelihood_scores(policy, processor, rows, batch_size=3)
    assert reward_scores(reward, processor, rows, batch_size=2) == pytest.approx(expected, abs=1e-4)
    with torch.no_grad():
        reward.score.weight.normal_()  # a trained-looking head, so the reload is checked on more than the likelihood
    scores = reward_scores(reward, processor, rows)
    reward.save_pretrained(tmp_path / "reward")
    processor.save_pretrained(tmp_path / "reward")
    loaded, loaded_processor = load_reward_model(tmp_path / "reward")
    assert loaded.likelihood_feature
    assert reward_scores(loaded, loaded_processor, rows) == pytest.approx(scores, abs=1e-4)
